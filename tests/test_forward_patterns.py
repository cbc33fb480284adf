"""Forward passes as real models write them, against dense brute force or an equivalent plain model.

In-place ops (torchvision's ``ReLU(inplace=True)``, ``out += x``): an in-place op on a layer's
output moves that tensor onto the op's autograd node, and the curvature must still
backpropagate to the value the layer returned. Activation checkpointing: recomputed in the
backward (``use_reentrant=False``) it gives the same posterior; a reentrant checkpoint runs
its layers without autograd and is refused by name.
"""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, targets
from resnets import torchvision_style_resnet
from test_layers import batchnorm_cnn
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlaplace import Laplace
from fastlaplace.optim import KFACPreconditioner


def _images(n, generator):
    return torch.randn(n, 3, 6, 6, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_torchvision_style_resnet_curvature_and_glm_equal_dense(structure, generator):
    model = torchvision_style_resnet()
    x, x_test = _images(5, generator), _images(3, generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=1.0)
    la.fit([(x, targets("classification", 5, generator=generator))])
    ggn = dense_ggn(model, x, "classification")
    expected = torch.diag(ggn.diagonal()) if structure == "diag" else ggn
    precision = expected + torch.eye(len(ggn), dtype=torch.float64)
    got = la.posterior_precision()
    if structure == "diag":  # per layer, (d_out, d_in + bias)
        got = torch.diag(torch.cat([block.flatten() for block in got]))
    torch.testing.assert_close(got, precision)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))


def test_torchvision_style_resnet_kron_equals_its_out_of_place_twin(generator):
    x, x_test = _images(6, generator), _images(3, generator)
    y = targets("classification", 6, generator=generator)
    fitted = []
    for inplace in (True, False):
        model = torchvision_style_resnet(inplace=inplace)
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
        la.fit([(x[:3], y[:3]), (x[3:], y[3:])])
        fitted.append(la)
    in_place, out_of_place = fitted
    assert len(in_place.curvature.names) == 4 and len(in_place.unitwise_curvature.names) == 3  # convs, head; norms
    for got, expected in zip(
        in_place.curvature.input_factors + in_place.curvature.output_factors + in_place.unitwise_curvature.blocks,
        out_of_place.curvature.input_factors
        + out_of_place.curvature.output_factors
        + out_of_place.unitwise_curvature.blocks,
        strict=True,
    ):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(in_place.functional_variance(x_test)[1], out_of_place.functional_variance(x_test)[1])


class ScaledInPlace(nn.Module):
    """An MLP whose logits are halved in place after its head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x)).mul_(0.5)


def test_logits_changed_in_place_after_the_head(generator):
    model = ScaledInPlace().double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    data = [(x, targets("classification", 6, generator=generator))]
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=1.0)
    la.fit(data)
    ggn = dense_ggn(model, x, "classification")
    precision = ggn + torch.eye(len(ggn), dtype=torch.float64)
    torch.testing.assert_close(la.posterior_precision(), precision)
    # The head's output is not the model's output: its Jacobian is not the identity.
    for structure in ("diag", "kron", "full"):
        last = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=structure)
        with pytest.raises(ValueError, match="layer 'head' does not produce the model's output.*in place"):
            last.fit(data)


class InputChangedInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        out = self.second(hidden)
        hidden.mul_(2.0)  # after `second` saw it
        return out


def test_a_layer_input_changed_in_place_is_refused_by_name(generator):
    x = torch.randn(4, 3, generator=generator)
    la = Laplace(InputChangedInPlace(), "classification", subset_of_weights="all", hessian_structure="kron")
    with pytest.raises(ValueError, match="input of layer 'second' was changed in place"):
        la.fit([(x, targets("classification", 4, classes=2, generator=generator))])


class ComposedGelu(nn.Module):
    """GPT-2's ``gelu_new`` written out: collapsed into one node during a curvature pass."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3.0))))


