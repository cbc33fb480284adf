"""kron_solve: P^p V with P = s kron(G, A) + δ I, against dense linear algebra."""

import pytest
import torch
from conftest import (
    CUDA_REASON,
    DEVICES,
    PRIME_SIZES,
    TILE,
    assert_matches_float64,
    eigen_layer,
    emulated_op,
    requires_extension,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def dense_precision(a, g, scale, delta):
    """Dense P for the row-major vec of a (d_G, d_A) matrix, spectra clamped at 0."""
    la, qa = torch.linalg.eigh(a)
    lg, qg = torch.linalg.eigh(g)
    a = qa @ torch.diag(la.clamp_min(0)) @ qa.T
    g = qg @ torch.diag(lg.clamp_min(0)) @ qg.T
    return scale * torch.kron(g, a) + delta * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)


@pytest.mark.parametrize("rank_a", [None, 2])
def test_solve_equals_dense_solve(rank_a, generator):
    layers = [eigen_layer(5, 3, generator=generator, rank_a=rank_a), eigen_layer(4, 7, generator=generator)]
    scale = torch.tensor([0.7, 3.0], dtype=torch.float64)
    delta = torch.tensor([0.2, 1.5], dtype=torch.float64)
    rhs = [
        torch.randn(3, 5, dtype=torch.float64, generator=generator),
        torch.randn(2, 7, 4, dtype=torch.float64, generator=generator),
    ]
    result = ops.kron_solve(*(list(t) for t in zip(*[layer[:4] for layer in layers])), rhs, scale, delta)
    for i, ((*_, a, g), v, x) in enumerate(zip(layers, rhs, result)):
        p = dense_precision(a, g, scale[i], delta[i])
        expected = torch.linalg.solve(p, v.reshape(-1, p.shape[0]).T).T.reshape(v.shape)
        torch.testing.assert_close(x, expected)


