"""Heteroscedastic regression: the model outputs means and log-variances (N, 2C)."""

import math

import pytest
import torch
from dense import augmented_jacobian, layer_sizes
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import output_gradient_columns, summed_negative_log_likelihood
from fastlaplace.marglik import marglik_training

LIKELIHOOD = "heteroscedastic_regression"


def model_and_data(n=12, outputs=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2 * outputs)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, outputs, dtype=torch.float64)
    return model, x, y


def dense_fisher_ggn(model, x):
    """Σ_n J_nᵀ diag(e^{-s_n}, ½) J_n with J the Jacobian of (μ, s) w.r.t. [W | b]."""
    jac = augmented_jacobian(model, x)
    log_var = model(x).detach().chunk(2, dim=1)[1]
    fisher = torch.cat([(-log_var).exp(), torch.full_like(log_var, 0.5)], dim=1)
    return torch.einsum("ncp,nc,ncq->pq", jac, fisher, jac)


def test_ggn_columns_are_the_expected_hessian():
    """Σ_k r r ᵀ equals the Hessian of the NLL w.r.t. (μ, s) averaged over y ~ N(μ, e^s)."""
    torch.manual_seed(1)
    output = torch.randn(4, 4, dtype=torch.float64)
    columns = output_gradient_columns(output, None, LIKELIHOOD, "ggn")
    exact = columns @ columns.transpose(1, 2)
    mean, log_var = output.chunk(2, dim=1)
    draws = mean + (0.5 * log_var).exp() * torch.randn(20000, *mean.shape, dtype=torch.float64)
    expected = torch.zeros_like(exact)
    for n in range(4):

        def nll(f, y, n=n):
            return summed_negative_log_likelihood(f.unsqueeze(0), y.unsqueeze(0), LIKELIHOOD)

        hessians = torch.vmap(torch.func.hessian(nll), in_dims=(None, 0))(output[n], draws[:, n])
        expected[n] = hessians.mean(0)
    torch.testing.assert_close(exact, expected, atol=0.03, rtol=0.03)
    # and the Hessian itself is not PSD for every y: the Fisher is what makes this a GGN
    assert float(torch.linalg.eigvalsh(hessians).min()) < 0


