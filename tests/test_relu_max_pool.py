"""Max-pooling of a ReLU module's output goes back to the ReLU's input in one step, with the same gradients."""

from unittest import mock

import pytest
import torch
from resnets import max_pooling_cnn
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import relu_max_pool
from fastlaplace.curvature.relu_max_pool import relu_max_pool_folded


class ReluUsedTwice(nn.Module):
    """The ReLU's output is pooled and also added back after upsampling (a second path through the ReLU)."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.relu, self.pool = nn.ReLU(), pool

    def forward(self, x):
        r = self.relu(x)
        pooled = self.pool(r)
        return pooled + r.mean((-1, -2), keepdim=True)


POOLS = [
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, stride=2, padding=1),
    nn.MaxPool2d(2, stride=1, dilation=2),
    nn.MaxPool2d(3, stride=2, ceil_mode=True),
]


def folded_calls():
    return mock.patch.object(
        relu_max_pool._MaxPoolOfRelu, "backward", side_effect=relu_max_pool._MaxPoolOfRelu.backward
    )


@pytest.mark.parametrize("pool", POOLS, ids=["2x2", "3x3-s2-p1", "dilated", "ceil"])
@pytest.mark.parametrize("used_twice", [False, True], ids=["pooled-only", "used-twice"])
def test_every_column_s_gradient_equals_the_unfolded_backward(pool, used_twice):
    module = ReluUsedTwice(pool) if used_twice else nn.Sequential(nn.ReLU(), pool)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 9, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    x = x0 - 0.8  # most windows hold negatives, some only negatives: ties at 0 after the ReLU
    expected_output = module(x)
    columns = torch.randn(5, *expected_output.shape, generator=generator, dtype=torch.float64)
    expected = [torch.autograd.grad(expected_output, x0, c, retain_graph=True)[0] for c in columns]
    with relu_max_pool_folded(module), folded_calls() as calls:
        output = module(x)
        got = [torch.autograd.grad(output, x0, c, retain_graph=True)[0] for c in columns]
    assert calls.call_count == len(columns)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2)),  # no tensor before an in-place ReLU
        nn.Sequential(nn.Tanh(), nn.MaxPool2d(2)),
        nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 1e9), nn.MaxPool2d(2)),  # the pool's input is not the ReLU's output
        nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True)),
    ],
    ids=["inplace-relu", "tanh", "between", "return-indices"],
)
def test_other_modules_before_the_pool_are_left_alone(module):
    x = torch.randn(2, 3, 6, 6, requires_grad=True) * 1
    with relu_max_pool_folded(module), folded_calls() as calls:
        output = module(x)
        output = output[0] if isinstance(output, tuple) else output
        output.sum().backward()
    assert calls.call_count == 0


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_convnet_fit_with_the_fold_equals_the_fit_without(structure):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=generator)
    fits = []
    for fold in (True, False):
        la = Laplace(max_pooling_cnn().double(), "classification", subset_of_weights="all", hessian_structure=structure)
        unfolded = mock.patch.object(relu_max_pool, "MAX_POOL_NODE", relu_max_pool.MAX_POOL_NODE if fold else "none")
        with unfolded, folded_calls() as calls:
            la.fit([(x[:3], y[:3]), (x[3:], y[3:])])
        fits.append((la, calls.call_count))
    (got, folded), (expected, unfolded) = fits
    assert folded == 2 * 9 * 2 and unfolded == 0  # 2 pools, 9 columns, 2 batches
    for g, e in zip(got._curvature_tensors(), expected._curvature_tensors(), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)
    assert all(not m._forward_hooks for m in got.model.modules())