def test_inverse_square_root_twice_is_the_solve(generator):
    qa, la, qg, lg, a, g = eigen_layer(6, 4, generator=generator, rank_a=3)
    scale, delta = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    v = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    half = ops.kron_solve([qa], [la], [qg], [lg], [v], scale, delta, -0.5)
    twice = ops.kron_solve([qa], [la], [qg], [lg], half, scale, delta, -0.5)[0]
    torch.testing.assert_close(twice, ops.kron_solve([qa], [la], [qg], [lg], [v], scale, delta)[0])
    p = dense_precision(a, g, 2.0, 0.3)
    torch.testing.assert_close(
        ops.kron_solve([qa], [la], [qg], [lg], [v], scale, delta, 1.0)[0].reshape(-1), p @ v.reshape(-1)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rhs_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(device, dtype, rhs_dtype, generator):
    qa, la, qg, lg, *_ = eigen_layer(31, 17, generator=generator)
    v = torch.randn(3, 17, 31, generator=generator).to(rhs_dtype)
    scale, delta = torch.tensor([1.5]), torch.tensor([0.05])
    exact = reference.kron_solve([qa], [la], [qg], [lg], [v], scale.double(), delta.double())[0]
    cast = [t.to(dtype) for t in (qa, la, qg, lg)]
    rounded = reference.kron_solve(*[[t] for t in cast], [v], scale, delta)[0]
    result = ops.kron_solve(*[[t.to(device)] for t in cast], [v.to(device)], scale.to(device), delta.to(device))[0]
    assert result.dtype == dtype
    assert_matches_float64(result, exact, rounded)


@given(
    d_a=st.sampled_from(PRIME_SIZES),
    d_g=st.sampled_from(PRIME_SIZES),
    batch=st.sampled_from([(), (1,), (2, 3)]),
    exponent=st.sampled_from([-1.0, -0.5, 1.0]),
    delta=st.sampled_from([0.0, 0.01, 2.0]),
    transposed=st.booleans(),
)
def test_property_odd_sizes_batches_and_layouts(d_a, d_g, batch, exponent, delta, transposed):
    qa, la, qg, lg, *_ = eigen_layer(d_a, d_g)
    if delta == 0.0 and exponent < 0:
        la, lg = la.clamp_min(0.1), lg.clamp_min(0.1)  # P must stay invertible
    v = (
        torch.randn(*batch, d_a, d_g, dtype=torch.float64).transpose(-1, -2)
        if transposed
        else torch.randn(*batch, d_g, d_a, dtype=torch.float64)
    )
    before = v.clone()
    args = (
        [qa],
        [la],
        [qg],
        [lg],
        [v],
        torch.tensor([1.3], dtype=torch.float64),
        torch.tensor([delta], dtype=torch.float64),
        exponent,
    )
    torch.testing.assert_close(ops.kron_solve(*args)[0], reference.kron_solve(*args)[0])
    assert torch.equal(v, before)


def test_opcheck():
    requires_extension()
    qa, la, qg, lg, *_ = eigen_layer(3, 2, dtype=torch.float32)
    args = ([qa], [la], [qg], [lg], [torch.randn(2, 3)], torch.tensor([1.0]), torch.tensor([0.1]), -1.0)
    torch.library.opcheck(torch.ops.fastlaplace.kron_solve.default, args)


def test_bad_inputs_name_the_argument():
    qa, la, qg, lg, *_ = eigen_layer(3, 2)
    ok = {"scale": torch.tensor([1.0], dtype=torch.float64), "delta": torch.tensor([0.1], dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"rhs\[0\] must have shape \(\*, 2, 3\)"):
        ops.kron_solve([qa], [la], [qg], [lg], [torch.randn(3, 2)], **ok)
    with pytest.raises(ValueError, match="delta must be non-negative"):
        ops.kron_solve(
            [qa], [la], [qg], [lg], [torch.randn(2, 3)], ok["scale"], torch.tensor([-1.0], dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="delta must be non-negative"):
        ops.kron_solve(
            [qa], [la], [qg], [lg], [torch.randn(2, 3)], ok["scale"], torch.tensor([float("nan")], dtype=torch.float64)
        )
    with pytest.raises(ValueError, match=r"scale must have one entry per layer \(1\)"):
        ops.kron_solve([qa], [la], [qg], [lg], [torch.randn(2, 3)], torch.ones(2), ok["delta"])
    with pytest.raises(ValueError, match=r"eigvecs_a\[0\] must have shape \(4, 4\)"):
        ops.kron_solve([qa], [torch.ones(4, dtype=torch.float64)], [qg], [lg], [torch.randn(2, 3)], **ok)
    with pytest.raises(TypeError, match=r"eigvals_g\[0\] is torch.float32 but eigvecs_g\[0\] is torch.float64"):
        ops.kron_solve([qa], [la], [qg], [lg.float()], [torch.randn(2, 3)], **ok)
    with pytest.raises(ValueError, match="one entry per layer"):
        ops.kron_solve([qa], [la], [qg], [lg], [], **ok)


# The CUDA kernel (four products of the fused tile kernel, csrc/engines/tile_gram.h) run on the host.


def emulated(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent, target_blocks):
    return emulated_op("_kron_solve_emulated", target_blocks)(
        eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent
    )


@settings(deadline=None, max_examples=30)
@given(
    sizes=st.lists(st.tuples(st.sampled_from([1, 5, TILE + 1]), st.sampled_from([1, 3, TILE])), min_size=1, max_size=3),
    batch=st.sampled_from([(), (2,)]),
    exponent=st.sampled_from([-1.0, -0.5, 1.0, 0.3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    column_major=st.booleans(),
    target_blocks=st.sampled_from([1, 10_000]),
)
def test_emulated_kernel_products_of_strided_views(sizes, batch, exponent, dtype, column_major, target_blocks):
    layers = [eigen_layer(d_a, d_g, rank_a=max(1, d_a // 2)) for d_a, d_g in sizes]  # rank-deficient A: clamped λ
    # torch.linalg.eigh returns column-major eigenvectors, as the fits do
    cast = [
        [(t.T.contiguous().T if column_major and t.dim() == 2 else t).to(dtype) for t in layer[:4]] for layer in layers
    ]
    eigvecs_a, eigvals_a, eigvecs_g, eigvals_g = (list(t) for t in zip(*cast, strict=True))
    rhs = [torch.randn(*batch, d_g, d_a, dtype=torch.float64).to(dtype) for d_a, d_g in sizes]
    scale = torch.rand(len(sizes), dtype=dtype) + 0.5
    delta = torch.rand(len(sizes), dtype=dtype) + 0.05
    result = emulated(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent, target_blocks)
    exact = reference.kron_solve(
        *[[t.double() for t in ts] for ts in (eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs)],
        scale.double(),
        delta.double(),
        exponent,
    )
    rounded = reference.kron_solve(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent)
    for got, want, own, v in zip(result, exact, rounded, rhs, strict=True):
        assert got.shape == v.shape and got.dtype == dtype
        assert_matches_float64(got, want, own)


def test_emulated_kernel_groups_layers_by_dtype_and_converts_rhs(generator):
    qa, la, qg, lg, *_ = eigen_layer(70, 9, generator=generator)
    v = torch.randn(9, 70, generator=generator).bfloat16()
    args = ([qa.float(), qa], [la.float(), la], [qg.float(), qg], [lg.float(), lg], [v, v.double()])
    scale, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.3])
    result = emulated(*args, scale, delta, -1.0, 1)
    assert [r.dtype for r in result] == [torch.float32, torch.float64]
    exact = reference.kron_solve(*[[t.double() for t in ts] for ts in args], scale.double(), delta.double())
    rounded = reference.kron_solve(*args, scale, delta)
    for got, want, own in zip(result, exact, rounded, strict=True):
        assert_matches_float64(got, want, own)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_agrees_with_the_emulation(dtype, generator):
    layers = [eigen_layer(d_a, d_g, generator=generator) for d_a, d_g in ((785, 512), (513, 10), (3, 2))]
    eigvecs_a, eigvals_a, eigvecs_g, eigvals_g = (
        [t.to(dtype) for t in ts] for ts in zip(*[layer[:4] for layer in layers])
    )
    rhs = [torch.randn(4, layer[2].shape[0], layer[0].shape[0], generator=generator).to(dtype) for layer in layers]
    scale, delta = torch.tensor([1.0, 2.0, 0.5], dtype=dtype), torch.tensor([0.1, 0.2, 1.0], dtype=dtype)
    for exponent in (-1.0, -0.5):
        expected = emulated(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent, 528)
        on_gpu = ops.kron_solve(
            *[[t.cuda() for t in ts] for ts in (eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs)],
            scale.cuda(),
            delta.cuda(),
            exponent,
        )
        relative = 1e-5 if dtype == torch.float32 else 1e-12
        for got, want in zip(on_gpu, expected, strict=True):
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=relative * want.abs().max().item())
