"""kron_precondition_: K-FAC's in-place damped Kron solve with KL clipping, against dense linear algebra."""

import pytest
import torch
from conftest import (
    CUDA_REASON,
    DEVICES,
    PRIME_SIZES,
    assert_in_place_like_reference,
    assert_like_emulated_reference,
    assert_preconditioned,
    eigen_layer,
    emulated_op,
    gradient_blocks,
    host_threads,
    preconditioned_layers,
    requires_extension,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def damped_inverse(la, lg, delta):
    return 1.0 / (torch.outer(lg.clamp_min(0), la.clamp_min(0)) + delta)


def dense_natural_gradient(a, g, delta, v):
    """``(G ⊗ A + δ I)⁻¹ vec V`` for the row-major vec of a ``(d_G, d_A)`` matrix."""
    p = torch.kron(g, a) + delta * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    return torch.linalg.solve(p, v.reshape(-1)).reshape(v.shape)


def conv_and_linear(generator):
    """A conv-like layer (weight (4, 2, 3) and bias: d_A = 7) and a bias-free linear one (d_A = 5)."""
    layers = [eigen_layer(7, 4, generator=generator, rank_a=3), eigen_layer(5, 3, generator=generator)]
    grads = [
        torch.randn(4, 2, 3, dtype=torch.float64, generator=generator),
        torch.randn(4, dtype=torch.float64, generator=generator),
        torch.randn(3, 5, dtype=torch.float64, generator=generator),
    ]
    return layers, grads, [2, 1]


@pytest.mark.parametrize("kl", [False, True])
def test_equals_the_dense_damped_solve_written_into_the_blocks(kl, generator):
    layers, grads, blocks = conv_and_linear(generator)
    delta = 0.3
    matrices = [torch.cat([grads[0].reshape(4, 6), grads[1].unsqueeze(1)], 1), grads[2]]
    natural = [dense_natural_gradient(a, g, delta, v) for (*_, a, g), v in zip(layers, matrices, strict=True)]
    weights = torch.tensor([0.7, 2.0], dtype=torch.float64)
    nu = torch.tensor(1.0, dtype=torch.float64)
    if kl:
        quadratic = sum(w * (v * n).sum() for w, v, n in zip(weights, matrices, natural, strict=True))
        nu = quadratic.rsqrt().clamp_max(1)
        assert nu < 1  # the clip is active in this test
    inverse = [damped_inverse(la, lg, delta) for _, la, _, lg, *_ in layers]
    result = ops.kron_precondition_(
        grads, blocks, [layer[0] for layer in layers], [layer[2] for layer in layers], inverse, weights if kl else None
    )
    torch.testing.assert_close(result, nu)
    torch.testing.assert_close(grads[0], nu * natural[0][:, :6].reshape(4, 2, 3))
    torch.testing.assert_close(grads[1], nu * natural[0][:, 6])
    torch.testing.assert_close(grads[2], nu * natural[1])


def test_zero_gradients_leave_nu_at_one(generator):
    qa, la, qg, lg, *_ = eigen_layer(3, 2, generator=generator)
    grads = [torch.zeros(2, 3, dtype=torch.float64)]
    nu = ops.kron_precondition_(
        grads, [1], [qa], [qg], [damped_inverse(la, lg, 0.1)], torch.ones(1, dtype=torch.float64)
    )
    assert nu.item() == 1.0 and not grads[0].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(device, dtype, grad_dtype, generator):
    qa, la, qg, lg, *_ = eigen_layer(31, 17, generator=generator)
    grad = torch.randn(17, 31, generator=generator).to(grad_dtype)
    weights = torch.tensor([0.5])
    exact_grads = [grad.double()]
    exact_nu = reference.kron_precondition_(
        exact_grads, [1], [qa], [qg], [damped_inverse(la, lg, 0.05)], weights.double()
    )
    cast = [t.to(dtype) for t in (qa, la, qg, lg)]
    rounded_grads = [grad.to(dtype, copy=True)]
    reference.kron_precondition_(
        rounded_grads, [1], [cast[0]], [cast[2]], [damped_inverse(cast[1], cast[3], 0.05)], weights
    )
    on_device = [t.to(device) for t in cast]
    grads = [grad.to(device, copy=True)]
    nu = ops.kron_precondition_(
        grads,
        [1],
        [on_device[0]],
        [on_device[2]],
        [damped_inverse(on_device[1], on_device[3], 0.05)],
        weights.to(device),
    )
    assert_preconditioned(nu, grads[0], dtype, exact_nu, exact_grads[0], rounded_grads[0])


@given(
    d_in=st.sampled_from(PRIME_SIZES),
    d_g=st.sampled_from(PRIME_SIZES),
    bias=st.booleans(),
    transposed=st.booleans(),
    column_major_spectrum=st.booleans(),
    kl=st.booleans(),
)
def test_property_odd_sizes_and_layouts(d_in, d_g, bias, transposed, column_major_spectrum, kl):
    qa, la, qg, lg, *_ = eigen_layer(d_in + bias, d_g)
    inverse = damped_inverse(la, lg, 0.2)
    if column_major_spectrum:  # not the CPU kernel's fused one-pass layout
        inverse = inverse.T.contiguous().T
    args = ([1 + bias], [qa], [qg], [inverse], torch.tensor([3.0], dtype=torch.float64) if kl else None)
    grads = gradient_blocks(d_in, d_g, bias, transposed)
    assert_in_place_like_reference(ops.kron_precondition_, reference.kron_precondition_, grads, *args)


def test_opcheck():
    requires_extension()
    qa, la, qg, lg, *_ = eigen_layer(4, 2, dtype=torch.float32)
    inverse = damped_inverse(la, lg, 0.1)
    for weights in (None, torch.tensor([2.0])):
        args = ([torch.randn(2, 3), torch.randn(2)], [2], [qa], [qg], [inverse], weights)
        torch.library.opcheck(torch.ops.fastlaplace.kron_precondition_.default, args)


def test_bad_inputs_name_the_argument():
    qa, la, qg, lg, *_ = eigen_layer(3, 2)
    inverse = damped_inverse(la, lg, 0.1)
    with pytest.raises(ValueError, match=r"gradients\[0\] must have 2 rows"):
        ops.kron_precondition_([torch.randn(3, 2, dtype=torch.float64)], [1], [qa], [qg], [inverse])
    with pytest.raises(ValueError, match="layer 0: its gradient blocks have 2 columns, its eigvecs_a 3"):
        ops.kron_precondition_([torch.randn(2, 2, dtype=torch.float64)], [1], [qa], [qg], [inverse])
    with pytest.raises(ValueError, match="blocks announce 2 gradient blocks, got 1"):
        ops.kron_precondition_([torch.randn(2, 3, dtype=torch.float64)], [2], [qa], [qg], [inverse])
    with pytest.raises(ValueError, match="blocks must be positive integers"):
        ops.kron_precondition_([], [0], [qa], [qg], [inverse])
    with pytest.raises(ValueError, match=r"inverse_spectra\[0\] must have shape \(2, 3\)"):
        ops.kron_precondition_([torch.randn(2, 3, dtype=torch.float64)], [1], [qa], [qg], [inverse.T])
    with pytest.raises(TypeError, match="eigvecs_a and eigvecs_g must all be torch.float64"):
        ops.kron_precondition_([torch.randn(2, 3, dtype=torch.float64)], [1], [qa], [qg.float()], [inverse])
    with pytest.raises(ValueError, match=r"kl_weights must have one entry per layer \(1\)"):
        ops.kron_precondition_([torch.randn(2, 3, dtype=torch.float64)], [1], [qa], [qg], [inverse], torch.ones(2))
    with pytest.raises(ValueError, match="one entry per layer"):
        ops.kron_precondition_([torch.randn(2, 3, dtype=torch.float64)], [1], [qa], [], [inverse])


def test_layers_shared_over_threads_match_the_reference(generator):
    """Four equal layers and a small one: the CPU kernel spreads them over two threads."""
    sizes = [(9, 6)] * 4 + [(4, 3)]
    layers = [eigen_layer(d_a, d_g, generator=generator) for d_a, d_g in sizes]
    grads = [torch.randn(d_g, d_a, dtype=torch.float64, generator=generator) for d_a, d_g in sizes]
    args = (
        [1] * len(sizes),
        [layer[0] for layer in layers],
        [layer[2] for layer in layers],
        [damped_inverse(layer[1], layer[3], 0.1) for layer in layers],
        torch.linspace(0.5, 2.0, len(sizes), dtype=torch.float64),
    )
    with host_threads(2):
        assert_in_place_like_reference(ops.kron_precondition_, reference.kron_precondition_, grads, *args)


# The CUDA kernel (six launches of the fused tile kernel, csrc/engines/tile_gram.h) run on the host.


def emulated(target_blocks):
    return emulated_op("_kron_precondition_emulated_", target_blocks)


@settings(deadline=None, max_examples=30)
@given(
    sizes=preconditioned_layers(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kl=st.booleans(),
    target_blocks=st.sampled_from([1, 10_000]),
)
def test_emulated_kernel_writes_every_block_like_the_reference(sizes, dtype, kl, target_blocks):
    grads, blocks, qas, qgs, spectra = [], [], [], [], []
    for d_in, d_g, bias in sizes:
        qa, la, qg, lg, *_ = eigen_layer(d_in + bias, d_g, rank_a=max(1, d_in // 2))
        grads += [g.to(dtype) for g in gradient_blocks(d_in, d_g, bias, transposed=False)]
        blocks.append(1 + bias)
        qas.append(qa.to(dtype))
        qgs.append(qg.to(dtype))
        spectra.append(damped_inverse(la, lg, 0.1).to(dtype))
    kl_weights = torch.full((len(sizes),), 1e3, dtype=dtype) if kl else None  # 1e3: the clip is active
    expected = [g.clone() for g in grads]
    nu = emulated(target_blocks)(grads, blocks, qas, qgs, spectra, kl_weights)
    expected_nu = reference.kron_precondition_(expected, blocks, qas, qgs, spectra, kl_weights)
    assert_like_emulated_reference(nu, grads, expected_nu, expected, dtype)


def test_emulated_kernel_refuses_gradients_it_does_not_take(generator):
    (qa, la, qg, lg, *_), grads, blocks = eigen_layer(5, 3, generator=generator), [torch.randn(5, 3).T], [1]
    with pytest.raises(RuntimeError, match="takes contiguous gradients in the eigenvectors' dtype"):
        emulated(1)(grads, blocks, [qa], [qg], [damped_inverse(la, lg, 0.1)], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_agrees_with_the_emulation(dtype, generator):
    grads, blocks, qas, qgs, spectra = [], [], [], [], []
    for d_in, d_g in ((784, 512), (512, 10)):
        qa, la, qg, lg, *_ = eigen_layer(d_in + 1, d_g, generator=generator)
        grads += [g.to(dtype) for g in gradient_blocks(d_in, d_g, True, transposed=False)]
        blocks.append(2)
        qas.append(qa.to(dtype))
        qgs.append(qg.to(dtype))
        spectra.append(damped_inverse(la, lg, 0.1).to(dtype))
    kl_weights = torch.full((2,), 1e3, dtype=dtype)
    on_gpu = [g.cuda() for g in grads]
    nu = ops.kron_precondition_(
        on_gpu, blocks, [q.cuda() for q in qas], [q.cuda() for q in qgs], [s.cuda() for s in spectra], kl_weights.cuda()
    )
    expected_nu = emulated(528)(grads, blocks, qas, qgs, spectra, kl_weights)
    relative = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(nu.cpu(), expected_nu, rtol=relative, atol=0)
    for got, want in zip(on_gpu, grads, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=relative * want.abs().max().item())
