"""Kron posterior blocks of Embedding (K-FAC with a diagonal input factor) and LayerNorm / BatchNorm (unit-wise).

The ground truth is dense: the GGN of torch.func (tests/dense.py) for what is exact, and the
block-diagonal precision built from the factors the posterior reports for everything it
computes from them (evidence, GLM covariance marginal and joint, samples, state_dict).
"""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, layer_sizes, targets
from test_layers import (
    MeanOverTokens,
    batchnorm_cnn,
    batchnorm_mlp,
    convnext_cnn,
    grouped_cnn,
    groupnorm_cnn,
    token_ids,
    token_model,
)
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import layer_statistics

DOUBLE = {"dtype": torch.float64}


def layernorm_without_bias() -> nn.Module:
    """Embedding -> LayerNorm(bias=False) (1 x 1 unit-wise blocks) -> mean -> Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.LayerNorm(3, bias=False), MeanOverTokens(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model


def embedding_model() -> nn.Module:
    """Embedding -> Tanh -> mean -> Linear: G of full rank (a LayerNorm after it would remove the mean direction)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), MeanOverTokens(), nn.Linear(4, 3)).double()


MODELS = {
    "tokens": (token_model, token_ids),
    "embedding": (embedding_model, token_ids),
    "batchnorm_cnn": (batchnorm_cnn, lambda n, g: torch.randn(n, 2, 5, 5, **DOUBLE, generator=g)),
    "batchnorm_mlp": (batchnorm_mlp, lambda n, g: torch.randn(n, 3, **DOUBLE, generator=g)),
    "groupnorm_cnn": (groupnorm_cnn, lambda n, g: torch.randn(n, 2, 5, 5, **DOUBLE, generator=g)),
    "grouped_cnn": (grouped_cnn, lambda n, g: torch.randn(n, 2, 5, 5, **DOUBLE, generator=g)),
    "convnext_cnn": (convnext_cnn, lambda n, g: torch.randn(n, 2, 6, 6, **DOUBLE, generator=g)),
    "layernorm_without_bias": (layernorm_without_bias, lambda n, g: torch.randint(0, 6, (n, 4), generator=g)),
}


def modules(model: nn.Module) -> list[nn.Module]:
    """The posterior's layers in model order (all trainable here)."""
    kinds = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def sub_blocks(matrix: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [matrix[a:b, a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def claimed_blocks(la, model, damping: bool = False) -> list[torch.Tensor]:
    """Dense curvature blocks (``[W | b]`` row-major) built from the factors the posterior reports.

    With ``damping`` the blocks are the damped precisions themselves (prior included), else
    the curvature ``s H_l`` without the prior.
    """
    scale = 1.0 / (la.sigma_noise.square() * la.temperature)
    kron = iter(zip(la.curvature.input_factors, la.curvature.output_factors, la.curvature.locations, strict=True))
    e = la.embedding_curvature
    embedding = iter(zip(e.counts, e.output_factors, e.locations, strict=True))
    unitwise = iter(la.unitwise_curvature.blocks)
    result = []
    for layer, module in enumerate(modules(model)):
        if isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d) and module.groups == 1:
            a, g, locations = next(kron)
            left, right, s = g, a, scale / (la.num_data * locations)
        elif isinstance(module, nn.Embedding):
            counts, g, locations = next(embedding)
            left, right, s = torch.diag(counts), g, scale / (la.num_data * locations)
        else:
            block = scale * torch.block_diag(*next(unitwise))
            result.append(block + la.prior_precision[layer] * torch.eye(block.shape[0], **DOUBLE) if damping else block)
            continue
        if damping:
            root = la.prior_precision[layer].sqrt()
            left = s.sqrt() * left + root * torch.eye(left.shape[0], **DOUBLE)
            right = s.sqrt() * right + root * torch.eye(right.shape[0], **DOUBLE)
            result.append(torch.kron(left, right))
        else:
            result.append(s * torch.kron(left, right))
    return result


def claimed_precision(la, model, damping: bool = False) -> torch.Tensor:
    precision = torch.block_diag(*claimed_blocks(la, model, damping))
    if damping:
        return precision
    prior = torch.cat([d.expand(n) for d, n in zip(la.prior_precision, layer_sizes(model), strict=True)])
    return precision + torch.diag(prior)


def augmented_to_parameter_order(model: nn.Module) -> torch.Tensor:
    """Index ``p`` such that ``theta_parameter_order = theta_augmented[p]`` (W flattened, then b, per layer)."""
    order, offset = [], 0
    for module in modules(model):
        d_out, d_in = module.weight.shape[0], module.weight[0].numel()
        bias = getattr(module, "bias", None) is not None
        width = d_in + bias
        order += [offset + o * width + i for o in range(d_out) for i in range(d_in)]
        order += [offset + o * width + d_in for o in range(d_out)] if bias else []
        offset += d_out * width
    return torch.tensor(order)


def test_embedding_block_is_exact_for_one_datum_of_one_token(generator):
    model = token_model()
    x = token_ids(1, generator)[:, :1]  # (1, 1): one token
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("classification", 1, generator=generator))])
    exact = sub_blocks(dense_ggn(model, x, "classification"), layer_sizes(model))[0]
    assert exact.abs().max() > 1e-3
    torch.testing.assert_close(claimed_blocks(la, model)[0], exact)


