"""HuggingFace models as users pass them: GPT-2 Conv1D, ModelOutput / dict / tuple outputs, dict batches, LoRA."""

import subprocess
import sys

import pytest
import torch
from dense import targets
from torch import nn
from torch.func import functional_call, jacrev, vmap
from transformers.pytorch_utils import Conv1D

from fastlaplace import Laplace


def parameter_jacobian(model: nn.Module, x) -> torch.Tensor:
    """(N, C, P) Jacobian of the outputs w.r.t. the trainable parameters, named_parameters() order, row-major."""
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def output(params, xi):
        return functional_call(model, {**params, **frozen}, (xi.unsqueeze(0),))[0]

    jac = vmap(jacrev(output), in_dims=(None, 0))(trainable, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=-1)


def dense_glm_covariance(model, x_train, likelihood, x_test, prior_precision=1.0, structure="full"):
    """J P⁻¹ Jᵀ at x_test with P = GGN(x_train) + δ (its diagonal for "diag"), all in named_parameters() order."""
    jac = parameter_jacobian(model, x_train)
    out = model(x_train).detach()
    if likelihood == "regression":
        hessians = torch.eye(out.shape[1], dtype=out.dtype).expand(out.shape[0], -1, -1)
    else:
        p = out.softmax(-1)
        hessians = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, hessians, jac)
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    precision = ggn + prior_precision * torch.eye(ggn.shape[0], dtype=ggn.dtype)
    test_jac = parameter_jacobian(model, x_test)
    return test_jac @ torch.linalg.solve(precision, test_jac.transpose(1, 2)), ggn


class Flatten(nn.Module):
    def forward(self, x):
        return x.mean(1)


def conv1d_model(tokens: bool = False) -> nn.Module:
    """Conv1D(3 -> 4), Tanh, [mean over tokens], Conv1D(4 -> 2): GPT-2's transposed Linear layers."""
    torch.manual_seed(0)
    layers = [Conv1D(4, 3), nn.Tanh(), *([Flatten()] if tokens else []), Conv1D(2, 4)]
    for layer in layers:
        if isinstance(layer, Conv1D):
            nn.init.normal_(layer.weight, std=0.7)
            nn.init.normal_(layer.bias, std=0.3)
    return nn.Sequential(*layers).double()


def as_linear(model: nn.Module) -> nn.Module:
    """The same network with every Conv1D replaced by the nn.Linear of the transposed weight."""
    layers = []
    for layer in model:
        if isinstance(layer, Conv1D):
            linear = nn.Linear(layer.nx, layer.nf).double()
            linear.weight.data.copy_(layer.weight.data.T)
            linear.bias.data.copy_(layer.bias.data)
            layer = linear
        layers.append(layer)
    return nn.Sequential(*layers)


def test_conv1d_parameter_order_is_the_stored_weights(generator):
    model = conv1d_model()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    torch.testing.assert_close(la._to_parameter_order(la.layer_weights()), flat)
    for block in la._from_parameter_order(flat):
        assert block.shape in ((4, 4), (2, 5))  # (d_out, d_in + bias), as the equivalent Linear's


@pytest.mark.parametrize("structure", ["diag", "full", "lowrank"])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_conv1d_exact_structures_equal_the_dense_ggn(structure, tokens, likelihood, generator):
    model = conv1d_model(tokens)
    shape = (5, 6, 3) if tokens else (5, 3)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    x_test = torch.randn(2, *shape[1:], dtype=torch.float64, generator=generator)
    options = {"low_rank": 26} if structure == "lowrank" else {}  # rank = P: the sketch is exact
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, **options)
    la.fit([(x[:3], targets(likelihood, 3, 2, generator)), (x[3:], targets(likelihood, 2, 2, generator))])
    covariance, ggn = dense_glm_covariance(model, x, likelihood, x_test, structure=structure)
    torch.testing.assert_close(la.functional_variance(x_test)[1], covariance)
    if structure == "diag":  # the diagonal itself, in named_parameters() order
        torch.testing.assert_close(la._to_parameter_order(la.posterior_precision()), ggn.diagonal() + 1)


def test_conv1d_kron_is_exact_for_one_layer_and_one_datum(generator):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(2, 3)).double()
    x, x_test = torch.randn(1, 3, dtype=torch.float64, generator=generator), torch.randn(3, 3, dtype=torch.float64)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("regression", 1, 2, generator))])
    covariance, _ = dense_glm_covariance(model, x, "regression", x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], covariance)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv1d_gets_the_kron_posterior_of_the_equivalent_linear(kfac_approx, generator):
    model = conv1d_model(tokens=True)
    linear = as_linear(model)
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=generator)
    batches = [(x[:4], targets("classification", 4, 2, generator)), (x[4:], targets("classification", 2, 2, generator))]
    posteriors = []
    for network in (model, linear):
        la = Laplace(
            network, "classification", subset_of_weights="all", hessian_structure="kron", kfac_approx=kfac_approx
        )
        la.fit(batches)
        posteriors.append(la)
    conv, reference = posteriors
    for mine, theirs in zip(
        conv.curvature.input_factors + conv.curvature.output_factors,
        reference.curvature.input_factors + reference.curvature.output_factors,
    ):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(conv.log_marginal_likelihood(), reference.log_marginal_likelihood())
    torch.testing.assert_close(conv(x), reference(x))
    draws = [la(x, pred_type="nn", n_samples=5, generator=torch.Generator().manual_seed(3)) for la in posteriors]
    torch.testing.assert_close(draws[0], draws[1])  # samples land on the stored (transposed) weights


def test_a_subnetwork_of_conv1d_weights_counts_the_stored_order(generator):
    model = conv1d_model()
    x, x_test = torch.randn(5, 3, dtype=torch.float64, generator=generator), torch.randn(2, 3, dtype=torch.float64)
    indices = torch.tensor([1, 4, 5, 13, 17, 20])  # weight entries (0, 1), (1, 0), (1, 1), biases, second weight
    la = Laplace(
        model, "regression", subset_of_weights="subnetwork", hessian_structure="full", subnetwork_indices=indices
    )
    la.fit([(x, targets("regression", 5, 2, generator))])
    jac, test_jac = parameter_jacobian(model, x)[..., indices], parameter_jacobian(model, x_test)[..., indices]
    precision = torch.einsum("ncp,ncq->pq", jac, jac) + torch.eye(len(indices), dtype=torch.float64)
    torch.testing.assert_close(la.functional_variance(x_test)[1], test_jac @ torch.linalg.solve(precision, test_jac.mT))


def test_conv1d_is_recognised_without_importing_transformers():
    script = (
        "import sys, torch; from torch import nn; from fastlaplace import Laplace\n"
        "m = nn.Sequential(nn.Linear(3, 2)); la = Laplace(m, 'classification', subset_of_weights='all')\n"
        "la.fit([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]); la(torch.randn(2, 3))\n"
        "assert 'transformers' not in sys.modules, 'fastlaplace imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
