"""Low-rank posterior against dense brute force: exact when the rank covers the GGN's."""

import math

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, layer_sizes, targets, tiny_cnn, tiny_mlp
from test_sequences import token_model
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import layer_statistics
from fastlaplace.curvature.products import ggn_matmul, jacobian_gram, jacobian_matmul
from fastlaplace.posterior.lowrank import nystrom_eigenpairs


def dense_prior(model, delta):
    """Per-parameter prior precision in [W | b] row-major order from a per-layer list."""
    return torch.cat([torch.full((n,), d, dtype=torch.float64) for n, d in zip(layer_sizes(model), delta)])


def flat_weights(model):
    return torch.cat(
        [torch.cat([m.weight.flatten(1), m.bias.unsqueeze(1)], 1).flatten() for m in model if hasattr(m, "weight")]
    ).detach()


def expected_evidence(model, x, y, likelihood, precision, prior, sigma=1.0):
    out = model(x).detach()
    if likelihood == "classification":
        log_lik = -nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        log_lik = -0.5 * (out - y).square().sum() / sigma**2 - out.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    theta = flat_weights(model)
    return log_lik - 0.5 * (torch.logdet(precision) - prior.log().sum() + (prior * theta.square()).sum())


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_full_rank_sketch_is_the_full_posterior(likelihood, generator):
    model = tiny_mlp(True)
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator)  # GGN rank <= 2 * 3
    y = targets(likelihood, 2, generator=generator)
    sigma = 0.6 if likelihood == "regression" else 1.0
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="lowrank",
        low_rank=6,
        prior_precision=torch.tensor([0.5, 2.0]),
        sigma_noise=sigma,
    )
    la.fit([(x[:1], y[:1]), (x[1:], y[1:])])
    prior = dense_prior(model, [0.5, 2.0])
    ggn = dense_ggn(model, x, likelihood)
    precision = ggn / sigma**2 + torch.diag(prior)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), expected_evidence(model, x, y, likelihood, precision, prior, sigma)
    )
    x_test = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))


def test_prior_per_parameter_and_last_layer(generator):
    model = tiny_mlp(True)
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 2, generator=generator)
    size = layer_sizes(model)[1]
    prior = torch.rand(size, dtype=torch.float64, generator=generator) + 0.5
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="lowrank", low_rank=6)
    la.prior_precision = prior  # named_parameters() order: W (row-major) then b
    la.fit([(x, y)])
    in_block_order = torch.cat([prior[:12].view(3, 4), prior[12:].unsqueeze(1)], 1).flatten()
    precision = dense_ggn(model, x, "classification")[-size:, -size:] + torch.diag(in_block_order)
    theta = flat_weights(model)[-size:]
    expected = -nn.functional.cross_entropy(model(x), y, reduction="sum").detach() - 0.5 * (
        torch.logdet(precision) - in_block_order.log().sum() + (in_block_order * theta.square()).sum()
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    x_test = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)[..., -size:]
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))


@pytest.mark.parametrize("make_model", [lambda: tiny_cnn(5), token_model], ids=["conv", "sequence"])
def test_shared_weight_layers(make_model, generator):
    model = make_model()
    shape = (1, 2, 5, 5) if isinstance(model[0], nn.Conv2d) else (1, 6, 3)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    y = targets("classification", 1, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="lowrank", low_rank=3)
    la.fit([(x, y)])
    ggn = dense_ggn(model, x, "classification")
    precision = ggn + torch.eye(ggn.shape[0], dtype=torch.float64)
    x_test = torch.randn(2, *shape[1:], dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))
    torch.testing.assert_close(la.log_det_posterior(la.prior_precision, la.sigma_noise), torch.logdet(precision))


def test_top_eigenpairs_of_a_larger_ggn(generator):
    model = tiny_mlp(True)
    x = torch.randn(40, 3, dtype=torch.float64, generator=generator)
    y = targets("regression", 40, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="lowrank", low_rank=4)
    la.fit([(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)])
    values, vectors = torch.linalg.eigh(dense_ggn(model, x, "regression"))
    top = values.flip(0)[:4]
    torch.testing.assert_close(la.eigenvalues, top, rtol=1e-3, atol=0)
    overlap = (vectors[:, -4:].T @ la.eigenvectors).abs().max(0).values
    assert (overlap > 0.99).all(), overlap


