"""The curvature pass of convnets runs no legacy-vmap fallback and gives the batched backward's results."""

import contextlib
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from resnets import cifar_resnet18, max_pooling_cnn
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import column_backward, statistics
from fastlaplace.curvature.column_backward import UNBATCHED_BACKWARD, UNBATCHED_NODES, batches_backward, falls_back

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


NODE_MAKERS = {
    "NativeLayerNormBackward0": lambda t: F.layer_norm(t, t.shape[-1:]),
    "NativeGroupNormBackward0": lambda t: F.group_norm(t, 2),
    "GeluBackward0": F.gelu,
    "TanhBackward0": torch.tanh,
    "SiluBackward0": F.silu,
    "EluBackward0": F.elu,
    "SoftplusBackward0": F.softplus,
    "LeakyReluBackward0": F.leaky_relu,
    "SoftmaxBackward0": lambda t: t.softmax(-1),
    "ScaledDotProductFlashAttentionForCpuBackward0": lambda t: F.scaled_dot_product_attention(t, t, t),
}


@pytest.mark.parametrize("node", sorted(UNBATCHED_NODES))
def test_every_listed_node_falls_back_under_the_batched_backward(node):
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    out = NODE_MAKERS[node](x) * 2
    assert out.grad_fn.next_functions[0][0].name() == node and falls_back(out)
    with fallbacks_raise(), pytest.raises(UserWarning, match=FALLBACK):
        torch.autograd.grad(out, x, torch.randn(3, *out.shape), is_grads_batched=True)


def test_a_graph_of_batched_ops_does_not_fall_back():
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    out = torch.sigmoid(torch.relu(x) @ x.transpose(-1, -2)).exp()
    assert not falls_back(out)
    with fallbacks_raise():
        torch.autograd.grad(out, x, torch.randn(3, *out.shape), is_grads_batched=True)


class TokenMixer(nn.Module):
    """A transformer's shape in miniature: Linear (and LayerNorm) over (N, T, d) tokens, mean-pooled."""

    def __init__(self, activation: nn.Module, norm: bool):
        super().__init__()
        self.up, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.norm, self.activation = nn.LayerNorm(8) if norm else nn.Identity(), activation

    def forward(self, tokens):
        return self.head(self.activation(self.norm(self.up(tokens))).mean(1))


@pytest.mark.parametrize(
    ("activation", "norm", "tokens", "parts"),
    [(nn.Tanh(), True, 32, 2), (nn.Tanh(), True, 16, 1), (nn.ReLU(), False, 32, 1)],
    ids=["falls-back-256-rows", "falls-back-128-rows", "batched-ops-256-rows"],
)
def test_a_backward_that_falls_back_goes_one_column_at_a_time_from_enough_rows(activation, norm, tokens, parts):
    """8 sequences of 32 tokens: 256 rows per column, plain backwards if the graph falls back."""
    torch.manual_seed(0)
    model = TokenMixer(activation, norm).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, tokens, 4, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    _, whole = statistics.layer_statistics(model, x, y, "classification")
    _, got = statistics.layer_statistic_parts(model, x, y, "classification")
    got = list(got)
    assert len(got) == parts
    for i, s in enumerate(whole):
        stacked = torch.cat([part[i].output_grads for part in got], dim=1)
        torch.testing.assert_close(stacked, s.output_grads, rtol=1e-13, atol=1e-15)


def test_an_mlp_of_batched_ops_keeps_the_batched_backward_at_any_rows():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(600, 3, dtype=torch.float64), torch.randint(0, 3, (600,))
    _, parts = statistics.layer_statistic_parts(model, x, y, "classification")
    assert len(list(parts)) == 1
    assert column_backward.PLAIN_BACKWARD_ROWS <= 600


def small_convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=2),
        nn.BatchNorm2d(2).eval(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 7 * 7, 4),
    ).double()