def test_mc_fisher_averages_to_the_exact_ggn():
    torch.manual_seed(2)
    output = torch.randn(3, 4, dtype=torch.float64)
    exact = output_gradient_columns(output, None, LIKELIHOOD, "ggn")
    generator = torch.Generator().manual_seed(0)
    samples = 400_000
    draws = output_gradient_columns(output.repeat(samples, 1), None, LIKELIHOOD, "mc", generator)
    draws = draws.view(samples, *output.shape)
    # standard errors here are below 0.005: the tolerance is about 4 of them
    torch.testing.assert_close(
        torch.einsum("snc,snd->ncd", draws, draws) / samples, exact @ exact.transpose(1, 2), atol=0.02, rtol=0.02
    )


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_curvature_matches_the_dense_fisher(structure):
    model, x, y = model_and_data(n=1 if structure == "kron" else 12)
    la = Laplace(model, LIKELIHOOD, subset_of_weights="all", hessian_structure=structure, prior_precision=0.5)
    la.fit([(x, y)])
    dense = dense_fisher_ggn(model, x)
    if structure == "full":
        torch.testing.assert_close(la.hessian, dense)
    if structure == "kron":  # K-FAC is exact for one datum within each layer's block
        sizes = layer_sizes(model)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        dense = torch.block_diag(*[dense[b : b + n, b : b + n] for b, n in zip(starts, sizes)])
    if structure == "diag":
        dense = torch.diag(dense.diagonal())
    precision = dense + 0.5 * torch.eye(dense.shape[0], dtype=dense.dtype)
    # The log det and the GLM covariance of every structure equal the dense ones (K-FAC: one datum).
    mean, log_var = model(x).detach().chunk(2, dim=1)
    expected_loss = 0.5 * ((y - mean).square() * (-log_var).exp() + log_var).sum()
    theta = la._to_parameter_order(la.layer_weights())
    expected = (
        -expected_loss
        - x.shape[0] * y.shape[1] * 0.5 * math.log(2 * math.pi)
        - 0.5 * (torch.logdet(precision) - dense.shape[0] * math.log(0.5) + 0.5 * theta.square().sum())
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    jac = augmented_jacobian(model, x)
    cov = torch.einsum("ncp,pq,ndq->ncd", jac, torch.linalg.inv(precision), jac)
    f_mean, f_cov = la(x)
    torch.testing.assert_close(f_mean, model(x).detach())
    torch.testing.assert_close(f_cov, cov)


def test_predict_adds_the_expected_noise_to_the_mean_variance():
    model, x, y = model_and_data()
    la = Laplace(model, LIKELIHOOD, subset_of_weights="all", hessian_structure="full")
    la.fit([(x, y)])
    f_mean, f_var = la(x, diagonal_output=True)
    mean, std = la.predict(x)
    torch.testing.assert_close(mean, f_mean[:, :2])
    # E[e^s] for s ~ N(m, v) by sampling the GLM's marginal of s
    draws = f_mean[:, 2:] + f_var[:, 2:].sqrt() * torch.randn(200000, *f_mean[:, 2:].shape, dtype=torch.float64)
    torch.testing.assert_close(std.square(), f_var[:, :2] + draws.exp().mean(0), rtol=0.01, atol=0)


def test_sampled_network_moments_match_the_glm_of_a_linear_model():
    """For a model linear in its weights the sampled network and the GLM are the same Gaussian."""
    torch.manual_seed(3)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    la = Laplace(model, LIKELIHOOD, subset_of_weights="all", hessian_structure="full", prior_precision=4.0)
    la.fit([(x, y)])
    mean, variance = la._target_moments(x, "glm")
    generator = torch.Generator().manual_seed(0)
    nn_mean, nn_variance = la._target_moments(x, "nn", n_samples=20000, generator=generator)
    torch.testing.assert_close(nn_mean, mean, atol=0.02, rtol=0)
    torch.testing.assert_close(nn_variance, variance, atol=0, rtol=0.05)


class ConstantNoise(nn.Module):
    """A mean network next to a frozen head that outputs the constant log σ²."""

    def __init__(self, sigma):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
        self.noise = nn.Linear(3, 1)
        nn.init.zeros_(self.noise.weight)
        nn.init.constant_(self.noise.bias, math.log(sigma**2))
        self.noise.requires_grad_(False)

    def forward(self, x):
        return torch.cat([self.body(x), self.noise(x)], dim=1)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_constant_log_variance_is_the_homoscedastic_posterior(structure):
    model = ConstantNoise(sigma=0.7).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    hetero = Laplace(model, LIKELIHOOD, subset_of_weights="all", hessian_structure=structure, prior_precision=2.0)
    hetero.fit([(x, y)])
    homo = Laplace(
        model.body,
        "regression",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=2.0,
        sigma_noise=0.7,
    )
    homo.fit([(x, y)])
    torch.testing.assert_close(hetero.log_marginal_likelihood(), homo.log_marginal_likelihood())
    mean, std = hetero.predict(x)
    torch.testing.assert_close((mean, std), homo.predict(x))


def test_bad_inputs_are_named():
    model, x, y = model_and_data()
    la = Laplace(model, LIKELIHOOD, subset_of_weights="all", hessian_structure="diag")
    with pytest.raises(ValueError, match=r"must output \(N, 2C\)"):
        Laplace(nn.Linear(3, 3).double(), LIKELIHOOD, "all", "diag").fit([(x, y)])
    with pytest.raises(ValueError, match="targets must be"):
        la.fit([(x, y[:, 0])])
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        Laplace(model, LIKELIHOOD, "all", "diag", sigma_noise=0.5)
    with pytest.raises(ValueError, match="classification"):
        la.fit([(x, y)])
        la.predictive_entropy(x)


def test_marglik_training_learns_input_dependent_noise():
    """Noise that grows with |x|: the trained model's predicted std follows it."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, generator=generator) * 4 - 2
    noise = 0.05 + 0.4 * x.abs()
    y = torch.sin(2 * x) + noise * torch.randn(256, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 2))
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    la, _, margliks, _ = marglik_training(
        model,
        loader,
        LIKELIHOOD,
        hessian_structure="kron",
        optimizer_kwargs={"lr": 1e-2},
        n_epochs=120,
        marglik_frequency=50,
        n_hypersteps=20,
    )
    assert margliks[-1] < margliks[0]
    probe = torch.tensor([[0.0], [1.9]])
    _, std = la.predict(probe)
    assert float(std[0]) < 0.3 and float(std[1]) > 0.6, std
