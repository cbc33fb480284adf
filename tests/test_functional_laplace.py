"""Function-space (GP) Laplace: exact against the dense weight-space GLM, and against laplace-torch 0.3."""

import math
import warnings

import pytest
import torch
from laplace import Laplace as ReferenceLaplace
from laplace.curvature import BackPackGGN
from laplace.utils import SoDSampler
from torch import nn
from torch.func import functional_call, jacrev

from fastlaplace import Laplace
from fastlaplace.posterior import FunctionalLaplace

N_TRAIN, D_IN, HIDDEN = 12, 3, 5
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


def make_data(likelihood: str, outputs: int, n: int = N_TRAIN, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, dtype=torch.float64, generator=generator)
    if likelihood == "classification":
        y = torch.randint(0, outputs, (n,), generator=generator)
    else:
        y = torch.randn(n, outputs, dtype=torch.float64, generator=generator)
    return x, y


def make_model(outputs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, outputs)).double()


def loader_of(x, y, batch_size: int = 5):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def summed_loss(output, y, likelihood):
    if likelihood == "classification":
        return nn.functional.cross_entropy(output, y, reduction="sum")
    return 0.5 * (output - y).square().sum()


def train_to_map(model, x, y, likelihood, deltas, scale):
    """LBFGS on ``scale · loss + ½ Σ_l δ_l ‖θ_l‖²`` (float64) to a stationary point."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    optimiser = torch.optim.LBFGS(
        model.parameters(), lr=1, max_iter=2000, tolerance_grad=1e-13, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def objective():
        optimiser.zero_grad()
        value = scale * summed_loss(model(x), y, likelihood)
        for delta, layer in zip(deltas, layers):
            value = value + 0.5 * delta * sum(p.square().sum() for p in layer.parameters())
        value.backward()
        return value

    for _ in range(5):
        optimiser.step(objective)
    objective()
    assert (
        max(p.grad.abs().max().item() for p in model.parameters()) < 1e-6
    )  # the scatter terms then differ by O(gradient²)


def dense_glm(model, x_train, y_train, x_test, likelihood, deltas, sigma, temperature, last_layer):
    """The weight-space GLM with the full GGN, by brute force: covariance ``J (GGN/(σ²T) + Δ)⁻¹ Jᵀ`` and evidence."""
    names = [n for n, _ in model.named_parameters()]
    if last_layer:
        names = names[-2:]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def f(flat, inputs):
        chunks = dict(zip(names, [c.view_as(params[n]) for c, n in zip(flat.split(sizes), names)]))
        return functional_call(model, {**params, **chunks}, (inputs,))

    theta = torch.cat([params[n].flatten() for n in names])
    jac_train = jacrev(f)(theta, x_train)  # (N, C, P)
    jac_test = jacrev(f)(theta, x_test)
    output = model(x_train).detach()
    if likelihood == "classification":
        p = output.softmax(-1)
        hessian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    else:
        hessian = torch.eye(output.shape[1], dtype=output.dtype).expand(output.shape[0], -1, -1)
    scale = 1 / (sigma**2 * temperature)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac_train, hessian, jac_train)
    layer_of = torch.cat(
        [torch.full((s,), i // 2 if not last_layer else 0, dtype=torch.long) for i, s in enumerate(sizes)]
    )
    prior = torch.as_tensor(deltas, dtype=torch.float64)[layer_of]
    precision = scale * ggn + torch.diag(prior)
    covariance = jac_test @ torch.linalg.solve(precision, jac_test.flatten(0, 1).T).T.view_as(jac_test).mT
    loss = summed_loss(output, y_train, likelihood)
    log_lik = -scale * loss
    if likelihood == "regression":
        log_lik = log_lik - output.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    log_det_ratio = torch.logdet(precision) - prior.log().sum()
    marglik = log_lik - 0.5 * (log_det_ratio + (prior * theta.square()).sum())
    return model(x_test).detach(), covariance, marglik


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_all_data_gp_is_the_full_ggn_glm(likelihood, subset):
    """With every training point in the subset, the GP is the weight-space GLM (Woodbury, determinant lemma)."""
    outputs = 4 if likelihood == "classification" else 2
    sigma, temperature = (1.0, 1.3) if likelihood == "classification" else (0.6, 1.2)
    deltas = [0.7, 1.3] if subset == "all" else [0.9]
    model = make_model(outputs)
    x, y = make_data(likelihood, outputs)
    # A MAP of the same prior: only there is the function-space scatter the weight-space one.
    if subset == "last_layer":
        model[0].requires_grad_(False)
        train_to_map(
            nn.Sequential(model[2]), model[1](model[0](x)).detach(), y, likelihood, deltas, 1 / sigma**2 / temperature
        )
        model[0].requires_grad_(True)
    else:
        train_to_map(model, x, y, likelihood, deltas, 1 / sigma**2 / temperature)
    x_test = torch.randn(7, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    options = {
        "sigma_noise": torch.tensor(sigma, dtype=torch.float64),
        "temperature": temperature,
        "prior_precision": torch.tensor(deltas, dtype=torch.float64),
    }
    la = Laplace(model, likelihood, subset, "gp", n_subset=N_TRAIN, seed=None, **options)
    la.fit(loader_of(x, y))
    mean, cov = la.functional_variance(x_test)
    dense_mean, dense_cov, dense_marglik = dense_glm(
        model, x, y, x_test, likelihood, deltas, sigma, temperature, subset == "last_layer"
    )
    torch.testing.assert_close(mean, dense_mean)
    torch.testing.assert_close(cov, dense_cov, rtol=1e-9, atol=1e-11)
    # The scatter's jitter ε shifts the evidence by O(ε ‖∇_f loss‖²) (here M C > P: K_MM is singular).
    torch.testing.assert_close(la.log_marginal_likelihood(), dense_marglik, rtol=0, atol=1e-4)
    la.scatter_jitter = 1e-12
    torch.testing.assert_close(la.log_marginal_likelihood(), dense_marglik, rtol=1e-9, atol=1e-9)
    # The same through fastlaplace's own full-GGN posterior.
    full = Laplace(model, likelihood, subset, "full", **options)
    full.fit(loader_of(x, y))
    torch.testing.assert_close(la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-9, atol=1e-9)
    _, full_joint = full.functional_covariance(x_test)
    _, joint = la.functional_covariance(x_test)
    torch.testing.assert_close(joint, full_joint, rtol=1e-9, atol=1e-11)
    # Away from the fitted prior the log-determinants still agree (the scatter terms need not).
    other = torch.tensor([2.0 * d for d in deltas], dtype=torch.float64)
    torch.testing.assert_close(
        la.log_det_posterior(other, la.sigma_noise),
        full.log_det_posterior(other, full.sigma_noise),
        rtol=1e-9,
        atol=1e-9,
    )


@pytest.mark.parametrize("independent", [False, True])
def test_conv_and_layernorm_kernels_match_the_full_posterior(independent):
    """Layers without the Linear closed form (their per-sample Jacobians) in the cross kernel K_*M."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 3)).double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    options = {"prior_precision": torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)}
    la = Laplace(model, "classification", "all", "gp", n_subset=6, independent_outputs=independent, **options)
    la.fit(loader_of(x, y, batch_size=4))
    full = Laplace(model, "classification", "all", "full", **options)
    full.fit(loader_of(x, y, batch_size=4))
    x_test = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    cov = la.functional_variance(x_test)[1]
    full_cov = full.functional_variance(x_test)[1]
    if independent:  # one GP per output: the diagonal of Λ, and no covariance between outputs
        assert torch.count_nonzero(cov - torch.diag_embed(cov.diagonal(dim1=1, dim2=2))) == 0
        assert not torch.allclose(cov.diagonal(dim1=1, dim2=2), full_cov.diagonal(dim1=1, dim2=2))
    else:
        torch.testing.assert_close(cov, full_cov, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            la.log_det_ratio(),
            full.log_det_posterior(full.prior_precision, full.sigma_noise) - full.log_det_prior(full.prior_precision),
        )


