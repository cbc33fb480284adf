"""A (C,) per-output sigma_noise for multi-output regression: in H, in the evidence and in predict."""

import math

import pytest
import torch
from dense import augmented_jacobian, tiny_mlp
from test_lowrank import flat_weights

from fastlaplace import Laplace

SIGMA = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


@pytest.mark.parametrize("structure", ["diag", "full", "kron", "lowrank"])
def test_evidence_and_predictive_equal_the_dense_posterior(structure, generator):
    model = tiny_mlp(True)
    x = torch.randn(1, 3, dtype=torch.float64, generator=generator)  # one datum: Kron exact, rank 3
    y = torch.randn(1, 3, dtype=torch.float64, generator=generator)
    options = {"low_rank": 3} if structure == "lowrank" else {}
    la = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure=structure, sigma_noise=SIGMA, **options
    )
    la.fit([(x, y)])
    jac = augmented_jacobian(model, x)
    ggn = torch.einsum("ncp,c,ncq->pq", jac, SIGMA.pow(-2), jac)
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    elif structure == "kron":
        ggn = torch.block_diag(ggn[:16, :16], ggn[16:, 16:])
    precision = ggn + torch.eye(ggn.shape[0], dtype=torch.float64)
    residual = model(x).detach() - y
    log_lik = -0.5 * (residual / SIGMA).square().sum() - torch.log(SIGMA * math.sqrt(2 * math.pi)).sum()
    theta = flat_weights(model)
    expected = log_lik - 0.5 * (torch.logdet(precision) + theta @ theta)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    x_test = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    jac_test = augmented_jacobian(model, x_test)
    cov = jac_test @ torch.linalg.solve(precision, jac_test.mT)
    torch.testing.assert_close(la(x_test)[1], cov)
    torch.testing.assert_close(la.predict(x_test)[1], (cov.diagonal(dim1=1, dim2=2) + SIGMA**2).sqrt())


def test_prior_tuning_works_and_the_noise_is_fixed_by_the_fit(generator):
    model = tiny_mlp(True)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron", sigma_noise=SIGMA)
    la.fit([(x, y)])
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(n_steps=50)
    assert la.log_marginal_likelihood().item() > before
    with pytest.raises(ValueError, match="a per-output sigma_noise is part of the fitted curvature"):
        la.log_marginal_likelihood(sigma_noise=SIGMA * 2)
    wrong = Laplace(model, "regression", subset_of_weights="all", sigma_noise=SIGMA[:2])
    with pytest.raises(ValueError, match="noise has 2 entries but the model has 3 outputs"):
        wrong.fit([(x, y)])
    with pytest.raises(ValueError, match=r"sigma_noise must be a scalar, or \(C,\) per output for regression"):
        Laplace(model, "classification", sigma_noise=SIGMA)
    with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
        Laplace(model, "regression", sigma_noise=-SIGMA)
