"""Activations written as chains of elementwise ops go back as one product per curvature column."""

import math
from unittest import mock

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from fastlaplace import Laplace
from fastlaplace.curvature import pointwise, statistics
from fastlaplace.curvature.pointwise import collapsed_pointwise_modules, elementwise_chain


class ComposedTanhGelu(nn.Module):
    """GPT-2's ``gelu_new`` as Hugging Face writes it: eight elementwise nodes."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class ComposedSilu(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class RowSum(nn.Module):
    def forward(self, x):
        return x * x.sum(-1, keepdim=True)


class Widened(nn.Module):
    def forward(self, x):
        return torch.exp(x[:, :1] * torch.ones(1, 3, dtype=x.dtype))


class ScaledByTrainable(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale  # a tensor requiring grad, not a parameter of this module

    def forward(self, x):
        return torch.tanh(x) * self.scale


def mlp(activation: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), activation, nn.Linear(16, 12), activation, nn.Linear(12, 4)).double()


def data(n: int = 40):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=generator)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


@pytest.mark.parametrize(
    ("module", "collapsed"),
    [
        (ComposedTanhGelu(), True),
        (ComposedSilu(), True),
        (nn.GELU(), False),  # one node: nothing to gain
        (nn.Softmax(-1), False),
        (RowSum(), False),
        (Widened(), False),
        (ScaledByTrainable(torch.tensor(2.0, dtype=torch.float64, requires_grad=True)), False),
    ],
    ids=["tanh-gelu", "silu", "native-gelu", "softmax", "row-sum", "widened", "trainable-scale"],
)
def test_only_shape_keeping_chains_of_elementwise_nodes_are_collapsed(module, collapsed):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for inner in (x, x * 2):  # a leaf input, and one made by an op
        output = module(inner)
        assert elementwise_chain(output, inner) is (collapsed and output.shape == inner.shape)


def test_hugging_face_python_activations_are_collapsed():
    x = torch.randn(3, 4, requires_grad=True) * 1
    for name in ("gelu_new", "gelu_fast", "quick_gelu"):
        assert elementwise_chain(ACT2FN[name](x), x), name


@pytest.mark.parametrize("module", [ComposedTanhGelu(), ComposedSilu()], ids=["tanh-gelu", "silu"])
def test_collapsed_backward_of_every_column_equals_the_chain_s(module):
    x0 = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    x = torch.sinh(x0)
    columns = torch.randn(3, 6, 7, dtype=torch.float64)
    expected = [torch.autograd.grad(module(x), x0, c, retain_graph=True)[0] for c in columns]
    collapsed = pointwise._collapse(module, (x,), module(x))
    torch.testing.assert_close(collapsed, module(x), rtol=0, atol=0)
    got = [torch.autograd.grad(collapsed, x0, c, retain_graph=True)[0] for c in columns]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-14)
    batched = pointwise._collapse(module, (x,), module(x))
    (got_batched,) = torch.autograd.grad(batched, x0, columns, is_grads_batched=True)
    torch.testing.assert_close(got_batched, torch.stack(expected), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("batched", [True, False], ids=["batched-backward", "plain-backwards"])
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_fit_with_collapsed_activation_equals_the_fit_with_the_native_one(structure, batched):
    composed, native = mlp(ComposedSilu()), mlp(nn.SiLU())
    calls = mock.patch.object(pointwise._Pointwise, "times", autospec=True, side_effect=pointwise._Pointwise.times)
    route = mock.patch.object(statistics._ColumnPass, "one_column_at_a_time", lambda self, model: not batched)
    fits = []
    for model in (composed, native):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        with calls as times, route:
            la.fit(data())
        fits.append((la, times.call_count))
    (got, collapsed_calls), (expected, native_calls) = fits
    # plain backwards: C - 1 = 3 columns per batch through 2 activations; batched: one call per activation and batch
    assert collapsed_calls == (2 * 2 if batched else 3 * 2 * 2) and native_calls == 0
    torch.testing.assert_close(got.log_marginal_likelihood(), expected.log_marginal_likelihood(), rtol=1e-12, atol=0)
    if structure == "kron":
        pairs = zip(
            [*got.curvature.input_factors, *got.curvature.output_factors],
            [*expected.curvature.input_factors, *expected.curvature.output_factors],
            strict=True,
        )
    else:
        pairs = zip(got._curvature_tensors(), expected._curvature_tensors(), strict=True)
    for g, e in pairs:
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_hooks_are_removed_even_when_the_forward_raises():
    model = mlp(ComposedTanhGelu())
    with pytest.raises(RuntimeError, match="broken"), collapsed_pointwise_modules(model):
        raise RuntimeError("broken")
    assert all(not m._forward_hooks for m in model.modules())
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(data())
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("enable_backprop", [False, True], ids=["predictive", "differentiable-predictive"])
def test_glm_predictive_with_collapsed_activation_equals_the_native_one(enable_backprop):
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    results = []
    for model in (mlp(ComposedTanhGelu()), mlp(nn.GELU(approximate="tanh"))):
        la = Laplace(
            model, "classification", subset_of_weights="all", hessian_structure="kron", enable_backprop=enable_backprop
        )
        la.fit(data())
        mean, variance = la.functional_variance(x)
        gradient = torch.autograd.grad(variance.sum(), x)[0] if enable_backprop else None
        results.append((mean, variance, gradient))
    (mean, variance, gradient), (expected_mean, expected_variance, expected_gradient) = results
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-10, atol=1e-14)
    if enable_backprop:  # the variance's gradient needs f'' of the activation: no shortcut under create_graph
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-14)
