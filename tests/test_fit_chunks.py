"""A fit splits batches whose curvature columns would be too large, into parts that give the same posterior."""

import pytest
import torch
from dense import targets
from resnets import cifar_resnet18
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import memory
from fastlaplace.posterior.parametric import ParametricLaplace


def counted_passes(monkeypatch) -> list[int]:
    """The batch size of every curvature pass the fits below make."""
    sizes = []
    for method in ("_batch_statistics", "_batch_statistic_parts"):  # the fit's pass, and EKFAC's second one
        original = getattr(ParametricLaplace, method)

        def counting(self, x, y, generator, original=original):
            sizes.append(y.shape[0])
            return original(self, x, y, generator)

        monkeypatch.setattr(ParametricLaplace, method, counting)
    return sizes


@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag"])
def test_a_resnet_fitted_in_parts_of_batches_equals_the_whole_batch_fit(structure, generator, monkeypatch):
    model = cifar_resnet18(width=2, classes=3).double().eval()
    x = torch.randn(7, 3, 32, 32, dtype=torch.float64, generator=generator)
    y = targets("classification", 7, generator=generator)
    sizes = counted_passes(monkeypatch)
    posteriors = []
    for budget in (1 << 40, 1):  # whole batches, then one sample per pass
        monkeypatch.setattr(memory, "CURVATURE_PASS_BYTES", budget)
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=2.0)
        la.fit([(x[:5], y[:5]), (x[5:], y[5:])])
        posteriors.append(la)
    passes = 2 if structure == "ekfac" else 1
    assert sizes == [5, 2] * passes + [1] * 7 * passes
    whole, parts = posteriors
    for got, want in zip(parts._curvature_tensors(), whole._curvature_tensors(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.log_marginal_likelihood(), whole.log_marginal_likelihood())
    assert parts.num_data == whole.num_data == 7
    assert parts.loss == pytest.approx(whole.loss, rel=1e-12)


def test_a_last_layer_keeps_whole_batches(generator, monkeypatch):
    monkeypatch.setattr(memory, "CURVATURE_PASS_BYTES", 1)
    sizes = counted_passes(monkeypatch)
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=generator)
    y = targets("classification", 6, generator=generator)
    model = cifar_resnet18(width=2, classes=3).double().eval()
    Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="diag").fit([(x, y)])
    assert sizes == [6]


class RandomMask(nn.Module):
    """Multiplies by a random 0/1 mask: random, yet no Dropout module to refuse by its type."""

    def forward(self, x):
        return x * (torch.rand_like(x) > 0.5)


def test_pass_estimate_is_the_graph_and_the_columns_held_and_refuses_a_random_model(generator):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(10, 4, generator=generator)
    # The graph saves the sample's input (4 floats) and the tanh's output (5, the last layer's input too);
    # the columns reach the first layer's 5 float32 outputs (the last layer's are the output).
    graph = (4 + 5) * 4
    assert memory.pass_bytes_per_sample(model, x, [model[0], model[2]], None) == graph + 3 * 5 * 4  # all 3 columns
    assert memory.pass_bytes_per_sample(model, x, [model[0], model[2]], 1) == graph + 5 * 4  # one at a time
    noisy = nn.Sequential(nn.Linear(4, 5), RandomMask(), nn.Tanh(), nn.Linear(5, 3))
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="the model's forward draws random numbers"):  # refused, as by a fit
        memory.pass_bytes_per_sample(noisy, x, [noisy[0]], 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert memory.pass_bytes_per_sample(model, {"x": x}, [model[0]], None) == 0  # dict batches are not split