def test_products_equal_the_dense_jacobian_and_ggn(generator):
    model = tiny_cnn(5)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=generator)
    y = targets("classification", 3, generator=generator)
    _, stats = layer_statistics(model, x, y, "classification")
    sizes = layer_sizes(model)
    directions = torch.randn(2, sum(sizes), dtype=torch.float64, generator=generator)
    per_layer = [
        d.unflatten(-1, (s.module.weight.shape[0], -1)) for d, s in zip(directions.split(sizes, -1), stats, strict=True)
    ]
    product = torch.cat([p.flatten(1) for p in ggn_matmul(stats, per_layer)], 1)
    torch.testing.assert_close(product, directions @ dense_ggn(model, x, "classification"))
    from fastlaplace.curvature import output_jacobians

    _, jac_stats = output_jacobians(model, x)
    jac = augmented_jacobian(model, x)
    torch.testing.assert_close(jacobian_matmul(jac_stats, per_layer), jac @ directions.T)
    weights = [
        torch.rand(s.module.weight.shape[0], n // s.module.weight.shape[0], dtype=torch.float64)
        for s, n in zip(jac_stats, sizes, strict=True)
    ]
    flat = torch.cat([w.flatten() for w in weights])
    torch.testing.assert_close(jacobian_gram(jac_stats, weights), jac @ (flat.unsqueeze(1) * jac.mT))


def test_samples_have_the_posterior_covariance(generator):
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x = torch.randn(2, 2, dtype=torch.float64, generator=generator)
    y = targets("regression", 2, classes=2, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="lowrank", low_rank=4)
    la.prior_precision = 0.7
    la.fit([(x, y)])
    expected = torch.linalg.inv(dense_ggn(model, x, "regression") + 0.7 * torch.eye(12, dtype=torch.float64))
    draws = la.sample(40000, generator=torch.Generator().manual_seed(3))
    order = torch.cat([torch.tensor([0, 1, 3, 4, 2, 5]), torch.tensor([0, 1, 3, 4, 2, 5]) + 6])
    permutation = torch.empty_like(order)
    permutation[order] = torch.arange(12)
    covariance = torch.cov(draws[:, permutation].T)
    assert (covariance - expected).abs().max() < 0.05 * expected.abs().max()


def test_nystrom_of_zero_curvature(generator):
    basis = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64, generator=generator)).Q
    vectors, values = nystrom_eigenpairs(basis, torch.zeros(7, 3, dtype=torch.float64), 2)
    assert vectors.shape == (7, 2) and (values == 0).all()


def test_mc_fisher_passes_see_the_same_labels(generator):
    model = tiny_mlp(True)
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 2, generator=generator)
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="lowrank", low_rank=2, curvature_mode="mc"
    )
    la.fit([(x, y)])  # rank 2: exact if every pass saw the same sampled labels
    _, stats = layer_statistics(model, x, y, "classification", "mc", torch.Generator().manual_seed(0))
    grads = torch.cat([s.weight_gradients() for s in stats], -1).flatten(0, 1)
    torch.testing.assert_close(la.eigenvalues.sum(), grads.square().sum())


def test_bad_use_is_refused(generator):
    model = tiny_mlp(True)
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 2, generator=generator)
    with pytest.raises(ValueError, match="low_rank must be a positive integer"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="lowrank", low_rank=0)
    with pytest.raises(TypeError, match="low_rank applies to hessian_structure='lowrank' only"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", low_rank=3)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="lowrank")
    with pytest.raises(ValueError, match="not an iterator"):
        la.fit(iter([(x, y)]))
    la.fit([(x, y)])
    with pytest.raises(ValueError, match="cannot add data"):
        la.fit([(x, y)], override=False)
    la.prior_precision = 0.0
    with pytest.raises(ValueError, match="needs a positive prior precision"):
        la.log_marginal_likelihood()
