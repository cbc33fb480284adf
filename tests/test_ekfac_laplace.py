"""EKFAC posterior: its eigenvalues S against the dense curvature rotated into the Kronecker eigenbasis, and the
evidence, GLM predictive, samples and state of ``Q diag(s S + δ) Qᵀ`` against dense brute force."""

import math

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, layer_sizes, targets, tiny_cnn, tiny_mlp
from torch import nn

from fastlaplace import Laplace
from fastlaplace.posterior import EKFACLaplace, KronLaplace


class TokenModel(nn.Module):
    """Linear layers on a (N, T, 3) sequence, averaged over the tokens, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tokens(x)).mean(1))


MODELS = {
    "mlp": (lambda: tiny_mlp(True), (3,)),
    "sequence": (lambda: TokenModel().double(), (5, 3)),
    "cnn": (lambda: tiny_cnn(5), (2, 5, 5)),
}


def loader(x, y, batch=3):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]


def data(shape, n, likelihood, generator):
    return torch.randn(n, *shape, dtype=torch.float64, generator=generator), targets(likelihood, n, generator=generator)


def eigenbases(la):
    qa, _, qg, _ = la.eigendecomposition()
    return [torch.kron(g, a) for a, g in zip(qa, qg, strict=True)]


def dense_blocks(matrix, sizes):
    blocks, start = [], 0
    for n in sizes:
        blocks.append(matrix[start : start + n, start : start + n])
        start += n
    return blocks


def dense_empirical_fisher(model, x, y, likelihood):
    out = model(x).detach()
    if likelihood == "classification":
        residual = out.softmax(-1) - nn.functional.one_hot(y, out.shape[1]).double()
    else:
        residual = out - y
    jac = augmented_jacobian(model, x)
    return torch.einsum("ncp,nc,nd,ndq->pq", jac, residual, residual, jac)


def dense_precision(la, scale, deltas):
    """``blockdiag_l(Q_l diag(s S_l + δ_l) Q_lᵀ)`` from the posterior's eigenbasis and S."""
    blocks = [
        q @ torch.diag(scale * s.flatten() + d) @ q.T
        for q, s, d in zip(eigenbases(la), la.eigenvalue_corrections, deltas, strict=True)
    ]
    return torch.block_diag(*blocks)


def log_likelihood(model, x, y, likelihood, sigma, temperature):
    out = model(x).detach()
    if likelihood == "classification":
        return -nn.functional.cross_entropy(out, y, reduction="sum") / temperature
    value = -0.5 * (out - y).square().sum() / (sigma**2 * temperature)
    return value - out.numel() * math.log(sigma * math.sqrt(2 * math.pi))


def augmented_weights(la):
    return torch.cat([w.flatten() for w in la.layer_weights()])


