"""Linear layers applied to every token of a sequence: exact structures and the two K-FAC variants."""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, layer_sizes, targets
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import KronCurvature, layer_statistics


class MeanOverTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


def token_model(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), MeanOverTokens(), nn.Linear(4, classes)).double()


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_exact_structures_equal_the_dense_ggn(structure, generator):
    model = token_model()
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 5, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=1.0)
    la.fit([(x, y)])
    ggn = dense_ggn(model, x, "classification")
    curvature = torch.diag(ggn.diagonal()) if structure == "diag" else ggn
    precision = curvature + torch.eye(ggn.shape[0], dtype=torch.float64)
    x_test = torch.randn(2, 6, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(
        la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    )


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kron_glm_covariance_uses_the_factors_it_reports(kfac_approx, generator):
    model = token_model()
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", kfac_approx=kfac_approx)
    la.fit([(x, targets("classification", 4, generator=generator))])
    c = la.curvature
    assert c.locations == ([5, 1] if kfac_approx == "expand" else [1, 1])
    blocks = [torch.kron(g, a) / (c.num_data * n) for a, g, n in zip(c.input_factors, c.output_factors, c.locations)]
    precision = torch.block_diag(*blocks) + torch.eye(sum(layer_sizes(model)), dtype=torch.float64)
    x_test = torch.randn(3, 5, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(
        la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    )


def test_reduce_averages_inputs_and_sums_output_gradients(generator):
    model = token_model()
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 4, generator=generator)
    _, stats = layer_statistics(model, x, y, "classification")
    kron = KronCurvature("reduce")
    kron.update(stats)
    first = stats[0]
    a = torch.cat([first.inputs, torch.ones(4, 5, 1, dtype=torch.float64)], -1).mean(1)
    g = first.output_grads.sum(2).flatten(0, 1)
    torch.testing.assert_close(kron.input_factors[0], a.T @ a)
    torch.testing.assert_close(kron.output_factors[0], g.T @ g)


def test_one_token_expand_and_reduce_agree(generator):
    model = token_model()
    x = torch.randn(3, 1, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 3, generator=generator)
    marglik = []
    for approx in ("expand", "reduce"):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", kfac_approx=approx)
        la.fit([(x, y)])
        marglik.append(la.log_marginal_likelihood())
    torch.testing.assert_close(marglik[0], marglik[1])


def test_kfac_approx_is_validated():
    with pytest.raises(ValueError, match="kfac_approx must be 'expand' or 'reduce'"):
        Laplace(token_model(), "classification", subset_of_weights="all", kfac_approx="mean")
    with pytest.raises(TypeError, match="kfac_approx applies to hessian_structure='kron' or 'ekfac' only"):
        Laplace(
            token_model(), "classification", subset_of_weights="all", hessian_structure="diag", kfac_approx="reduce"
        )
