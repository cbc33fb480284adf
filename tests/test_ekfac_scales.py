"""ekfac_scales_: second moments of per-datum gradients in a Kronecker eigenbasis, against brute force."""

import pytest
import torch
from conftest import DEVICES, FACTOR_DTYPES, INPUT_DTYPES, eigen_layer, requires_extension
from hypothesis import given
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def brute_force(inputs, grads, q_a, q_g):
    """``Σ_{n,k} (vec-coordinates of datum n's gradient in Q_A ⊗ Q_G)²``, from explicit gradient vectors."""
    basis = torch.kron(q_g, q_a)  # row-major vec of a (d_G, d_A) matrix: vec(Q_Gᵀ M Q_A) = (Q_G ⊗ Q_A)ᵀ vec M
    total = torch.zeros(q_g.shape[0] * q_a.shape[0], dtype=torch.float64)
    for n in range(inputs.shape[0]):
        for k in range(grads.shape[1]):
            gradient = sum(torch.outer(grads[n, k, t], inputs[n, t]) for t in range(inputs.shape[1]))
            total += (basis.T @ gradient.reshape(-1)).square()
    return total.view(q_g.shape[0], q_a.shape[0])


def layer(n, k, t, d_a, d_g, generator):
    inputs = torch.randn(n, t, d_a, dtype=torch.float64, generator=generator)
    grads = torch.randn(n, k, t, d_g, dtype=torch.float64, generator=generator)
    q_a, _, q_g, _, _, _ = eigen_layer(d_a, d_g, generator=generator)
    return inputs, grads, q_a, q_g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
def test_layers_of_mixed_shapes_equal_the_brute_force(device, dtype, generator):
    shapes = [(6, 1, 1, 5, 3), (4, 3, 7, 4, 2), (3, 2, 1, 1, 6), (5, 1, 4, 9, 1)]  # (N, K, T, d_A, d_G)
    layers = [layer(*shape, generator) for shape in shapes]
    scales = [torch.rand(q_g.shape[0], q_a.shape[0], dtype=dtype, device=device) for _, _, q_a, q_g in layers]
    old = [s.clone() for s in scales]
    ops.ekfac_scales_(
        scales,
        [x.to(device, dtype) for x, _, _, _ in layers],
        [g.to(device, dtype) for _, g, _, _ in layers],
        [q_a.to(device, dtype) for _, _, q_a, _ in layers],
        [q_g.to(device, dtype) for _, _, _, q_g in layers],
        weight=0.25,
        decay=0.5,
    )
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for got, before, (x, g, q_a, q_g) in zip(scales, old, layers, strict=True):
        want = 0.5 * before.double().cpu() + 0.25 * brute_force(x, g, q_a, q_g)
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_one_datum_one_location_gives_the_kronecker_eigenvalue_products(generator):
    # a rank-one A and G: their eigenvalue products are the gradient's squared coordinates
    x, g = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    l_a, q_a = torch.linalg.eigh(x.T @ x)
    l_g, q_g = torch.linalg.eigh(g.T @ g)
    scales = [torch.zeros(3, 5, dtype=torch.float64)]
    ops.ekfac_scales_(scales, [x], [g], [q_a], [q_g])
    torch.testing.assert_close(scales[0], torch.outer(l_g, l_a), atol=1e-12, rtol=1e-10)


def test_shorthand_shapes_mean_one_column_and_one_location(generator):
    x, g, q_a, q_g = layer(4, 1, 1, 3, 2, generator)
    full, short, tokens = (torch.zeros(2, 3, dtype=torch.float64) for _ in range(3))
    ops.ekfac_scales_([full], [x], [g], [q_a], [q_g])
    ops.ekfac_scales_([short], [x[:, 0]], [g[:, 0, 0]], [q_a], [q_g])
    ops.ekfac_scales_([tokens], [x], [g[:, 0]], [q_a], [q_g])
    torch.testing.assert_close(short, full, rtol=1e-12, atol=0)
    torch.testing.assert_close(tokens, full, rtol=1e-12, atol=0)


