"""The same posterior as laplace-torch 0.3 (a test-only dependency) on the same model and data.

laplace-torch's Kron treats a bias as a block of its own, while fastlaplace appends a
ones column to the layer input (docs/design.md); the Kron comparison therefore uses bias-free
layers, the diagonal and full ones biases too.
"""

import warnings

import pytest
import torch
from laplace import Laplace as ReferenceLaplace
from laplace.curvature import BackPackGGN
from torch import nn

from fastlaplace import Laplace


def model_and_data(likelihood: str, bias: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (12,)) if likelihood == "classification" else torch.randn(12, 4, dtype=torch.float64)
    return model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_marglik_and_glm_covariance_agree(likelihood, subset, structure):
    model, loader = model_and_data(likelihood, bias=structure != "kron")
    sigma = 1.0 if likelihood == "classification" else 0.7
    options = {"sigma_noise": sigma, "prior_precision": 0.9, "temperature": 1.2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ReferenceLaplace(
            model, likelihood, subset_of_weights=subset, hessian_structure=structure, backend=BackPackGGN, **options
        )
        reference.fit(loader)
    ours = Laplace(model, likelihood, subset_of_weights=subset, hessian_structure=structure, **options)
    ours.fit(loader)
    torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood().detach())
    x = torch.randn(6, 3, dtype=torch.float64)
    mean, cov = ours.functional_variance(x)
    reference_mean, reference_cov = reference._glm_predictive_distribution(x)
    torch.testing.assert_close(mean, reference_mean.detach())
    torch.testing.assert_close(cov, reference_cov.detach())
    if likelihood == "classification":
        for link in ("probit", "bridge", "bridge_norm"):
            torch.testing.assert_close(ours(x, link_approx=link), reference(x, link_approx=link).detach())
        return
    # Regression calls: the covariance of f (no σ²), per output, or joint over the batch.
    for options in ({}, {"diagonal_output": True}, {"joint": True}):
        for got, want in zip(ours(x, **options), reference(x, **options), strict=True):
            torch.testing.assert_close(got, want.detach())


def test_subnetwork_agrees():
    model, loader = model_and_data("classification", bias=True)
    chosen = torch.tensor([1, 4, 9, 21, 22, 40, 43])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ReferenceLaplace(
            model,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="full",
            backend=BackPackGGN,
            subnetwork_indices=chosen,
            prior_precision=0.9,
        )
        reference.fit(loader)
    ours = Laplace(
        model,
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure="full",
        subnetwork_indices=chosen,
        prior_precision=0.9,
    )
    ours.fit(loader)
    torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood().detach())
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(ours.functional_variance(x)[1], reference._glm_predictive_distribution(x)[1].detach())