def reference_and_ours(likelihood, independent, n_subset, temperature, sigma, **extra):
    """laplace-torch's FunctionalLaplace and ours on the same model, data and subset of it."""
    outputs = 3
    model = make_model(outputs, seed=1)
    x, y = make_data(likelihood, outputs, n=15, seed=2)
    options = {
        "sigma_noise": torch.tensor(sigma, dtype=torch.float64),
        "prior_precision": 0.8,
        "temperature": temperature,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ReferenceLaplace(
            model,
            likelihood,
            "all",
            "gp",
            n_subset=n_subset,
            independent_outputs=independent,
            seed=3,
            backend=BackPackGGN,
            **options,
        )
        reference.fit(loader_of(x, y, batch_size=4))
    # The same subset in the same order: laplace-torch's draw first, then the others (seed=None takes the first).
    chosen = SoDSampler(N=15, M=n_subset, seed=3).indices
    order = torch.cat([chosen, torch.tensor([i for i in range(15) if i not in set(chosen.tolist())], dtype=torch.long)])
    ours = Laplace(
        model,
        likelihood,
        "all",
        "gp",
        n_subset=n_subset,
        independent_outputs=independent,
        seed=None,
        **options,
        **extra,
    )
    ours.fit(loader_of(x[order], y[order], batch_size=4))
    return reference, ours


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("n_subset", [15, 9])
def test_classification_agrees_with_laplace_torch(independent, n_subset):
    reference, ours = reference_and_ours(
        "classification", independent, n_subset, 1.3, 1.0, likelihood_hessian="diagonal"
    )
    torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood().detach())
    x = torch.randn(6, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mean, cov = ours.functional_variance(x)
    reference_mean, reference_cov = reference._glm_predictive_distribution(x)
    torch.testing.assert_close(mean, reference_mean.detach())
    torch.testing.assert_close(cov, reference_cov.detach())
    torch.testing.assert_close(ours(x, link_approx="probit"), reference(x, link_approx="probit").detach())
    _, joint = ours.functional_covariance(x)
    torch.testing.assert_close(joint, reference._glm_predictive_distribution(x, joint=True)[1].detach())


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("n_subset", [15, 9])
def test_regression_agrees_with_laplace_torch(independent, n_subset):
    sigma, temperature = 0.7, 1.0 if n_subset == 15 else 1.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, ours = reference_and_ours("regression", independent, n_subset, temperature, sigma)
    x = torch.randn(6, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for options in ({}, {"diagonal_output": True}, {"joint": True}):
        for got, want in zip(ours(x, **options), reference(x, **options), strict=True):
            torch.testing.assert_close(got, want.detach())
    # The evidence's parts (laplace-torch's regression evidence combines them differently, see FunctionalLaplace).
    normaliser = (15 - n_subset) * 3 * math.log(sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(ours.log_likelihood() - normaliser, reference.log_likelihood.detach())
    if temperature == 1.0:  # laplace-torch's regression log-determinant leaves T out
        log_noise = n_subset * 3 * math.log(sigma**2)
        torch.testing.assert_close(ours.log_det_ratio() + log_noise, reference.log_det_ratio.detach())


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_last_layer_agrees_with_laplace_torch(likelihood):
    model = make_model(3, seed=1)
    x, y = make_data(likelihood, 3, n=15, seed=2)
    sigma = torch.tensor(1.0 if likelihood == "classification" else 0.7, dtype=torch.float64)
    options = {"sigma_noise": sigma, "prior_precision": 0.8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ReferenceLaplace(model, likelihood, "last_layer", "gp", n_subset=15, backend=BackPackGGN, **options)
        reference.fit(loader_of(x, y, batch_size=4))
    ours = Laplace(model, likelihood, "last_layer", "gp", n_subset=15, likelihood_hessian="diagonal", **options)
    ours.fit(loader_of(x, y, batch_size=4))
    x_test = torch.randn(5, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for got, want in zip(ours.functional_variance(x_test), reference._glm_predictive_distribution(x_test)):
        torch.testing.assert_close(got, want.detach())
    if likelihood == "classification":
        torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood().detach())


def test_block_hessian_differs_from_the_diagonal_one():
    block = reference_and_ours("classification", False, 15, 1.0, 1.0)[1]
    diagonal = reference_and_ours("classification", False, 15, 1.0, 1.0, likelihood_hessian="diagonal")[1]
    x = torch.randn(4, D_IN, dtype=torch.float64)
    assert not torch.allclose(block.functional_variance(x)[1], diagonal.functional_variance(x)[1])


def test_marglik_is_differentiable_and_tuned():
    model = make_model(2)
    x, y = make_data("regression", 2)
    la = Laplace(model, "regression", "all", "gp", n_subset=8, sigma_noise=0.5)
    la.fit(loader_of(x, y))

    def evidence(log_delta, log_sigma):
        return la.log_marginal_likelihood(log_delta.exp(), log_sigma.exp())

    inputs = (torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True), torch.tensor(-0.2).double())
    torch.autograd.gradcheck(evidence, (inputs[0], inputs[1].requires_grad_(True)))
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", n_steps=50)
    assert la.log_marginal_likelihood().item() > before
    assert la.prior_precision.shape == (2,)


def test_seeded_subset_of_a_dataloader():
    model = make_model(3)
    x, y = make_data("classification", 3, n=15)
    la = Laplace(model, "classification", "all", "gp", n_subset=6, seed=7)
    la.fit(loader_of(x, y))
    chosen = torch.randperm(15, generator=torch.Generator().manual_seed(7))[:6]
    first = Laplace(model, "classification", "all", "gp", n_subset=6, seed=None)
    rest = torch.tensor([i for i in range(15) if i not in set(chosen.tolist())], dtype=torch.long)
    first.fit(loader_of(x[torch.cat([chosen, rest])], y[torch.cat([chosen, rest])]))
    assert la.num_data == 6 and la.num_total == 15
    x_test = torch.randn(3, D_IN, dtype=torch.float64)
    torch.testing.assert_close(la.functional_variance(x_test), first.functional_variance(x_test))
    torch.testing.assert_close(la.log_marginal_likelihood(), first.log_marginal_likelihood())
    # A plain list of batches: the first points it yields, N counted to the end.
    listed = Laplace(model, "classification", "all", "gp", n_subset=6)
    order = torch.cat([chosen, rest])
    listed.fit([(x[order][:4], y[order][:4]), (x[order][4:], y[order][4:])])
    assert listed.num_total == 15
    torch.testing.assert_close(listed.functional_variance(x_test), first.functional_variance(x_test))


def test_bad_input_is_refused():
    model = make_model(3)
    x, y = make_data("classification", 3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="n_subset"):
            Laplace(model, "classification", "all", "gp", n_subset=bad)
    with pytest.raises(TypeError, match="needs n_subset"):
        Laplace(model, "classification", "all", "gp")
    with pytest.raises(TypeError, match="did you mean 'n_subset'"):
        Laplace(model, "classification", "all", "gp", n_subsett=3)
    with pytest.raises(ValueError, match="did you mean 'gp'"):
        Laplace(model, "classification", "all", "gpp", n_subset=3)
    with pytest.raises(TypeError, match="hessian_structure='gp' only"):
        Laplace(model, "classification", "all", "kron", n_subset=3)
    with pytest.raises(ValueError, match="likelihood_hessian"):
        Laplace(model, "classification", "all", "gp", n_subset=3, likelihood_hessian="full")
    with pytest.raises(ValueError, match="sod"):
        Laplace(model, "classification", "all", "gp", n_subset=3, functional_approximation="nystrom")
    with pytest.raises(ValueError, match="curvature_mode"):
        Laplace(model, "classification", "all", "gp", n_subset=3, curvature_mode="ef")
    la = Laplace(model, "classification", "all", "gp", n_subset=3)
    with pytest.raises(RuntimeError, match="call fit"):
        la(x)
    with pytest.raises(RuntimeError, match="call fit"):
        la.predict(x)
    with pytest.raises(RuntimeError, match="call fit"):
        la.log_marginal_likelihood()
    assert not hasattr(la, "sample")  # a function-space posterior has no weights to sample
    with pytest.raises(ValueError, match="exceeds"):
        Laplace(model, "classification", "all", "gp", n_subset=N_TRAIN + 1).fit(loader_of(x, y))
    with pytest.raises(ValueError, match="exceeds"):
        Laplace(model, "classification", "all", "gp", n_subset=N_TRAIN + 1).fit([(x, y)])
    la.fit(loader_of(x, y))
    assert not hasattr(la, "sample")  # a function-space posterior has no weights to sample
    with pytest.raises(ValueError, match="pred_type='nn'"):
        la(x, pred_type="nn")
    with pytest.raises(ValueError, match="positive prior precision"):
        la.log_marginal_likelihood(torch.tensor(0.0))
    probs = la(x, pred_type="gp")
    torch.testing.assert_close(probs.sum(-1), torch.ones(N_TRAIN, dtype=torch.float64))
    assert la.predictive_entropy(x).shape == (N_TRAIN,)


@pytest.mark.parametrize("independent", [False, True])
def test_state_dict_round_trip(independent):
    model = make_model(3)
    x, y = make_data("classification", 3)
    options = {"n_subset": 8, "independent_outputs": independent, "prior_precision": torch.tensor([0.5, 2.0])}
    la = Laplace(model, "classification", "all", "gp", **options)
    la.fit(loader_of(x, y))
    state = la.state_dict()
    restored = Laplace(model, "classification", "all", "gp", **options)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(restored(x), la(x))
    torch.testing.assert_close(restored.functional_covariance(x[:4]), la.functional_covariance(x[:4]))
    torch.testing.assert_close(restored.prior_precision, la.prior_precision)
    other = Laplace(model, "classification", "all", "gp", n_subset=8, independent_outputs=not independent)
    with pytest.raises(ValueError, match="independent_outputs"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="n_subset"):
        Laplace(model, "classification", "all", "gp", n_subset=5, independent_outputs=independent).load_state_dict(
            state
        )


def test_class_is_exported():
    la = Laplace(make_model(2), "regression", "last_layer", "gp", n_subset=4)
    assert isinstance(la, FunctionalLaplace) and la.last_layer_only
