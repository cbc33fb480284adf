"""The CUDA batched_eigh's Jacobi solver: its arithmetic through the host emulation, and the kernel on a GPU."""

import pytest
import torch
from conftest import CUDA_REASON, FACTOR_DTYPES, PRIME_SIZES, emulated_op, random_spd, requires_extension
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlaplace.ops as ops

MAX_SIZE = 112  # jacobi::kMaxSize


def emulated(matrices, threads=64):
    values, vectors = emulated_op("_jacobi_eigh_emulated", threads)(matrices)
    return list(values), list(vectors)


def assert_accurate(matrix, values, vectors):
    """Eigenvalues within 1e-5 (float32) or 1e-12 (float64) of float64 LAPACK, relative to the largest."""
    truth = torch.linalg.eigvalsh(matrix.double())
    scale = max(truth.abs().max().item(), torch.finfo(torch.float64).tiny)
    tolerance = 1e-5 if matrix.dtype == torch.float32 else 1e-12
    assert (values.double() - truth).abs().max().item() <= tolerance * scale
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    q = vectors.double()
    assert (q.T @ q - eye).abs().max().item() <= 10 * tolerance
    assert (q @ torch.diag(values.double()) @ q.T - matrix.double()).abs().max().item() <= 10 * tolerance * scale
    assert torch.all(values[1:] >= values[:-1]), "eigenvalues must be ascending"
    assert vectors.stride() == (1, matrix.shape[0]), "column-major, like LAPACK's"


@settings(deadline=None)
@given(
    size=st.sampled_from([*PRIME_SIZES, 16, 33, 64]),
    threads=st.sampled_from([1, 3, 32, 256]),
    dtype=st.sampled_from(FACTOR_DTYPES),
    rank=st.sampled_from([None, 1, 3]),
)
def test_property_sizes_threads_and_ranks(size, threads, dtype, rank):
    matrix = random_spd(size, rank).to(dtype)
    values, vectors = emulated([matrix], threads)
    assert values[0].dtype == vectors[0].dtype == dtype
    assert_accurate(matrix, values[0], vectors[0])


@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
def test_largest_size_well_conditioned_to_the_target_accuracy(dtype, generator):
    matrix = random_spd(MAX_SIZE, generator=generator).to(dtype) + torch.eye(MAX_SIZE, dtype=dtype)
    assert_accurate(matrix, *[t[0] for t in emulated([matrix])])


@pytest.mark.parametrize(
    "matrix",
    [
        torch.zeros(6, 6, dtype=torch.float64),
        torch.eye(9, dtype=torch.float64) * 2.5,  # one eigenvalue, nine times
        torch.diag(torch.tensor([3.0, -1.0, 2.0, -7.0], dtype=torch.float64)),  # indefinite, already diagonal
        torch.tensor([[1e8, 1.0], [1.0, 1e-8]], dtype=torch.float64),  # wide dynamic range
        random_spd(20) - 2 * torch.eye(20, dtype=torch.float64),  # indefinite
    ],
    ids=["zero", "repeated", "diagonal", "dynamic-range", "indefinite"],
)
def test_special_matrices(matrix):
    assert_accurate(matrix, *[t[0] for t in emulated([matrix])])


def test_lower_triangle_is_read():
    matrix = random_spd(7)
    garbage = matrix.clone()
    garbage.triu_(1).mul_(100).add_(matrix.tril())  # the upper triangle is not the matrix's
    values, _ = emulated([garbage])
    torch.testing.assert_close(values[0], torch.linalg.eigvalsh(matrix), rtol=1e-12, atol=1e-12)


def test_too_large_or_non_finite_matrices_raise():
    requires_extension()
    with pytest.raises(RuntimeError, match=f"matrices up to {MAX_SIZE}, got {MAX_SIZE + 1}"):
        emulated([random_spd(MAX_SIZE + 1)])
    bad = random_spd(3)
    bad[2, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"matrices\[0\] contains NaN or Inf"):
        emulated([bad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
def test_cuda_kernel_equals_the_emulation(dtype, generator):
    matrices = [random_spd(n, generator=generator).to(dtype) for n in (1, 2, 7, 40, 100, MAX_SIZE)]
    expected_values, expected_vectors = emulated(matrices)
    values, vectors = ops.batched_eigh([m.cuda() for m in matrices])
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for m, lam, q, e_lam, e_q in zip(matrices, values, vectors, expected_values, expected_vectors, strict=True):
        assert q.stride() == (1, m.shape[0])
        torch.testing.assert_close(lam.cpu(), e_lam, rtol=rtol, atol=rtol * e_lam.abs().max().item())
        # eigenvectors up to sign
        signs = torch.sign((q.cpu() * e_q).sum(0))
        torch.testing.assert_close(q.cpu() * signs, e_q, rtol=0, atol=100 * rtol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_many_matrices_in_one_launch(generator):
    matrices = [random_spd(100, generator=generator).float().cuda() + torch.eye(100, device="cuda") for _ in range(500)]
    values, vectors = ops.batched_eigh(matrices)
    for m, lam, q in list(zip(matrices, values, vectors, strict=True))[::50]:
        assert_accurate(m.cpu(), lam.cpu(), q.cpu())
