"""kron_inverse_precondition_: K-FAC's in-place solve with factored damping and KL clipping, against dense algebra."""

import pytest
import torch
from conftest import (
    CUDA_REASON,
    DEVICES,
    PRIME_SIZES,
    assert_in_place_like_reference,
    assert_like_emulated_reference,
    assert_preconditioned,
    emulated_op,
    gradient_blocks,
    host_threads,
    preconditioned_layers,
    random_spd,
    requires_extension,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def damped_pair(d_a, d_g, generator=None, dtype=torch.float64, rank_a=None):
    """Damped factors (Ā, Ḡ) of one layer and their inverses."""
    a = random_spd(d_a, rank_a, dtype, generator) + 0.3 * torch.eye(d_a, dtype=dtype)
    g = random_spd(d_g, None, dtype, generator) + 0.2 * torch.eye(d_g, dtype=dtype)
    return a, g, torch.linalg.inv(a), torch.linalg.inv(g)


def dense_natural_gradient(a, g, v):
    """``(Ḡ ⊗ Ā)⁻¹ vec V`` for the row-major vec of a ``(d_G, d_A)`` matrix."""
    return torch.linalg.solve(torch.kron(g, a), v.reshape(-1)).reshape(v.shape)


@pytest.mark.parametrize("kl", [False, True])
def test_equals_the_dense_solve_written_into_the_blocks(kl, generator):
    layers = [damped_pair(7, 4, generator, rank_a=3), damped_pair(5, 3, generator)]
    grads = [
        torch.randn(4, 2, 3, dtype=torch.float64, generator=generator),
        torch.randn(4, dtype=torch.float64, generator=generator),
        torch.randn(3, 5, dtype=torch.float64, generator=generator),
    ]
    matrices = [torch.cat([grads[0].reshape(4, 6), grads[1].unsqueeze(1)], 1), grads[2]]
    natural = [dense_natural_gradient(a, g, v) for (a, g, _, _), v in zip(layers, matrices, strict=True)]
    weights = torch.tensor([0.7, 2.0], dtype=torch.float64)
    nu = torch.tensor(1.0, dtype=torch.float64)
    if kl:
        quadratic = sum(w * (v * n).sum() for w, v, n in zip(weights, matrices, natural, strict=True))
        nu = quadratic.rsqrt().clamp_max(1)
        assert nu < 1  # the clip is active in this test
    result = ops.kron_inverse_precondition_(
        grads, [2, 1], [layer[2] for layer in layers], [layer[3] for layer in layers], weights if kl else None
    )
    torch.testing.assert_close(result, nu)
    torch.testing.assert_close(grads[0], nu * natural[0][:, :6].reshape(4, 2, 3))
    torch.testing.assert_close(grads[1], nu * natural[0][:, 6])
    torch.testing.assert_close(grads[2], nu * natural[1])


def test_zero_gradients_leave_nu_at_one(generator):
    _, _, inverse_a, inverse_g = damped_pair(3, 2, generator)
    grads = [torch.zeros(2, 3, dtype=torch.float64)]
    nu = ops.kron_inverse_precondition_(grads, [1], [inverse_a], [inverse_g], torch.ones(1, dtype=torch.float64))
    assert nu.item() == 1.0 and not grads[0].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(device, dtype, grad_dtype, generator):
    _, _, inverse_a, inverse_g = damped_pair(31, 17, generator)
    grad = torch.randn(17, 31, generator=generator).to(grad_dtype)
    weights = torch.tensor([0.5])
    exact_grads = [grad.double()]
    exact_nu = reference.kron_inverse_precondition_(exact_grads, [1], [inverse_a], [inverse_g], weights.double())
    cast = [inverse_a.to(dtype), inverse_g.to(dtype)]
    rounded_grads = [grad.to(dtype, copy=True)]
    reference.kron_inverse_precondition_(rounded_grads, [1], [cast[0]], [cast[1]], weights)
    grads = [grad.to(device, copy=True)]
    nu = ops.kron_inverse_precondition_(grads, [1], [cast[0].to(device)], [cast[1].to(device)], weights.to(device))
    assert_preconditioned(nu, grads[0], dtype, exact_nu, exact_grads[0], rounded_grads[0])


@given(
    d_in=st.sampled_from(PRIME_SIZES),
    d_g=st.sampled_from(PRIME_SIZES),
    bias=st.booleans(),
    transposed=st.booleans(),
    transposed_inverse=st.booleans(),
    kl=st.booleans(),
)
def test_property_odd_sizes_and_layouts(d_in, d_g, bias, transposed, transposed_inverse, kl):
    _, _, inverse_a, inverse_g = damped_pair(d_in + bias, d_g)
    if transposed_inverse:  # column-major storage of the same symmetric matrix
        inverse_a = inverse_a.T.contiguous().T
    args = ([1 + bias], [inverse_a], [inverse_g], torch.tensor([3.0], dtype=torch.float64) if kl else None)
    grads = gradient_blocks(d_in, d_g, bias, transposed)
    assert_in_place_like_reference(ops.kron_inverse_precondition_, reference.kron_inverse_precondition_, grads, *args)


def test_opcheck():
    requires_extension()
    _, _, inverse_a, inverse_g = damped_pair(4, 2, dtype=torch.float32)
    for weights in (None, torch.tensor([2.0])):
        args = ([torch.randn(2, 3), torch.randn(2)], [2], [inverse_a], [inverse_g], weights)
        torch.library.opcheck(torch.ops.fastlaplace.kron_inverse_precondition_.default, args)


def test_bad_inputs_name_the_argument():
    _, _, inverse_a, inverse_g = damped_pair(3, 2)
    grad = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gradients\[0\] must have 2 rows"):
        ops.kron_inverse_precondition_([grad.T], [1], [inverse_a], [inverse_g])
    with pytest.raises(ValueError, match="layer 0: its gradient blocks have 2 columns, its inverses_a 3"):
        ops.kron_inverse_precondition_([grad[:, :2]], [1], [inverse_a], [inverse_g])
    with pytest.raises(ValueError, match="blocks announce 2 gradient blocks, got 1"):
        ops.kron_inverse_precondition_([grad], [2], [inverse_a], [inverse_g])
    with pytest.raises(ValueError, match=r"inverses_g\[0\] must have shape \(2, 2\)"):
        ops.kron_inverse_precondition_([grad], [1], [inverse_a], [inverse_g[:, :1]])
    with pytest.raises(TypeError, match="inverses_a and inverses_g must all be torch.float64"):
        ops.kron_inverse_precondition_([grad], [1], [inverse_a], [inverse_g.float()])
    with pytest.raises(ValueError, match=r"kl_weights must have one entry per layer \(1\)"):
        ops.kron_inverse_precondition_([grad], [1], [inverse_a], [inverse_g], torch.ones(2))
    with pytest.raises(ValueError, match="one entry per layer"):
        ops.kron_inverse_precondition_([grad], [1], [inverse_a], [])


def test_layers_shared_over_threads_match_the_reference(generator):
    """Four equal layers and a small one: the CPU kernel spreads them over two threads."""
    sizes = [(9, 6)] * 4 + [(4, 3)]
    layers = [damped_pair(d_a, d_g, generator) for d_a, d_g in sizes]
    grads = [torch.randn(d_g, d_a, dtype=torch.float64, generator=generator) for d_a, d_g in sizes]
    args = (
        [1] * len(sizes),
        [layer[2] for layer in layers],
        [layer[3] for layer in layers],
        torch.linspace(0.5, 2.0, len(sizes), dtype=torch.float64),
    )
    with host_threads(2):
        assert_in_place_like_reference(
            ops.kron_inverse_precondition_, reference.kron_inverse_precondition_, grads, *args
        )


# The CUDA kernel (two or three launches of the fused tile kernel, csrc/engines/tile_gram.h, and
# two foreach calls) run on the host.


def emulated(target_blocks):
    return emulated_op("_kron_inverse_precondition_emulated_", target_blocks)


@settings(deadline=None, max_examples=30)
@given(
    sizes=preconditioned_layers(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kl=st.booleans(),
    column_major=st.booleans(),
    target_blocks=st.sampled_from([1, 10_000]),
)
def test_emulated_kernel_writes_every_block_like_the_reference(sizes, dtype, kl, column_major, target_blocks):
    grads, blocks, inverses_a, inverses_g = [], [], [], []
    for d_in, d_g, bias in sizes:
        _, _, inverse_a, inverse_g = damped_pair(d_in + bias, d_g, rank_a=max(1, d_in // 2))
        grads += [g.to(dtype) for g in gradient_blocks(d_in, d_g, bias, transposed=False)]
        blocks.append(1 + bias)
        # strided views; asymmetric rounding shows which side a matrix multiplies from
        inverses_a.append((inverse_a.T.contiguous().T if column_major else inverse_a).to(dtype))
        inverses_g.append(inverse_g.to(dtype))
    # 1e3: the clip is active; unequal weights: each block's dot gets its layer's
    kl_weights = torch.linspace(1e3, 3e3, len(sizes), dtype=dtype) if kl else None
    expected = [g.clone() for g in grads]
    nu = emulated(target_blocks)(grads, blocks, inverses_a, inverses_g, kl_weights)
    expected_nu = reference.kron_inverse_precondition_(expected, blocks, inverses_a, inverses_g, kl_weights)
    assert_like_emulated_reference(nu, grads, expected_nu, expected, dtype)


def test_emulated_kernel_multiplies_from_the_sides_the_reference_does(generator):
    # Asymmetric "inverses" tell G⁻¹ V A⁻¹ from G⁻ᵀ V A⁻ᵀ.
    inverse_a = torch.randn(5, 5, dtype=torch.float64, generator=generator)
    inverse_g = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    grads = [torch.randn(3, 4, dtype=torch.float64, generator=generator), torch.randn(3, dtype=torch.float64)]
    assert_in_place_like_reference(
        emulated(1), reference.kron_inverse_precondition_, grads, [2], [inverse_a], [inverse_g], None
    )


def test_emulated_kernel_refuses_gradients_it_does_not_take(generator):
    _, _, inverse_a, inverse_g = damped_pair(5, 3, generator)
    with pytest.raises(RuntimeError, match="takes contiguous gradients in the inverses' dtype"):
        emulated(1)([torch.randn(5, 3, dtype=torch.float64).T], [1], [inverse_a], [inverse_g], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kl", [False, True])
def test_cuda_kernel_agrees_with_the_emulation(dtype, kl, generator):
    grads, blocks, inverses_a, inverses_g = [], [], [], []
    for d_in, d_g in ((784, 512), (512, 10)):
        _, _, inverse_a, inverse_g = damped_pair(d_in + 1, d_g, generator)
        grads += [g.to(dtype) for g in gradient_blocks(d_in, d_g, True, transposed=False)]
        blocks.append(2)
        inverses_a.append(inverse_a.to(dtype))
        inverses_g.append(inverse_g.to(dtype))
    kl_weights = torch.full((2,), 1e3, dtype=dtype) if kl else None
    on_gpu = [g.cuda() for g in grads]
    nu = ops.kron_inverse_precondition_(
        on_gpu,
        blocks,
        [m.cuda() for m in inverses_a],
        [m.cuda() for m in inverses_g],
        None if kl_weights is None else kl_weights.cuda(),
    )
    expected_nu = emulated(528)(grads, blocks, inverses_a, inverses_g, kl_weights)
    relative = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(nu.cpu(), expected_nu, rtol=relative, atol=0)
    for got, want in zip(on_gpu, grads, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=relative * want.abs().max().item())