def test_parts_hold_one_column_each_and_stack_to_the_whole_batch_statistics():
    model = cifar_resnet18(width=2, classes=4).double().eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (3,), generator=generator)
    output, whole = statistics.layer_statistics(model, x, y, "classification")
    parted_output, parts = statistics.layer_statistic_parts(model, x, y, "classification")
    parts = list(parts)
    assert len(parts) == 3  # C - 1 columns, one plain backward each
    torch.testing.assert_close(parted_output, output, rtol=0, atol=0)
    for i, s in enumerate(whole):
        assert all(part[i].output_grads.shape[1] == 1 for part in parts)
        stacked = torch.cat([part[i].output_grads for part in parts], dim=1)
        torch.testing.assert_close(stacked, s.output_grads, rtol=1e-13, atol=1e-15)
        assert all(part[i].inputs is parts[0][i].inputs for part in parts)
        derived = parts[0][i].normalised_inputs if isinstance(s.module, nn.BatchNorm2d) else parts[0][i].patches
        first = derived()  # computed once, and kept for the other parts of the batch
        want = s.normalised_inputs() if isinstance(s.module, nn.BatchNorm2d) else s.patches()
        torch.testing.assert_close(first, want, rtol=0, atol=0)
        for part in parts:
            got = part[i].normalised_inputs() if isinstance(s.module, nn.BatchNorm2d) else part[i].patches()
            assert got is first


def test_a_model_with_a_batched_backward_comes_in_one_part():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    _, whole = statistics.layer_statistics(model, x, y, "classification")
    _, parts = statistics.layer_statistic_parts(model, x, y, "classification")
    (part,) = list(parts)
    for got, want in zip(part, whole, strict=True):
        torch.testing.assert_close(got.output_grads, want.output_grads, rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["diag", "full", "lowrank", "kron"])
def test_fits_in_parts_of_columns_equal_the_batched_backward(structure):
    """Every structure's fit adds each column part once and the batch's inputs and count once."""

    def fit(batched):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 4, (6,), generator=generator)
        options = {"low_rank": 20} if structure == "lowrank" else {}
        la = Laplace(small_convnet(), "classification", subset_of_weights="all", hessian_structure=structure, **options)
        forced = mock.patch.object(statistics, "batches_backward", lambda _: batched)
        with forced, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-vmap fallback's own warnings, off by default
            la.fit([(x[:4], y[:4]), (x[4:], y[4:])])
        return la

    def curvature(la):
        if structure == "lowrank":  # eigenvectors of equal eigenvalues are any basis of their space
            return [la.eigenvectors @ torch.diag(la.eigenvalues) @ la.eigenvectors.T]
        return la._curvature_tensors()

    parts, whole = fit(False), fit(True)
    assert parts.num_data == whole.num_data == 6
    for got, want in zip(curvature(parts), curvature(whole), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(parts.log_marginal_likelihood(), whole.log_marginal_likelihood())


def test_embedding_and_layer_norm_curvature_in_parts_of_columns_equal_the_whole_batch():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.norm, self.head = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(self.norm(self.embedding(ids)).mean(1))

    def fit(batched):
        torch.manual_seed(0)
        model = Tokens().double()
        ids = torch.randint(0, 7, (5, 6), generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(2))
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
        with mock.patch.object(statistics, "batches_backward", lambda _: batched):
            la.fit([(ids[:3], y[:3]), (ids[3:], y[3:])])
        return la

    parts, whole = fit(False), fit(True)
    assert torch.equal(parts.embedding_curvature.counts[0], whole.embedding_curvature.counts[0])
    for got, want in zip(parts._curvature_tensors(), whole._curvature_tensors(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_running_averages_refuse_a_later_part_of_a_batch():
    from fastlaplace.curvature import KronCurvature

    model = nn.Sequential(nn.Linear(3, 2))
    _, stats = statistics.layer_statistics(model, torch.randn(4, 3), torch.randint(0, 2, (4,)), "classification")
    curvature = KronCurvature(decay=0.9)
    curvature.update(stats)
    with pytest.raises(ValueError, match="decay=None"):
        curvature.update(stats, new_batch=False)
