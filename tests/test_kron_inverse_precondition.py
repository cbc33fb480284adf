"""kron_inverse_precondition_: K-FAC's in-place solve with factored damping and KL clipping, against dense algebra."""

import pytest
import torch
from conftest import (
    DEVICES,
    PRIME_SIZES,
    assert_in_place_like_reference,
    assert_preconditioned,
    gradient_blocks,
    host_threads,
    random_spd,
    requires_extension,
)
from hypothesis import given
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
