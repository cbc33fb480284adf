"""damped_inverses: (M + s I)⁻¹ of many symmetric PSD matrices, against dense inverses."""

import pytest
import torch
from conftest import DEVICES, FACTOR_DTYPES, PRIME_SIZES, host_threads, random_spd, requires_extension
from hypothesis import given
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
def test_mixed_sizes_equal_dense_inverses(device, dtype, generator):
    sizes = [1, 7, 40, 13, 2]
    matrices = [random_spd(d, max(1, d // 2), generator=generator) for d in sizes]  # rank-deficient
    shifts = torch.tensor([0.5, 0.1, 0.03, 1.0, 2.0], dtype=torch.float64)
    exact = reference.damped_inverses(matrices, shifts)
    result = ops.damped_inverses([m.to(device, dtype) for m in matrices], shifts.to(device, dtype))
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    for got, want, m, s in zip(result, exact, matrices, shifts, strict=True):
        assert got.dtype == dtype and got.shape == m.shape
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=rtol * want.abs().max().item())
        assert torch.equal(got, got.T)  # symmetric, both triangles written
        identity = torch.eye(m.shape[0], dtype=torch.float64)
        torch.testing.assert_close(want @ (m + s * identity), identity, rtol=0, atol=1e-10)


@given(size=st.sampled_from(PRIME_SIZES), shift=st.sampled_from([1e-3, 0.1, 10.0]), transposed=st.booleans())
def test_property_odd_sizes_and_layouts(size, shift, transposed):
    m = random_spd(size)
    if transposed:
        m = m.T.contiguous().T
    shifts = torch.tensor([shift], dtype=torch.float64)
    torch.testing.assert_close(ops.damped_inverses([m], shifts)[0], reference.damped_inverses([m], shifts)[0])


def test_a_failed_cholesky_falls_back_to_clamped_eigenvalues():
    # diag(-1, 2) + 0.5 I is not positive definite: its Cholesky fails, and the eigenvalues of
    # the (meant to be PSD) matrix are clamped at 0 before the shift, as everywhere else.
    m = torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    result = ops.damped_inverses([m], torch.tensor([0.5], dtype=torch.float64))[0]
    torch.testing.assert_close(result, torch.diag(torch.tensor([1 / 0.5, 1 / 2.5], dtype=torch.float64)))


def test_many_matrices_over_threads_match_the_reference(generator):
    matrices = [random_spd(d, generator=generator) for d in (30, 30, 30, 30, 5)]
    shifts = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    with host_threads(2):
        result = ops.damped_inverses(matrices, shifts)
    for got, want in zip(result, reference.damped_inverses(matrices, shifts), strict=True):
        torch.testing.assert_close(got, want)


def test_opcheck():
    requires_extension()
    args = ([random_spd(3, dtype=torch.float32), random_spd(2, dtype=torch.float32)], torch.tensor([0.1, 0.2]))
    torch.library.opcheck(torch.ops.fastlaplace.damped_inverses.default, args)


def test_bad_inputs_name_the_argument():
    m = random_spd(3)
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"matrices\[0\] must have shape \(2, 2\), got \(2, 3\)"):
        ops.damped_inverses([m[:, :2].T], one)
    with pytest.raises(ValueError, match=r"shifts must be positive, got \[0.0\]"):
        ops.damped_inverses([m], 0 * one)
    with pytest.raises(ValueError, match=r"shifts must have one entry per layer \(1\)"):
        ops.damped_inverses([m], torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"matrices\[0\]"):
        ops.damped_inverses([m.long()], one)
    bad = m.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"matrices\[0\] contains NaN or Inf"):
        ops.damped_inverses([bad], one)
    assert ops.damped_inverses([], one[:0]) == []
