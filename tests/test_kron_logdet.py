"""kron_logdet: log det (s kron(G, A) + δ I) per layer, and its gradient in s and δ."""

import pytest
import torch
from conftest import (
    CUDA_REASON,
    DEVICES,
    PRIME_SIZES,
    assert_matches_float64,
    eigen_layer,
    emulated_op,
    requires_extension,
)
from hypothesis import given
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def dense_logdet(a, g, scale, delta):
    la, qa = torch.linalg.eigh(a)
    lg, qg = torch.linalg.eigh(g)
    a = qa @ torch.diag(la.clamp_min(0)) @ qa.T
    g = qg @ torch.diag(lg.clamp_min(0)) @ qg.T
    return torch.logdet(scale * torch.kron(g, a) + delta * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype))


def test_equals_dense_logdet_and_its_gradient(generator):
    layers = [eigen_layer(4, 3, generator=generator, rank_a=2), eigen_layer(5, 2, generator=generator)]
    scale = torch.tensor([0.5, 4.0], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([0.3, 1.0], dtype=torch.float64, requires_grad=True)
    result = ops.kron_logdet([layer[1] for layer in layers], [layer[3] for layer in layers], scale, delta)
    dense = torch.stack([dense_logdet(layer[4], layer[5], scale[i], delta[i]) for i, layer in enumerate(layers)])
    torch.testing.assert_close(result, dense)
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64)
    got = torch.autograd.grad((result * weights).sum(), (scale, delta))
    want = torch.autograd.grad((dense * weights).sum(), (scale, delta))
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want)


def test_gradcheck_in_scale_and_delta(generator):
    _, la, _, lg, *_ = eigen_layer(3, 4, generator=generator)
    scale = torch.tensor([0.9], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, d: ops.kron_logdet([la], [lg], s, d), (scale, delta))


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_float64_on_large_layers(device, generator):
    _, la, _, lg, *_ = eigen_layer(300, 200, generator=generator)
    scale, delta = torch.tensor([2.0]), torch.tensor([1e-3])
    exact = reference.kron_logdet([la], [lg], scale.double(), delta.double())
    rounded = reference.kron_logdet([la.float()], [lg.float()], scale, delta)
    result = ops.kron_logdet([la.float().to(device)], [lg.float().to(device)], scale.to(device), delta.to(device))
    assert result.dtype == torch.float32
    assert_matches_float64(result, exact, rounded)


@given(
    d_a=st.sampled_from(PRIME_SIZES),
    d_g=st.sampled_from(PRIME_SIZES),
    delta=st.sampled_from([1e-6, 0.5, 10.0]),
    scale=st.sampled_from([0.0, 1.0, 100.0]),
    strided=st.booleans(),
)
def test_property_odd_sizes(d_a, d_g, delta, scale, strided):
    _, la, _, lg, *_ = eigen_layer(d_a, d_g)
    if strided:
        la = torch.stack([la, la]).T[:, 0]
    args = ([la], [lg], torch.tensor([scale], dtype=torch.float64), torch.tensor([delta], dtype=torch.float64))
    torch.testing.assert_close(ops.kron_logdet(*args), reference.kron_logdet(*args))


def test_opcheck_with_gradients():
    requires_extension()
    _, la, _, lg, *_ = eigen_layer(3, 2, dtype=torch.float32)
    scale = torch.tensor([1.0], requires_grad=True)
    delta = torch.tensor([0.1], requires_grad=True)
    torch.library.opcheck(torch.ops.fastlaplace.kron_logdet.default, ([la], [lg], scale, delta))


def test_bad_inputs_name_the_argument():
    _, la, _, lg, *_ = eigen_layer(3, 2)
    with pytest.raises(ValueError, match="scale must be non-negative"):
        ops.kron_logdet([la], [lg], torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"eigvals_a\[0\] is torch.float64 but eigvals_g\[0\] is torch.float32"):
        ops.kron_logdet([la], [lg.float()], torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match=r"eigvals_a\[0\] must have 1 dimensions"):
        ops.kron_logdet([la[None]], [lg], torch.ones(1), torch.ones(1))


# The CUDA kernel's blocks (csrc/engines/kron_logdet_blocks.h) run on the host: a block takes at least
# 256 threads x 16 entries, a layer at most 1,024 blocks.
ENTRIES_PER_BLOCK = 256 * 16


def emulated(eigvals_a, eigvals_g, scale, delta):
    return emulated_op("_kron_logdet_emulated")(eigvals_a, eigvals_g, scale, delta)


@given(
    sizes=st.lists(
        st.tuples(st.sampled_from([0, 1, 7, 64, 257]), st.sampled_from([0, 1, 13, 64, 300])), min_size=1, max_size=4
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_emulated_kernel_over_layers_of_one_and_many_blocks(sizes, dtype):
    eigvals_a = [(torch.rand(n, dtype=torch.float64) - 0.1).to(dtype) for n, _ in sizes]  # some negative: clamped
    eigvals_g = [torch.rand(n, dtype=torch.float64).to(dtype) for _, n in sizes]
    scale = torch.rand(len(sizes), dtype=torch.float64) + 0.5
    delta = torch.rand(len(sizes), dtype=torch.float64) + 1e-3
    result = emulated(eigvals_a, eigvals_g, scale, delta)
    exact = reference.kron_logdet([a.double() for a in eigvals_a], [g.double() for g in eigvals_g], scale, delta)
    rounded = reference.kron_logdet(eigvals_a, eigvals_g, scale.to(dtype), delta.to(dtype))
    assert result.dtype == dtype
    assert_matches_float64(result, exact, rounded)


def test_emulated_kernel_caps_the_blocks_of_a_large_layer_and_keeps_nan(generator):
    """4M entries take more than 1,024 blocks' worth, so each thread strides over several; NaN stays NaN."""
    la = torch.rand(2048, dtype=torch.float64, generator=generator)
    lg = torch.rand(2049, dtype=torch.float64, generator=generator)
    assert la.numel() * lg.numel() > 1024 * ENTRIES_PER_BLOCK
    broken = lg.clone()
    broken[5] = float("nan")
    scale, delta = torch.ones(2, dtype=torch.float64), torch.full((2,), 0.1, dtype=torch.float64)
    result = emulated([la, la], [lg, broken], scale, delta)
    exact = reference.kron_logdet([la], [lg], scale[:1], delta[:1])
    torch.testing.assert_close(result[:1], exact, rtol=1e-13, atol=0)
    assert torch.isnan(result[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_agrees_with_the_emulation(dtype, generator):
    sizes = [(2049, 1000), (0, 5), (7, 1), (4609, 512)]
    eigvals_a = [torch.rand(n, dtype=torch.float64, generator=generator).to(dtype) for n, _ in sizes]
    eigvals_g = [torch.rand(n, dtype=torch.float64, generator=generator).to(dtype) for _, n in sizes]
    scale = torch.full((4,), 2.0, dtype=dtype)
    delta = torch.full((4,), 1e-2, dtype=dtype)
    expected = emulated(eigvals_a, eigvals_g, scale, delta)
    result = ops.kron_logdet([a.cuda() for a in eigvals_a], [g.cuda() for g in eigvals_g], scale.cuda(), delta.cuda())
    # The same sums in the same order: only the GPU's and the host's float64 logs differ.
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
