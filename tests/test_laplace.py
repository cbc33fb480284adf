"""Laplace posteriors against dense brute force on tiny networks."""

import math

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, layer_sizes, targets, tiny_mlp
from torch import nn

from fastlaplace import Laplace


def loader(x, y, batch=3):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]


def augmented_weights(model):
    parts = []
    for module in model:
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            if module.bias is not None:
                w = torch.cat([w, module.bias.detach().unsqueeze(-1)], dim=-1)
            parts.append(w.flatten())
    return torch.cat(parts)


def dense_posterior(model, x, y, likelihood, structure, sigma, temperature, delta_per_layer):
    """Dense P, log-likelihood and per-parameter prior precision of the same posterior."""
    ggn = dense_ggn(model, x, likelihood)
    sizes = layer_sizes(model)
    delta = torch.cat([torch.full((n,), d, dtype=torch.float64) for n, d in zip(sizes, delta_per_layer)])
    if structure == "diag":
        curvature = torch.diag(ggn.diagonal())
    elif structure == "full":
        curvature = ggn
    else:  # Kron is exact for one datum: the dense block diagonal of the GGN
        curvature = torch.block_diag(*[b[:, start : start + b.shape[0]] for b, start in _blocks(ggn, sizes)])
    precision = curvature / (sigma**2 * temperature) + torch.diag(delta)
    out = model(x).detach()
    if likelihood == "classification":
        log_lik = -nn.functional.cross_entropy(out, y, reduction="sum") / temperature
    else:
        log_lik = -0.5 * (out - y).square().sum() / (sigma**2 * temperature)
        log_lik = log_lik - out.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    return precision, log_lik, delta


def _blocks(matrix, sizes):
    start = 0
    for n in sizes:
        yield matrix[start : start + n], start
        start += n


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_marglik_and_glm_covariance_equal_dense(likelihood, structure, generator):
    model = tiny_mlp(True)
    n = 1 if structure == "kron" else 7  # Kron is exact for a single datum
    x = torch.randn(n, 3, dtype=torch.float64, generator=generator)
    y = targets(likelihood, n, generator=generator)
    sigma = 0.7 if likelihood == "regression" else 1.0
    delta = [0.5, 2.0]
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        sigma_noise=sigma,
        temperature=1.3,
        prior_precision=torch.tensor(delta),
    )
    la.fit(loader(x, y))
    precision, log_lik, delta_full = dense_posterior(model, x, y, likelihood, structure, sigma, 1.3, delta)
    theta = augmented_weights(model)
    expected = log_lik - 0.5 * (torch.logdet(precision) - delta_full.log().sum() + (delta_full * theta.square()).sum())
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    x_test = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    mean, cov = la.functional_variance(x_test)
    torch.testing.assert_close(cov, jac @ torch.linalg.solve(precision, jac.transpose(1, 2)))
    torch.testing.assert_close(mean, model(x_test).detach())


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_last_layer_posterior_equals_dense_over_the_last_layer(structure, generator):
    model = tiny_mlp(True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 6, generator=generator)
    la = Laplace(
        model, "classification", subset_of_weights="last_layer", hessian_structure=structure, prior_precision=0.8
    )
    la.fit(loader(x, y))
    features = torch.cat([torch.tanh(model[0](x)), torch.ones(6, 1, dtype=torch.float64)], 1).detach()
    if structure == "kron":
        a, g = la.curvature.input_factors[0], la.curvature.output_factors[0]
        curvature = torch.kron(g, a) / 6
    else:
        ggn = dense_ggn(model, x, "classification")
        size = layer_sizes(model)[1]
        curvature = torch.diag(ggn.diagonal()[-size:])
    precision = curvature + 0.8 * torch.eye(curvature.shape[0], dtype=torch.float64)
    x_test = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    phi = torch.cat([torch.tanh(model[0](x_test)), torch.ones(3, 1, dtype=torch.float64)], 1).detach()
    jac = torch.stack([torch.kron(torch.eye(3, dtype=torch.float64), p.unsqueeze(0)) for p in phi])  # (N, C, C*d_A)
    _, cov = la.functional_variance(x_test)
    torch.testing.assert_close(cov, jac @ torch.linalg.solve(precision, jac.transpose(1, 2)))
    assert features.shape == (6, 5)


