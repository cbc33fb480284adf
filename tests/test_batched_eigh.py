"""batched_eigh: eigenpairs of symmetric matrices of mixed sizes, compared by reconstruction."""

import pytest
import torch
from conftest import CUDA_REASON, DEVICES, FACTOR_DTYPES, PRIME_SIZES, random_spd, requires_extension
from hypothesis import given
from hypothesis import strategies as st

import fastlaplace.ops as ops


def assert_eigenpairs(matrix, values, vectors):
    eps = torch.finfo(matrix.dtype).eps
    size = matrix.shape[0]
    scale = max(1.0, matrix.abs().max().item())
    reconstruction = vectors @ torch.diag(values) @ vectors.T
    assert (reconstruction - matrix).abs().max().item() <= 64 * size * eps * scale
    assert (
        vectors.T @ vectors - torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    ).abs().max() <= 64 * size * eps
    assert torch.all(values[1:] >= values[:-1]), "eigenvalues must be ascending"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
def test_mixed_sizes_including_large_and_rank_deficient(device, dtype, generator):
    sizes = [(1, None), (13, None), (40, 3), (600, None), (7, 1), (100, None)]
    matrices = [random_spd(n, rank, generator=generator).to(dtype).to(device) for n, rank in sizes]
    values, vectors = ops.batched_eigh(matrices)
    assert len(values) == len(vectors) == len(matrices)
    for m, lam, q in zip(matrices, values, vectors):
        assert lam.dtype == q.dtype == dtype
        assert_eigenpairs(m, lam, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
def test_cuda_large_matrices_side_by_side_on_a_side_stream(dtype, generator):
    # More large matrices than cuSOLVER lanes (8), so a lane solves several, and Jacobi ones too.
    sizes = [113, 700, 200, 513, 150, 300, 120, 400, 256, 640, 40, 7]
    factors = [torch.randn(n, n, dtype=dtype, generator=generator).cuda() for n in sizes]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the inputs made on this stream just before the call
        matrices = [f @ f.T / f.shape[0] for f in factors]
        values, vectors = ops.batched_eigh(matrices)
    stream.synchronize()
    for m, lam, q in zip(matrices, values, vectors, strict=True):
        assert_eigenpairs(m, lam, q)


@pytest.mark.parametrize("device", DEVICES)
def test_eigenvalues_equal_torch(device, generator):
    matrices = [random_spd(n, generator=generator).to(device) for n in (5, 64, 513)]
    values, _ = ops.batched_eigh(matrices)
    for m, lam in zip(matrices, values):
        torch.testing.assert_close(lam, torch.linalg.eigvalsh(m))


@given(
    sizes=st.lists(st.sampled_from(PRIME_SIZES), min_size=1, max_size=6),
    dtype=st.sampled_from(FACTOR_DTYPES),
    transposed=st.booleans(),
)
def test_property_lists_of_odd_sizes(sizes, dtype, transposed):
    matrices = [random_spd(n).to(dtype) for n in sizes]
    views = [m.T if transposed else m for m in matrices]  # symmetric, non-contiguous strides
    before = [m.clone() for m in views]
    values, vectors = ops.batched_eigh(views)
    for m, lam, q in zip(matrices, values, vectors):
        assert_eigenpairs(m, lam, q)
    assert all(torch.equal(m, b) for m, b in zip(views, before))


def test_lower_triangle_is_read():
    m = random_spd(6)
    garbage_upper = m.tril() + torch.triu(torch.full_like(m, 1e3), 1)
    values, _ = ops.batched_eigh([garbage_upper])
    torch.testing.assert_close(values[0], torch.linalg.eigvalsh(m))


def test_empty_list_gives_empty_lists():
    assert ops.batched_eigh([]) == ([], [])


def test_opcheck():
    requires_extension()
    torch.library.opcheck(torch.ops.fastlaplace.batched_eigh.default, ([random_spd(3).float(), random_spd(5).float()],))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_raises_instead_of_crashing(bad):
    m = random_spd(5)
    m[2, 3] = m[3, 2] = bad
    with pytest.raises(RuntimeError, match=r"matrices\[1\] contains NaN or Inf"):
        ops.batched_eigh([random_spd(2), m])


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"matrices\[0\] must have shape \(3, 3\)"):
        ops.batched_eigh([torch.randn(3, 4, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"matrices\[0\] must be float32 or float64"):
        ops.batched_eigh([torch.eye(3, dtype=torch.bfloat16)])
