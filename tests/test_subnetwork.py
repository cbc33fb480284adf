"""Subnetwork selection helpers: the same indices as laplace-torch's masks, usable by Laplace(...)."""

import pytest
import torch
from dense import targets, tiny_mlp
from laplace.utils import LargestMagnitudeSubnetMask, ModuleNameSubnetMask, ParamNameSubnetMask
from torch import nn

from fastlaplace import Laplace, subnetwork


def test_largest_magnitude_equals_laplace_torch():
    model = tiny_mlp(True)
    expected = LargestMagnitudeSubnetMask(model, n_params_subnet=9).select()
    torch.testing.assert_close(subnetwork.largest_magnitude(model, 9), expected)


def test_names_equal_laplace_torch():
    model = tiny_mlp(True)
    torch.testing.assert_close(subnetwork.by_name(model, ["2"]), ModuleNameSubnetMask(model, ["2"]).select())
    expected = ParamNameSubnetMask(model, ["0.bias", "2.weight"]).select()
    torch.testing.assert_close(subnetwork.by_name(model, ["0.bias", "2.weight"]), expected)
    with pytest.raises(ValueError, match="did you mean '2.weight'"):
        subnetwork.by_name(model, ["2.weights"])


def test_largest_variance_picks_the_largest_diagonal_posterior_variances(generator):
    model = tiny_mlp(True)
    x = torch.randn(10, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 10, generator=generator)
    chosen = subnetwork.largest_variance(model, "classification", [(x, y)], 6, prior_precision=2.0)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", prior_precision=2.0)
    la.fit([(x, y)])
    variances = la._to_parameter_order([p.reciprocal() for p in la.posterior_precision()])
    assert chosen.tolist() == sorted(torch.argsort(variances, descending=True)[:6].tolist())
    subnet = Laplace(
        model, "classification", subset_of_weights="subnetwork", hessian_structure="full", subnetwork_indices=chosen
    )
    subnet.fit([(x, y)])
    assert torch.isfinite(subnet.log_marginal_likelihood())


def test_indices_skip_frozen_layers_and_check_their_count():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert subnetwork.largest_magnitude(model, 10).max() < 10  # only the last layer's 8 + 2 parameters count
    with pytest.raises(ValueError, match=r"n_params must be an integer in \[1, 10\]"):
        subnetwork.largest_magnitude(model, 11)
