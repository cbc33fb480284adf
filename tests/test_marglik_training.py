"""marglik_training: the prior precision and noise follow the evidence while the network trains."""

import math

import pytest
import torch
from torch import nn

from fastlaplace.marglik import marglik_training


def sine_data(generator, noise=0.3):
    x = torch.rand(128, 1, generator=generator) * 6 - 3
    y = torch.sin(x) + noise * torch.randn(128, 1, generator=generator)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]


def test_regression_learns_the_noise_and_improves_the_evidence(generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    loader = sine_data(generator)
    la, trained, margliks, losses = marglik_training(
        model,
        loader,
        "regression",
        hessian_structure="kron",
        optimizer_kwargs={"lr": 1e-2},
        n_epochs=200,
        marglik_frequency=20,
        n_hypersteps=30,
    )
    assert trained is model and len(losses) == 200 and len(margliks) == 10 * 30
    assert margliks[-1] < margliks[0], "the negative log evidence must fall"
    assert 0.15 < float(la.sigma_noise) < 0.6, f"σ={float(la.sigma_noise)} should approach the true 0.3"
    assert la.prior_precision.shape == (2,) and not torch.allclose(la.prior_precision, torch.ones(2))
    assert math.isfinite(la.log_marginal_likelihood().item())


@pytest.mark.parametrize(
    ("structure", "prior_structure"), [("diag", "diag"), ("kron", "scalar"), ("full", "layerwise")]
)
def test_classification_runs_with_each_prior_structure(structure, prior_structure, generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(60, 2, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = [(x[:30], y[:30]), (x[30:], y[30:])]
    la, _, margliks, losses = marglik_training(
        model,
        loader,
        hessian_structure=structure,
        prior_structure=prior_structure,
        optimizer_kwargs={"lr": 0.05},
        n_epochs=6,
        marglik_frequency=2,
    )
    assert len(margliks) == 3 * 10 and all(math.isfinite(m) for m in margliks)
    assert losses[-1] < losses[0]
    expected = {"diag": (sum(p.numel() for p in model.parameters()),), "scalar": (2,), "layerwise": (2,)}  # per layer
    assert la.prior_precision.shape == expected[prior_structure]


def test_bad_arguments_are_refused(generator):
    model = nn.Sequential(nn.Linear(2, 3))
    loader = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ValueError, match="prior_structure must be one of"):
        marglik_training(model, loader, prior_structure="blockwise")
    with pytest.raises(ValueError, match="prior_structure=.diag. needs a structure with a prior per parameter"):
        marglik_training(model, loader, hessian_structure="kron", prior_structure="diag", n_epochs=1)


def test_an_empty_loader_is_refused():
    with pytest.raises(ValueError, match="the loader yielded no data"):
        marglik_training(nn.Sequential(nn.Linear(2, 3)), [], n_epochs=1)


def test_dropout_trains_on_while_the_posteriors_are_fitted_in_eval_mode(generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model[0].eval()  # a module's own mode is given back as it was
    x = torch.randn(60, 2, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    masks_drawn = []
    model[2].register_forward_hook(lambda m, i, out: masks_drawn.append(m.training))
    la, _, margliks, _ = marglik_training(model, [(x, y)], n_epochs=2, optimizer_kwargs={"lr": 0.05})
    assert any(masks_drawn) and not all(masks_drawn)  # dropout on in the epochs, off in the fits
    assert model.training and model[2].training and not model[0].training
    assert all(math.isfinite(m) for m in margliks)
    with pytest.raises(ValueError, match=r"module '2' \(Dropout, p=0.5\) is in training mode"):
        la(x)
    model.eval()
    assert torch.equal(la(x), la(x))