@pytest.mark.parametrize("one_dimensional", [False, True])
def test_embedding_factors_are_token_counts_and_the_gradient_gram(one_dimensional, generator):
    model = token_model()
    if one_dimensional:  # (N,) ids: one token per sample, no location dimension
        model = nn.Sequential(model[0], nn.Tanh(), nn.Linear(4, 3)).double()
    x = token_ids(6, generator)[:, 0] if one_dimensional else token_ids(6, generator)
    y = targets("classification", 6, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", kfac_approx="reduce")
    la.fit([(x[:2], y[:2]), (x[2:], y[2:])])
    gram = torch.zeros(4, 4, **DOUBLE)
    for rows in (slice(0, 2), slice(2, 6)):
        _, stats = layer_statistics(model, x[rows], y[rows], "classification")
        g = stats[0].output_grads  # (N, K, [T,] d): every token a sample, whatever kfac_approx
        gram += g.reshape(-1, 4).T @ g.reshape(-1, 4)
    counts = torch.bincount(x.flatten(), minlength=7).double()
    e = la.embedding_curvature
    torch.testing.assert_close(e.counts[0], counts)
    torch.testing.assert_close(e.output_factors[0], gram)
    assert e.locations == [1 if one_dimensional else 5]
    tokens = 1 if one_dimensional else 5
    torch.testing.assert_close(claimed_blocks(la, model)[0], torch.kron(torch.diag(counts), gram) / (6 * tokens))


@pytest.mark.parametrize("name", list(MODELS))
def test_unitwise_blocks_equal_the_dense_ggn_sub_blocks(name, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    x = make_inputs(7, generator)
    y = targets("classification", 7, classes=modules(model)[-1].out_features, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x[:3], y[:3]), (x[3:], y[3:])])
    exact = sub_blocks(dense_ggn(model, x, "classification"), layer_sizes(model))
    unitwise = [
        i
        for i, m in enumerate(modules(model))
        if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        or isinstance(m, nn.Conv2d)
        and m.groups > 1
    ]
    assert len(unitwise) == len(la.unitwise_curvature.blocks)
    for i, blocks in zip(unitwise, la.unitwise_curvature.blocks, strict=True):
        module = modules(model)[i]
        width = module.weight[0].numel() + (module.bias is not None)  # one output unit's weights and bias
        assert blocks.shape == (module.weight.shape[0], width, width)
        expected = torch.stack([exact[i][j : j + width, j : j + width] for j in range(0, exact[i].shape[0], width)])
        assert expected[:, 0, -1].abs().max() > 1e-4 or width == 1  # the γ-β coupling is present
        torch.testing.assert_close(blocks, expected)


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_evidence_and_glm_covariance_equal_the_dense_block_diagonal_form(name, damping, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    classes = modules(model)[-1].out_features
    x, y = make_inputs(5, generator), targets("regression", 5, classes=classes, generator=generator)
    count = len(modules(model))
    prior = torch.linspace(0.3, 1.7, count, **DOUBLE)  # one prior precision per layer
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="kron",
        sigma_noise=0.7,
        temperature=1.3,
        prior_precision=prior,
        damping=damping,
    )
    la.fit([(x[:2], y[:2]), (x[2:], y[2:])])
    precision = claimed_precision(la, model, damping)
    torch.testing.assert_close(la.log_det_posterior(la.prior_precision, la.sigma_noise), torch.logdet(precision))
    x_test = make_inputs(3, generator)
    jac = augmented_jacobian(model, x_test)
    expected = jac @ torch.linalg.solve(precision, jac.mT)
    torch.testing.assert_close(la.functional_variance(x_test)[1], expected)
    torch.testing.assert_close(la.functional_variance_diagonal(x_test)[1], expected.diagonal(dim1=1, dim2=2))
    flat = jac.flatten(0, 1)
    torch.testing.assert_close(la(x_test, joint=True)[1], flat @ torch.linalg.solve(precision, flat.T))