def test_zero_decay_ignores_nan_in_the_old_scales(generator):
    x, g, q_a, q_g = layer(3, 2, 2, 3, 2, generator)
    scales = [torch.full((2, 3), float("nan"), dtype=torch.float64)]
    ops.ekfac_scales_(scales, [x], [g], [q_a], [q_g], weight=2.0, decay=0.0)
    torch.testing.assert_close(scales[0], 2.0 * brute_force(x, g, q_a, q_g))


def test_large_batches_are_summed_over_chunks(generator):
    # 2^24 / (K d_G d_A) = 2^24 / (2 * 64 * 65) data per chunk: 2,100 data take two chunks
    x = torch.randn(2_100, 2, 65, generator=generator)
    g = torch.randn(2_100, 2, 2, 64, generator=generator)
    q_a, _, q_g, _, _, _ = eigen_layer(65, 64, dtype=torch.float32, generator=generator)
    got, want = [torch.zeros(64, 65)], [torch.zeros(64, 65)]
    ops.ekfac_scales_(got, [x], [g], [q_a], [q_g])
    reference.ekfac_scales_(want, [x], [g], [q_a], [q_g])
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)


@given(
    n=st.integers(1, 5),
    k=st.integers(1, 3),
    t=st.integers(1, 4),
    d_a=st.sampled_from([1, 2, 7]),
    d_g=st.sampled_from([1, 3, 5]),
    input_dtype=st.sampled_from(INPUT_DTYPES),
    dtype=st.sampled_from(FACTOR_DTYPES),
    transposed=st.booleans(),
)
def test_property_odd_shapes_dtypes_and_layouts(n, k, t, d_a, d_g, input_dtype, dtype, transposed):
    generator = torch.Generator().manual_seed(n * 100 + k * 10 + t)
    x, g, q_a, q_g = layer(n, k, t, d_a, d_g, generator)
    x, g = x.to(input_dtype), g.to(input_dtype)
    q_a, q_g = q_a.to(dtype), q_g.to(dtype)
    if transposed:  # non-contiguous views of the same values
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        g = g.transpose(0, 3).contiguous().transpose(0, 3)
        q_a = q_a.T.contiguous().T
    got, want = [torch.ones(d_g, d_a, dtype=dtype)], [torch.ones(d_g, d_a, dtype=dtype)]
    ops.ekfac_scales_(got, [x], [g], [q_a], [q_g], weight=0.5, decay=0.9)
    reference.ekfac_scales_(want, [x], [g], [q_a], [q_g], weight=0.5, decay=0.9)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=rtol * float(want[0].abs().max()))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a: a.update(scales=[torch.zeros(3, 2, dtype=torch.float64)]), ValueError, r"scales\[0\] must have"),
        (lambda a: a.update(output_grads=[torch.zeros(4, 1, 3, 2)]), ValueError, "must have the N and T"),
        (lambda a: a.update(eigvecs_a=[torch.eye(4, dtype=torch.float64)]), ValueError, r"eigvecs_a\[0\]"),
        (lambda a: a.update(eigvecs_g=[torch.eye(2)]), TypeError, "share a dtype"),
        (lambda a: a.update(inputs=[torch.zeros(4, 3, dtype=torch.long)]), TypeError, "floating-point"),
        (lambda a: a.update(scales=[]), ValueError, "one entry per layer"),
    ],
)
def test_bad_arguments_are_named(change, error, message):
    arguments = {
        "scales": [torch.zeros(2, 3, dtype=torch.float64)],
        "inputs": [torch.zeros(4, 3)],
        "output_grads": [torch.zeros(4, 2)],
        "eigvecs_a": [torch.eye(3, dtype=torch.float64)],
        "eigvecs_g": [torch.eye(2, dtype=torch.float64)],
    }
    change(arguments)
    with pytest.raises(error, match=message):
        ops.ekfac_scales_(**arguments)


def test_opcheck(generator):
    requires_extension()
    x, g, q_a, q_g = layer(3, 2, 2, 3, 2, generator)
    args = ([torch.zeros(2, 3, dtype=torch.float64)], [x], [g], [q_a], [q_g], 0.5, 0.9)
    torch.library.opcheck(torch.ops.fastlaplace.ekfac_scales_.default, args)