class ChangedAfterShortcut(nn.Module):
    """The result of a curvature-pass shortcut (a collapsed activation, a ReLU's max-pooling) doubled in place."""

    def __init__(self, pooling: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pooling = pooling
        if pooling:
            self.layer, self.act = nn.Conv2d(2, 3, 3), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Linear(12, 3)
        else:
            self.layer, self.act, self.head = nn.Linear(3, 5), ComposedGelu(), nn.Linear(5, 3)

    def forward(self, x):
        hidden = self.act(self.layer(x))
        hidden.mul_(2.0)
        return self.head(hidden.flatten(1))


@pytest.mark.parametrize("pooling", [False, True], ids=["composed-activation", "relu-max-pool"])
def test_in_place_op_after_a_shortcut(pooling, generator):
    model = ChangedAfterShortcut(pooling).double()
    x = torch.randn(6, *((2, 6, 6) if pooling else (3,)), dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=1.0)
    la.fit([(x, targets("classification", 6, generator=generator))])
    ggn = dense_ggn(model, x, "classification")
    precision = ggn + torch.eye(len(ggn), dtype=torch.float64)
    torch.testing.assert_close(la.posterior_precision(), precision)
    jac = augmented_jacobian(model, x)
    torch.testing.assert_close(la.functional_variance(x)[1], jac @ torch.linalg.solve(precision, jac.mT))


class Checkpointed(nn.Module):
    """A Linear-Tanh block run plainly (``reentrant=None``) or under ``torch.utils.checkpoint``, then a head."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.block(x))
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")  # the reentrant checkpoint's
@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_activation_checkpointing(structure, generator):
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    data = [(x, targets("classification", 6, generator=generator))]
    fitted = []
    for reentrant in (None, False):
        la = Laplace(
            Checkpointed(reentrant).double(), "classification", subset_of_weights="all", hessian_structure=structure
        )
        la.fit(data)
        fitted.append(la)
    plain, recomputed = fitted
    torch.testing.assert_close(recomputed.log_marginal_likelihood(), plain.log_marginal_likelihood())
    torch.testing.assert_close(recomputed.functional_variance(x)[1], plain.functional_variance(x)[1])
    la = Laplace(Checkpointed(True).double(), "classification", subset_of_weights="all", hessian_structure=structure)
    with pytest.raises(ValueError, match="layer 'block.0' ran without autograd .*use_reentrant=False"):
        la.fit(data)


class DropPath(nn.Module):
    """Stochastic depth as timm and torchvision write it: in training mode, each sample's branch dropped at random."""

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, dtype=x.dtype) > 0.1).to(x.dtype)
        return x * keep / 0.9


class ResidualWithDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.norm, self.drop, self.head = nn.Linear(3, 4), nn.LayerNorm(4), DropPath(), nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.norm(self.first(x)))
        return self.head(hidden + self.drop(hidden))


@pytest.mark.parametrize("structure", ["diag", "kron", "gp"])
def test_a_model_that_draws_random_numbers_is_refused_and_the_random_state_kept(structure, generator):
    model = ResidualWithDropPath().double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    data = [(x, targets("classification", 6, generator=generator))]
    options = {"n_subset": 6} if structure == "gp" else {}
    la = Laplace(model.eval(), "classification", subset_of_weights="all", hessian_structure=structure, **options)
    la.fit(data)  # eval mode: the drop-path is the identity
    model.train()
    state = torch.get_rng_state()
    for call in (
        lambda: la(x),
        lambda: Laplace(model, "classification", hessian_structure=structure, **options).fit(data),
    ):
        with pytest.raises(ValueError, match="the model's forward draws random numbers.*call model.eval"):
            call()
        assert torch.equal(torch.get_rng_state(), state)


class ChannelsLast(nn.Module):
    """A Linear-Tanh-Linear on (N, H, W, d) image tokens, or on the same tokens flattened to (N, H W, d)."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.norm, self.second, self.flatten = nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2), flatten

    def forward(self, x):
        x = x.flatten(1, 2) if self.flatten else x
        return self.second(torch.tanh(self.norm(self.first(x)))).mean(tuple(range(1, x.dim() - 1)))


def test_channels_last_tokens_are_the_flattened_tokens(generator):
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 4, classes=2, generator=generator)
    answers = []
    for flatten in (False, True):
        model = ChannelsLast(flatten).double()
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
        la.fit([(x, y)])
        answers.append([la.log_marginal_likelihood(), la.functional_variance(x)[1]])
        model = ChannelsLast(flatten).double()  # K-FAC's hooks on a model of its own
        pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=0.1)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        answers[-1] += [p.grad for p in model.parameters()]
    for grid, flat in zip(*answers, strict=True):
        torch.testing.assert_close(grid, flat)


@pytest.mark.parametrize("convnet", [False, True])  # a batched backward (crashed before), plain ones (silent)
def test_a_laplace_posterior_between_kfac_steps_leaves_the_factors_alone(convnet, generator):
    x = torch.randn(6, *((2, 5, 5) if convnet else (3, 2, 3)), dtype=torch.float64, generator=generator)
    y = targets("classification", 6, classes=3 if convnet else 2, generator=generator)
    grads = []
    for with_laplace in (False, True):
        model = batchnorm_cnn() if convnet else ChannelsLast(False).double()
        pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=0.1)
        for step in range(2):
            if with_laplace and step == 1:  # a validation fit and GLM predictive in the training loop
                la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
                la.fit([(x, y)])
                la(x)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, interleaved in zip(*grads, strict=True):
        torch.testing.assert_close(interleaved, plain, rtol=0, atol=0)