def test_evidence_is_differentiable_in_a_prior_per_layer(generator):
    model = token_model()
    x, y = token_ids(4, generator), targets("classification", 4, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, y)])
    prior = torch.tensor([0.5, 2.0, 1.0, 1.5], **DOUBLE, requires_grad=True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(prior), prior)
    la.prior_precision = prior.detach()
    sizes = layer_sizes(model)

    def dense(delta):  # the same evidence from the dense claimed precision
        full = torch.block_diag(*claimed_blocks(la, model)) + torch.diag(
            torch.cat([d.expand(n) for d, n in zip(delta, sizes, strict=True)])
        )
        weights = torch.cat([w.flatten() for w in la.layer_weights()])
        prior_diag = torch.cat([d.expand(n) for d, n in zip(delta, sizes, strict=True)])
        log_det_ratio = torch.logdet(full) - prior_diag.log().sum()
        return la.log_likelihood() - 0.5 * (log_det_ratio + (prior_diag * weights.square()).sum())

    torch.testing.assert_close(la.log_marginal_likelihood(prior.detach()), dense(prior.detach()))
    torch.testing.assert_close(grad, torch.func.grad(dense)(prior.detach()))
    assert (grad[:2].abs() > 1e-6).all()  # the Embedding and LayerNorm priors enter


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("name", ["tokens", "embedding", "batchnorm_mlp", "layernorm_without_bias", "grouped_cnn"])
def test_samples_have_the_claimed_covariance(name, damping, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    classes = modules(model)[-1].out_features
    x, y = make_inputs(6, generator), targets("regression", 6, classes=classes, generator=generator)
    # A weak prior, so that the curvature (an Embedding's eigenvalues reach about 0.1 here) shapes P.
    prior = torch.linspace(0.005, 0.02, len(modules(model)), **DOUBLE)
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="kron",
        prior_precision=prior,
        damping=damping,
    )
    la.fit([(x, y)])
    order = augmented_to_parameter_order(model)
    precision = claimed_precision(la, model, damping)[order][:, order]  # parameter order, as sample()
    draws = la.sample(100_000, generator=torch.Generator().manual_seed(0))
    mean = torch.cat([p.detach().flatten() for p in model.parameters()])
    deviations = draws - mean
    root = torch.linalg.cholesky(precision)  # P = L Lᵀ: Lᵀ θ has the identity covariance
    whitened = deviations @ root
    covariance = whitened.T @ whitened / draws.shape[0]
    torch.testing.assert_close(covariance, torch.eye(precision.shape[0], **DOUBLE), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.mean(0), mean, atol=0.05 * precision.diagonal().rsqrt().max().item(), rtol=0)


def test_state_dict_round_trip(generator):
    model = token_model()
    x, y = token_ids(5, generator), targets("regression", 5, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron", sigma_noise=0.6)
    la.fit([(x, y)])
    la.prior_precision = torch.tensor([0.4, 0.8, 1.2, 1.6], **DOUBLE)
    restored = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron")
    restored.load_state_dict(la.state_dict())
    x_test = token_ids(3, generator)
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(restored(x_test, joint=True), la(x_test, joint=True))
    torch.testing.assert_close(restored.functional_variance(x_test), la.functional_variance(x_test))
    torch.testing.assert_close(
        restored.sample(4, generator=torch.Generator().manual_seed(1)),
        la.sample(4, generator=torch.Generator().manual_seed(1)),
    )
    torch.testing.assert_close(
        torch.block_diag(*claimed_blocks(restored, model)), torch.block_diag(*claimed_blocks(la, model))
    )


@pytest.mark.parametrize("name", ["batchnorm_mlp", "batchnorm_cnn", "grouped_cnn"])
def test_glm_covariance_gradient_in_the_input_equals_the_dense_one(name, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    x, y = make_inputs(4, generator), targets("regression", 4, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron", enable_backprop=True)
    la.fit([(x, y)])
    precision = claimed_precision(la, model)
    x_test = make_inputs(2, generator).requires_grad_(True)
    (got,) = torch.autograd.grad(la(x_test)[1].sum(), x_test)
    jac = augmented_jacobian(model, x_test)
    (expected,) = torch.autograd.grad((jac @ torch.linalg.solve(precision, jac.mT)).sum(), x_test)
    torch.testing.assert_close(got, expected)