@pytest.mark.parametrize("mode", ["ggn", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", list(MODELS))
def test_eigenvalues_are_the_dense_curvature_diagonal_in_the_kron_eigenbasis(name, likelihood, mode, generator):
    make, shape = MODELS[name]
    model = make()
    x, y = data(shape, 7, likelihood, generator)
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="ekfac", curvature_mode=mode)
    la.fit(loader(x, y))
    curvature = dense_ggn(model, x, likelihood) if mode == "ggn" else dense_empirical_fisher(model, x, y, likelihood)
    blocks = dense_blocks(curvature, layer_sizes(model))
    for q, block, s in zip(eigenbases(la), blocks, la.eigenvalue_corrections, strict=True):
        torch.testing.assert_close(s.flatten(), (q.T @ block @ q).diagonal())


def test_reduced_sequence_factors_give_their_own_eigenbasis_and_the_same_diagonal_rule(generator):
    model = TokenModel().double()
    x, y = data((5, 3), 7, "classification", generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac", kfac_approx="reduce")
    la.fit(loader(x, y))
    blocks = dense_blocks(dense_ggn(model, x, "classification"), layer_sizes(model))
    for q, block, s in zip(eigenbases(la), blocks, la.eigenvalue_corrections, strict=True):
        torch.testing.assert_close(s.flatten(), (q.T @ block @ q).diagonal())


def test_last_layer_eigenvalues_from_the_softmax_closed_form_equal_the_dense_ones(generator):
    model = tiny_mlp(True)
    x, y = data((3,), 7, "classification", generator)
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="ekfac")
    la.fit(loader(x, y))
    block = dense_blocks(dense_ggn(model, x, "classification"), layer_sizes(model))[-1]
    (q,) = eigenbases(la)
    torch.testing.assert_close(la.eigenvalue_corrections[0].flatten(), (q.T @ block @ q).diagonal())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_one_datum_at_one_location_gives_the_kron_eigenvalue_products(name, generator):
    make, shape = MODELS[name]
    model = make()
    x, y = data(shape, 1, "classification", generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    la.fit([(x, y)])
    _, la_a, _, la_g = la.eigendecomposition()
    for i, (a, g, s) in enumerate(zip(la_a, la_g, la.eigenvalue_corrections, strict=True)):
        if la.curvature.locations[i] == 1:  # the Linear layers; a Conv2d sees several locations
            torch.testing.assert_close(s, torch.outer(g.clamp_min(0), a.clamp_min(0)), atol=1e-12, rtol=1e-9)
    if name == "mlp":
        kron = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
        kron.fit([(x, y)])
        torch.testing.assert_close(la.log_marginal_likelihood(), kron.log_marginal_likelihood())


@pytest.mark.parametrize("name", list(MODELS))
def test_frobenius_error_to_the_dense_block_is_at_most_krons(name, generator):
    make, shape = MODELS[name]
    model = make()
    x, y = data(shape, 7, "classification", generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    la.fit(loader(x, y))
    blocks = dense_blocks(dense_ggn(model, x, "classification"), layer_sizes(model))
    improved = 0
    for i, (q, block, s) in enumerate(zip(eigenbases(la), blocks, la.eigenvalue_corrections, strict=True)):
        a, g = la.curvature.input_factors[i], la.curvature.output_factors[i]
        kron_error = torch.linalg.norm(block - torch.kron(g, a) / (7 * la.curvature.locations[i]))
        ekfac_error = torch.linalg.norm(block - q @ torch.diag(s.flatten()) @ q.T)
        assert ekfac_error <= kron_error * (1 + 1e-10)
        improved += bool(ekfac_error < (1 - 1e-3) * kron_error)  # strictly better, beyond rounding
    assert improved >= 1


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", list(MODELS))
def test_evidence_and_glm_covariance_equal_the_dense_ekfac_precision(name, likelihood, generator):
    make, shape = MODELS[name]
    model = make()
    x, y = data(shape, 7, likelihood, generator)
    sigma, temperature = (0.7 if likelihood == "regression" else 1.0), 1.3
    deltas = [0.5, 2.0]
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="ekfac",
        sigma_noise=sigma,
        temperature=temperature,
        prior_precision=torch.tensor(deltas),
    )
    la.fit(loader(x, y))
    precision = dense_precision(la, 1 / (sigma**2 * temperature), deltas)
    delta = torch.cat([torch.full((n,), d, dtype=torch.float64) for n, d in zip(layer_sizes(model), deltas)])
    theta = augmented_weights(la)
    evidence = log_likelihood(model, x, y, likelihood, sigma, temperature) - 0.5 * (
        torch.logdet(precision) - delta.log().sum() + (delta * theta.square()).sum()
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence)
    x_test = torch.randn(4, *shape, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    mean, covariance = la.functional_variance(x_test)
    expected = jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    torch.testing.assert_close(covariance, expected)
    torch.testing.assert_close(la.functional_variance_diagonal(x_test)[1], expected.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(mean, model(x_test).detach())
    _, joint = la.functional_covariance(x_test)
    flat = jac.flatten(0, 1)
    torch.testing.assert_close(joint, flat @ torch.linalg.solve(precision, flat.T))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_last_layer_evidence_and_variances_equal_the_dense_ekfac_precision(likelihood, generator):
    model = tiny_mlp(True)
    x, y = data((3,), 7, likelihood, generator)
    la = Laplace(model, likelihood, subset_of_weights="last_layer", hessian_structure="ekfac", prior_precision=0.8)
    la.fit(loader(x, y))
    precision = dense_precision(la, 1.0, [0.8])
    theta = augmented_weights(la)
    evidence = log_likelihood(model, x, y, likelihood, 1.0, 1.0) - 0.5 * (
        torch.logdet(precision) - theta.numel() * math.log(0.8) + 0.8 * theta.square().sum()
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence)
    x_test = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)[:, :, -theta.numel() :]
    expected = jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    torch.testing.assert_close(la.functional_variance(x_test)[1], expected)
    torch.testing.assert_close(la.functional_variance_diagonal(x_test)[1], expected.diagonal(dim1=1, dim2=2))


def test_evidence_gradient_in_the_prior_and_noise_equals_the_dense_one(generator):
    model = tiny_mlp(True)
    x, y = data((3,), 7, "regression", generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="ekfac")
    la.fit(loader(x, y))
    deltas = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(la.log_marginal_likelihood(deltas, sigma), (deltas, sigma))
    delta = torch.cat([d.expand(n) for n, d in zip(layer_sizes(model), deltas)])
    precision = dense_precision(la, 1 / sigma.square(), delta.split(layer_sizes(model)))
    theta = augmented_weights(la)
    out = model(x).detach()
    log_lik = -0.5 * (out - y).square().sum() / sigma.square() - out.numel() * (sigma * math.sqrt(2 * math.pi)).log()
    evidence = log_lik - 0.5 * (torch.logdet(precision) - delta.log().sum() + (delta * theta.square()).sum())
    expected = torch.autograd.grad(evidence, (deltas, sigma))
    torch.testing.assert_close(got, expected)
    la.optimize_prior_precision(n_steps=30)
    assert la.log_marginal_likelihood() > la.log_marginal_likelihood(torch.ones(2, dtype=torch.float64))


def test_samples_have_the_dense_ekfac_covariance(generator):
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x, y = data((2,), 3, "regression", generator)
    y = y[:, :2]
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="ekfac", prior_precision=0.7)
    la.fit([(x, y)])
    precision = dense_precision(la, 1.0, [0.7, 0.7])
    draws = la.sample(40000, generator=torch.Generator().manual_seed(3))
    # named_parameters() order: W then b per layer; the dense posterior is in [W | b] row-major order.
    order = torch.cat([torch.tensor([0, 1, 3, 4, 2, 5]), torch.tensor([0, 1, 3, 4, 2, 5]) + 6])
    permutation = torch.empty_like(order)
    permutation[order] = torch.arange(12)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(draws.mean(0), theta, atol=0.03, rtol=0)
    covariance = torch.cov(draws[:, permutation].T)
    expected = torch.linalg.inv(precision)
    assert (covariance - expected).abs().max() < 0.05 * expected.abs().max()


def test_state_dict_round_trip_and_checked_load(generator):
    model = tiny_mlp(True)
    x, y = data((3,), 8, "classification", generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    la.fit(loader(x, y))
    la.optimize_prior_precision(n_steps=20)
    state = la.state_dict()
    restored = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(restored(x), la(x))
    for s, t in zip(restored.eigenvalue_corrections, la.eigenvalue_corrections, strict=True):
        torch.testing.assert_close(s, t)
    with pytest.raises(ValueError, match="not a KronLaplace"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron").load_state_dict(state)
    target = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    negative = {**state, "curvature": [-state["curvature"][0], *state["curvature"][1:]]}
    with pytest.raises(ValueError, match="eigenvalue corrections must be non-negative"):
        target.load_state_dict(negative)
    misshapen = {**state, "curvature": [state["curvature"][0][:, :2], *state["curvature"][1:]]}
    with pytest.raises(ValueError, match=r"eigenvalue corrections of layer '0' have shape \(4, 2\)"):
        target.load_state_dict(misshapen)
    assert not target._fitted


def test_a_failed_fit_leaves_an_earlier_fit_intact(generator):
    model = tiny_mlp(True)
    x, y = data((3,), 8, "classification", generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    la.fit(loader(x, y))
    x_test = x[:3]
    before = (la.log_marginal_likelihood(), la.functional_variance(x_test)[1], la.eigenvalue_corrections)
    other_x, other_y = data((3,), 6, "classification", generator)
    with pytest.raises(ValueError, match="0 data on its second pass and 6 on its first.*one-shot iterator"):
        la.fit(iter(loader(other_x, other_y)))  # exhausted by the first pass
    with pytest.raises(ValueError, match=r"fit\(override=False\) is not available for EKFAC"):
        la.fit(loader(other_x, other_y), override=False)
    torch.testing.assert_close(la.log_marginal_likelihood(), before[0])
    torch.testing.assert_close(la.functional_variance(x_test)[1], before[1])
    assert la.eigenvalue_corrections is before[2]
    fresh = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    with pytest.raises(ValueError, match="second pass"):
        fresh.fit(iter(loader(other_x, other_y)))
    with pytest.raises(RuntimeError, match="call fit"):
        fresh.log_marginal_likelihood()


def test_options_are_validated():
    with pytest.raises(TypeError, match="damping applies to hessian_structure='kron' only"):
        Laplace(tiny_mlp(True), "classification", hessian_structure="ekfac", damping=True)
    with pytest.raises(ValueError, match="damping=True .* has no EKFAC form"):
        EKFACLaplace(tiny_mlp(True), "classification", damping=True)
    assert isinstance(Laplace(tiny_mlp(True), "classification", hessian_structure="ekfac"), KronLaplace)


def test_truncated_factors_keep_kron_eigenvalues(generator):
    model = tiny_mlp(True)
    x, y = data((3,), 8, "classification", generator)
    posteriors = [
        Laplace(model, "classification", hessian_structure=s, max_dense_factor=4, factor_rank=5)
        for s in ("kron", "ekfac")
    ]
    for la in posteriors:
        la.fit(loader(x, y))
    kron, ek = posteriors
    assert ek._truncated(0) and ek.eigenvalue_corrections[0].numel() == 0
    torch.testing.assert_close(ek.log_marginal_likelihood(), kron.log_marginal_likelihood())
    torch.testing.assert_close(ek.functional_variance(x[:3])[1], kron.functional_variance(x[:3])[1])
    state = ek.state_dict()
    restored = Laplace(model, "classification", hessian_structure="ekfac", max_dense_factor=4, factor_rank=5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.log_marginal_likelihood(), ek.log_marginal_likelihood())
    forged = {**state, "curvature": [torch.ones(3, 5, dtype=torch.float64), *state["curvature"][1:]]}
    with pytest.raises(ValueError, match="has truncated factors and so no eigenvalue corrections"):
        restored.load_state_dict(forged)


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(self.norm(self.embedding(ids)).mean(1))


def test_embedding_and_layernorm_keep_their_kron_blocks(generator):
    model = EmbeddingModel().double()
    ids, y = torch.tensor([[3]]), torch.tensor([1])  # one datum of one token: Kron is exact, EKFAC equals it
    posteriors = [
        Laplace(model, "classification", subset_of_weights="all", hessian_structure=s) for s in ("kron", "ekfac")
    ]
    for la in posteriors:
        la.fit([(ids, y)])
    torch.testing.assert_close(posteriors[1].log_marginal_likelihood(), posteriors[0].log_marginal_likelihood())
    torch.testing.assert_close(posteriors[1](ids), posteriors[0](ids))