def test_prior_optimisation_reaches_a_stationary_point_of_the_evidence(generator):
    model = tiny_mlp(True)
    x = torch.randn(20, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 20, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=1.0)
    la.fit(loader(x, y, 8))
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(n_steps=300, lr=0.1)
    after = la.log_marginal_likelihood().item()
    assert after > before
    delta = la.prior_precision.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(la.log_marginal_likelihood(delta), delta)
    assert gradient.abs().max() * delta.detach().abs().max() < 1e-2, "d evidence / d log δ should vanish at the optimum"


def test_regression_predict_and_classification_entropy(generator):
    model = tiny_mlp(True, classes=2)
    x = torch.randn(10, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(10, 2, dtype=torch.float64, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag", sigma_noise=0.3)
    la.fit(loader(x, y))
    mean, std = la.predict(x)
    _, cov = la.functional_variance(x)
    torch.testing.assert_close(std, (cov.diagonal(dim1=1, dim2=2) + 0.09).sqrt())
    torch.testing.assert_close(mean, model(x).detach())
    classifier = tiny_mlp(True)
    labels = targets("classification", 10, generator=generator)
    lc = Laplace(classifier, "classification", subset_of_weights="all", hessian_structure="kron")
    lc.fit(loader(x, labels))
    probs = lc(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10, dtype=torch.float64))
    entropy = lc.predictive_entropy(x)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    map_probs = classifier(x).detach().softmax(-1)
    map_entropy = -(map_probs * map_probs.log()).sum(-1)
    assert torch.all(entropy >= map_entropy - 1e-12), "the probit predictive is less confident than the MAP"


def test_fit_without_override_adds_data(generator):
    model = tiny_mlp(True)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 8, generator=generator)
    whole = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    whole.fit(loader(x, y))
    parts = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    parts.fit(loader(x[:5], y[:5]))
    parts.fit(loader(x[5:], y[5:]), override=False)
    torch.testing.assert_close(parts.log_marginal_likelihood(), whole.log_marginal_likelihood())


def test_misspelt_argument_names_the_closest():
    with pytest.raises(TypeError, match="did you mean 'subset_of_weights'"):
        Laplace(tiny_mlp(True), "classification", subset_ofweights="all")
    with pytest.raises(ValueError, match="did you mean 'kron'"):
        Laplace(tiny_mlp(True), "classification", hessian_structure="kronn")


def test_unavailable_combination_says_what_is_available():
    with pytest.raises(ValueError, match="hessian_structure='kron' is not available yet; available: all/kron"):
        Laplace(tiny_mlp(True), "classification", subset_of_weights="subnetwork", hessian_structure="kron")


@pytest.mark.parametrize(
    ("make_data", "message"),
    [
        (lambda: [], "the loader yielded no batch"),
        (
            lambda: [(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 5]))],
            r"class labels must lie in \[0, 3\)",
        ),
        (
            lambda: [(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, 3))],
            r"classification targets must be \(2,\)",
        ),
    ],
)
def test_bad_data_is_refused(make_data, message):
    la = Laplace(tiny_mlp(True), "classification", subset_of_weights="all", hessian_structure="kron")
    with pytest.raises(ValueError, match=message):
        la.fit(make_data())


def test_regression_targets_of_the_wrong_shape_are_refused():
    la = Laplace(tiny_mlp(True), "regression", subset_of_weights="all", hessian_structure="diag")
    with pytest.raises(ValueError, match=r"regression targets must be \(2, C\)"):
        la.fit([(torch.randn(2, 3, dtype=torch.float64), torch.randn(2))])


