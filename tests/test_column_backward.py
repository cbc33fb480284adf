"""The curvature pass of convnets runs no legacy-vmap fallback and gives the batched backward's results."""

import contextlib
import warnings
from unittest import mock

import pytest
import torch
from resnets import cifar_resnet18, max_pooling_cnn
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import statistics
from fastlaplace.curvature.column_backward import UNBATCHED_BACKWARD, batches_backward

FALLBACK = "There is a performance drop because we have not yet implemented the batching rule"


@contextlib.contextmanager
def fallbacks_raise():
    """Turn torch's legacy-vmap fallback warning (off unless asked for) into an error."""
    before = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=FALLBACK)
            yield
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(before)


def kron_fit(model: nn.Module, batched: bool | None = None) -> Laplace:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=generator)
    la = Laplace(model.double(), "classification", subset_of_weights="all", hessian_structure="kron")
    forced = mock.patch.object(statistics, "batches_backward", lambda _: batched) if batched is not None else None
    with forced if forced is not None else contextlib.nullcontext():
        la.fit([(x[:3], y[:3]), (x[3:], y[3:])])
    return la


@pytest.mark.parametrize("make_model", [max_pooling_cnn, lambda: cifar_resnet18(width=4)], ids=["cnn", "resnet18"])
def test_convnet_fit_runs_no_vmap_fallback_and_equals_the_batched_backward(make_model):
    with fallbacks_raise():
        la = kron_fit(make_model())
    with fallbacks_raise(), pytest.raises(UserWarning, match=FALLBACK):  # the batched backward this replaces
        kron_fit(make_model(), batched=True)
    batched = kron_fit(make_model(), batched=True)
    for got, expected in zip(la.curvature.output_factors, batched.curvature.output_factors, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got, expected in zip(la.curvature.input_factors, batched.curvature.input_factors, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got, expected in zip(la.unitwise_curvature.blocks, batched.unitwise_curvature.blocks, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(2, 2, 3),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2),
        nn.AdaptiveMaxPool2d(1),
        nn.BatchNorm2d(2).eval(),
        nn.ZeroPad2d(1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_listed_module_falls_back_under_the_batched_backward(module):
    assert isinstance(module, UNBATCHED_BACKWARD)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    out = module(x)
    with fallbacks_raise(), pytest.raises(UserWarning, match=FALLBACK):
        torch.autograd.grad(out, x, torch.randn(3, *out.shape), is_grads_batched=True)


def test_an_mlp_keeps_the_batched_backward():
    assert batches_backward(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 2)))
    assert not batches_backward(max_pooling_cnn())
