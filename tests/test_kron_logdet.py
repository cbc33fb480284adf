"""kron_logdet: log det (s kron(G, A) + δ I) per layer, and its gradient in s and δ."""

import pytest
import torch
from conftest import DEVICES, PRIME_SIZES, assert_matches_float64, eigen_layer, requires_extension
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