def test_predict_before_fit_and_negative_prior_are_refused():
    la = Laplace(tiny_mlp(True), "classification", subset_of_weights="all", hessian_structure="kron")
    with pytest.raises(RuntimeError, match=r"call fit\(loader\) before"):
        la(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prior_precision must be non-negative"):
        la.prior_precision = -1.0
    with pytest.raises(ValueError, match="sigma_noise must be 1 for classification"):
        Laplace(tiny_mlp(True), "classification", sigma_noise=2.0)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_samples_have_the_posterior_mean_and_covariance(structure, generator):
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x = torch.randn(1, 2, dtype=torch.float64, generator=generator)
    y = targets("classification", 1, classes=2, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=0.7)
    la.fit([(x, y)])
    precision, _, _ = dense_posterior(model, x, y, "classification", structure, 1.0, 1.0, [0.7, 0.7])
    draws = la.sample(40000, generator=torch.Generator().manual_seed(3))
    # named_parameters() order: W then b per layer; the dense posterior is in [W | b] row-major order.
    order = torch.cat([torch.tensor([0, 1, 3, 4, 2, 5]), torch.tensor([0, 1, 3, 4, 2, 5]) + 6])
    permutation = torch.empty_like(order)
    permutation[order] = torch.arange(12)
    in_dense_order = draws[:, permutation]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(draws.mean(0), theta, atol=0.03, rtol=0)
    covariance = torch.cov(in_dense_order.T)
    expected = torch.linalg.inv(precision)
    assert (covariance - expected).abs().max() < 0.05 * expected.abs().max()


def test_mc_link_and_sampled_network_match_their_definitions(generator):
    model = tiny_mlp(True)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 8, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron", prior_precision=2.0)
    la.fit(loader(x, y))
    mean, cov = la.functional_variance(x[:2])
    logits = torch.distributions.MultivariateNormal(mean, cov).sample((40000,))
    expected = logits.softmax(-1).mean(0)
    torch.testing.assert_close(la(x[:2], link_approx="mc", n_samples=40000), expected, atol=5e-3, rtol=0)
    # The last layer enters the output linearly: the sampled network is the GLM in distribution.
    torch.testing.assert_close(la(x[:2], pred_type="nn", n_samples=40000), expected, atol=5e-3, rtol=0)


@pytest.mark.parametrize("structure", ["diag", "kron", "full", "lowrank"])
def test_state_dict_round_trip_and_mismatch(structure, generator):
    model = tiny_mlp(True)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 8, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader(x, y))
    la.optimize_prior_precision(n_steps=20)
    restored = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    restored.load_state_dict(la.state_dict())
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(restored(x), la(x))
    other = Laplace(tiny_mlp(True, classes=2), "classification", subset_of_weights="all", hessian_structure=structure)
    with pytest.raises(ValueError, match="the state was saved for layers"):
        other.load_state_dict(la.state_dict())
    wrong = "kron" if structure != "kron" else "diag"
    with pytest.raises(ValueError, match="not a"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure=wrong).load_state_dict(
            la.state_dict()
        )


def test_progress_bar_on_request(generator, capsys):
    model = tiny_mlp(True)
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(loader(x, targets("classification", 4, generator=generator)), progress_bar=True)
    assert "fitting the Laplace curvature" in capsys.readouterr().err


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_gridsearch_picks_the_prior_with_the_lowest_validation_nll(likelihood, generator):
    model = tiny_mlp(True)
    x = torch.randn(12, 3, dtype=torch.float64, generator=generator)
    y = targets(likelihood, 12, generator=generator)
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="kron")
    la.fit(loader(x[:8], y[:8]))
    grid = [1e-3, 0.3, 30.0]
    nll = []
    for delta in grid:
        la.prior_precision = delta
        if likelihood == "classification":
            nll.append(-la(x[8:]).gather(1, y[8:].unsqueeze(1)).log().sum().item())
        else:
            mean, cov = la(x[8:])  # the covariance of f: add σ² for y
            var = cov.diagonal(dim1=1, dim2=2) + la.sigma_noise**2
            nll.append(-torch.distributions.Normal(mean, var.sqrt()).log_prob(y[8:]).sum().item())
    la.optimize_prior_precision(method="gridsearch", val_loader=loader(x[8:], y[8:]), grid=grid)
    assert la.prior_precision.unique().item() == grid[nll.index(min(nll))]
    with pytest.raises(ValueError, match="needs a val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="method must be 'marglik' or 'gridsearch'"):
        la.optimize_prior_precision(method="cv")


class DictModel(nn.Module):
    """A HuggingFace-style model: takes the whole batch dict."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp(True)

    def forward(self, batch):
        return self.net(batch["features"])


def test_dict_batches_give_the_posterior_of_pair_batches(generator):
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 6, generator=generator)
    model = DictModel()
    from_dicts = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron", dict_key_x="features"
    )
    from_dicts.fit([{"features": x[:4], "labels": y[:4]}, {"features": x[4:], "labels": y[4:]}])
    from_pairs = Laplace(model.net, "classification", subset_of_weights="all", hessian_structure="kron")
    from_pairs.fit(loader(x, y, 4))
    torch.testing.assert_close(from_dicts.log_marginal_likelihood(), from_pairs.log_marginal_likelihood())
    torch.testing.assert_close(from_dicts({"features": x}), from_pairs(x))
    with pytest.raises(ValueError, match="dict_key_y='labels'"):
        from_dicts.fit([{"features": x, "target": y}])
    default_key = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    with pytest.raises(ValueError, match="dict_key_x='input_ids'"):
        default_key.fit([{"features": x, "labels": y}])


def test_classification_predict_gives_probit_probabilities_and_sampled_spread(generator):
    model = tiny_mlp(True)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=0.5)
    la.fit(loader(x, targets("classification", 5, generator=generator)))
    probs, std = la.predict(x[:2], n_samples=40000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(probs, la(x[:2]))
    mean, cov = la.functional_variance(x[:2])
    draws = torch.distributions.MultivariateNormal(mean, cov).sample((40000,)).softmax(-1)
    torch.testing.assert_close(std, draws.std(0), atol=3e-3, rtol=0)
    assert torch.all(std > 0)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_prior_precision_per_parameter_equals_dense(structure, generator):
    model = tiny_mlp(True)
    x = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 7, generator=generator)
    params = sum(p.numel() for p in model.parameters())
    delta_named_order = torch.rand(params, dtype=torch.float64, generator=generator) + 0.1
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader(x, y))
    ggn = dense_ggn(model, x, "classification")
    curvature = torch.diag(ggn.diagonal()) if structure == "diag" else ggn
    # named_parameters() order (W then b per layer) to the dense [W | b] row-major order
    w0, b0, w1, b1 = delta_named_order.split([12, 4, 12, 3])
    delta = torch.cat(
        [torch.cat([w0.view(4, 3), b0[:, None]], 1).flatten(), torch.cat([w1.view(3, 4), b1[:, None]], 1).flatten()]
    )
    precision = curvature + torch.diag(delta)
    out = model(x).detach()
    theta = augmented_weights(model)
    expected = -nn.functional.cross_entropy(out, y, reduction="sum") - 0.5 * (
        torch.logdet(precision) - delta.log().sum() + (delta * theta.square()).sum()
    )
    torch.testing.assert_close(la.log_marginal_likelihood(delta_named_order), expected)
    la.prior_precision = delta_named_order
    x_test = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(
        la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    )
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(n_steps=50)
    assert la.prior_precision.shape == (params,) and la.log_marginal_likelihood().item() > before


def test_kron_refuses_a_prior_per_parameter():
    la = Laplace(tiny_mlp(True), "classification", subset_of_weights="all", hessian_structure="kron")
    with pytest.raises(ValueError, match=r"one entry per layer \(2\), got shape \(31,\)"):
        la.prior_precision = torch.ones(31, dtype=torch.float64)


def test_subnetwork_posterior_equals_the_dense_block_of_its_parameters(generator):
    model = tiny_mlp(True)
    x = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 7, generator=generator)
    chosen = torch.tensor([0, 5, 13, 15, 16, 29, 30])  # named_parameters() order: W0 (12), b0 (4), W1 (12), b1 (3)
    la = Laplace(
        model, "classification", subset_of_weights="subnetwork", hessian_structure="full", subnetwork_indices=chosen
    )
    la.fit(loader(x, y))
    # the same parameters in the dense [W | b] row-major order
    w0, b0, w1, b1 = torch.arange(31).split([12, 4, 12, 3])
    order = torch.cat(
        [torch.cat([w0.view(4, 3), b0[:, None]], 1).flatten(), torch.cat([w1.view(3, 4), b1[:, None]], 1).flatten()]
    )
    positions = torch.tensor([int((order == i).nonzero()) for i in chosen]).sort().values
    ggn = dense_ggn(model, x, "classification")[positions][:, positions]
    precision = ggn + torch.eye(7, dtype=torch.float64)
    theta = augmented_weights(model)[positions]
    log_lik = -nn.functional.cross_entropy(model(x), y, reduction="sum").detach()
    expected = log_lik - 0.5 * (torch.logdet(precision) + theta @ theta)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    x_test = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)[:, :, positions]
    torch.testing.assert_close(
        la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    )
    draws = la.sample(5, generator=generator)
    unchosen = torch.ones(31, dtype=torch.bool)
    unchosen[chosen] = False
    theta_named = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(draws[:, unchosen], theta_named[unchosen].expand(5, -1))
    with pytest.raises(TypeError, match="subnetwork_indices is needed with"):
        Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="full")
    with pytest.raises(ValueError, match=r"subnetwork_indices must lie in \[0, 31\)"):
        Laplace(
            model, "classification", subset_of_weights="subnetwork", hessian_structure="full", subnetwork_indices=[40]
        )


def test_full_predictive_follows_a_changed_prior(generator):
    model = tiny_mlp(True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 6, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=1.0)
    la.fit(loader(x, y))
    la(x)  # computes and caches the factorisation for prior 1
    la.prior_precision = 5.0
    fresh = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=5.0)
    fresh.fit(loader(x, y))
    torch.testing.assert_close(la(x), fresh(x))


def test_kron_damping_adds_the_prior_to_each_factor(generator):
    model = tiny_mlp(True)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    y = targets("regression", 5, generator=generator)
    la = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure="kron", damping=True, prior_precision=0.3
    )
    la.fit([(x, y)])
    scale = la._scale(la.sigma_noise)
    blocks = []
    for i, (a, g) in enumerate(zip(la.curvature.input_factors, la.curvature.output_factors, strict=True)):
        root = scale[i].sqrt()
        eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
        blocks.append(torch.kron(root * g + 0.3**0.5 * eye_g, root * a + 0.3**0.5 * eye_a))
    precision = torch.block_diag(*blocks)
    delta = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(la.log_det_posterior(delta.expand(2), la.sigma_noise), torch.logdet(precision))
    jac = augmented_jacobian(model, x)
    torch.testing.assert_close(la(x)[1], jac @ torch.linalg.solve(precision, jac.mT))
    undamped = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron", prior_precision=0.3)
    undamped.fit([(x, y)])
    assert not torch.allclose(undamped(x)[1], la(x)[1]), "damping must change the posterior"
    la.optimize_prior_precision(n_steps=50)  # the evidence stays differentiable in δ through √δ
    assert torch.isfinite(la.prior_precision).all() and (la.prior_precision != 0.3).all()
    with pytest.raises(TypeError, match="damping applies to hessian_structure='kron' only"):
        Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag", damping=True)
