"""Embedding, LayerNorm and BatchNorm layers: exact for diag / full / low rank; K-FAC and unit-wise blocks in Kron."""

import pytest
import torch
from dense import TinyRMSNorm, augmented_jacobian, dense_ggn, layer_sizes, targets
from torch import nn

from fastlaplace import Laplace


class MeanOverTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


def token_model() -> nn.Module:
    """Embedding -> LayerNorm -> Linear on every token -> mean -> Linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Tanh(), MeanOverTokens(), nn.Linear(4, 3)
    ).double()
    with torch.no_grad():  # away from the identity initialisation so every entry matters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def padded_token_model() -> nn.Module:
    """:func:`token_model` with ``padding_idx=0``: torch never updates row 0 (ids 0 still feed the mean)."""
    model = token_model()
    model[0].padding_idx = 0
    return model


def rms_norm_token_model(norm: type[nn.Module]) -> nn.Module:
    """Embedding -> an RMSNorm (torch's, or one written as Hugging Face's) -> Linear on every token -> mean -> head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), norm(4), nn.Linear(4, 4), nn.Tanh(), MeanOverTokens(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model.double()


def batchnorm_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).double()
    _set_batchnorm_state(model[1])
    return model.eval()


def groupnorm_cnn() -> nn.Module:
    """Conv2d -> GroupNorm(2 groups of 2 channels) -> Tanh -> Linear: per-sample statistics, no running ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).double()
    _set_affine(model[1])
    return model


def grouped_cnn() -> nn.Module:
    """Conv2d (padding 'same'), BatchNorm, ReLU6, a depthwise 3 x 3 Conv2d, a 2-group 1 x 1 Conv2d, a pooled Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same"),
        nn.BatchNorm2d(4),
        nn.ReLU6(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Tanh(),
        nn.Conv2d(4, 6, 1, groups=2, bias=False),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    _set_batchnorm_state(model[1])
    return model.eval()


class LayerNorm2d(nn.LayerNorm):
    """torchvision's and timm's ConvNeXt LayerNorm2d: a LayerNorm over the channels of (N, C, H, W) images."""

    def forward(self, x):
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """A depthwise 3 x 3 Conv2d, then LayerNorm and two Linear layers on the channels-last image, and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm, self.up, self.down = (
            nn.LayerNorm(channels),
            nn.Linear(channels, 2 * channels),
            nn.Linear(2 * channels, channels),
        )

    def forward(self, x):
        h = self.down(nn.functional.gelu(self.up(self.norm(self.depthwise(x).permute(0, 2, 3, 1)))))
        return x + h.permute(0, 3, 1, 2)


def convnext_cnn() -> nn.Module:
    """A stem Conv2d and LayerNorm2d, one ConvNeXt block, average pooling and a head: channels-last Linear layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 2, stride=2),
        LayerNorm2d(4),
        ConvNeXtBlock(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    _set_affine(model[1])
    return model


def batchnorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    _set_batchnorm_state(model[1])
    return model.eval()


def _set_batchnorm_state(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    _set_affine(norm)


def _set_affine(norm):
    """A norm layer's scale and shift drawn away from (1, 0)."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)


def token_ids(n, generator):
    return torch.randint(0, 7, (n, 5), generator=generator)  # 5 tokens of 7: repeats within a sample


MODELS = {
    "tokens": (token_model, token_ids),
    "batchnorm_cnn": (batchnorm_cnn, lambda n, g: torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=g)),
    "batchnorm_mlp": (batchnorm_mlp, lambda n, g: torch.randn(n, 3, dtype=torch.float64, generator=g)),
    "groupnorm_cnn": (groupnorm_cnn, lambda n, g: torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=g)),
    "grouped_cnn": (grouped_cnn, lambda n, g: torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=g)),
    "convnext_cnn": (convnext_cnn, lambda n, g: torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=g)),
    "padding_idx": (padded_token_model, token_ids),
    "rms_norm": (lambda: rms_norm_token_model(nn.RMSNorm), token_ids),
    "hf_rms_norm": (lambda: rms_norm_token_model(TinyRMSNorm), token_ids),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_exact_structures_equal_the_dense_ggn(name, structure, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    x = make_inputs(4, generator)
    y = targets("classification", 4, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=0.7)
    la.fit([(x[:2], y[:2]), (x[2:], y[2:])])
    ggn = dense_ggn(model, x, "classification")
    curvature = torch.diag(ggn.diagonal()) if structure == "diag" else ggn
    precision = curvature + 0.7 * torch.eye(ggn.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        la.log_det_posterior(la.prior_precision, la.sigma_noise) - la.log_det_prior(la.prior_precision),
        torch.logdet(precision) - ggn.shape[0] * torch.log(torch.tensor(0.7, dtype=torch.float64)),
    )
    x_test = make_inputs(3, generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))


def test_kron_leaves_the_padding_row_of_an_embedding_to_the_prior(generator):
    model = padded_token_model()
    x = token_ids(4, generator)
    assert (x == 0).any()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("classification", 4, generator=generator))])
    counts = la.embedding_curvature.counts[0]
    assert counts[0] == 0 and counts.sum() == (x != 0).sum()
    draws = la.sample(200, generator=torch.Generator().manual_seed(0))[:, :4]  # row 0: the prior's N(0, 1 / δ)
    torch.testing.assert_close(draws.var(0), torch.ones(4, dtype=torch.float64), rtol=0.3, atol=0)


def test_full_rank_low_rank_posterior_with_embedding_and_layernorm(generator):
    model = token_model()
    x = token_ids(1, generator)
    y = targets("classification", 1, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="lowrank", low_rank=3)
    la.fit([(x, y)])
    ggn = dense_ggn(model, x, "classification")
    precision = ggn + torch.eye(ggn.shape[0], dtype=torch.float64)
    x_test = token_ids(2, generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))


def test_kron_uses_exact_unitwise_blocks_for_batchnorm(generator):
    model = batchnorm_mlp()
    x = torch.randn(1, 3, dtype=torch.float64, generator=generator)  # one datum: K-FAC exact for Linear layers
    y = targets("classification", 1, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=0.5)
    la.fit([(x, y)])
    ggn = dense_ggn(model, x, "classification")
    blocks, start = [], 0
    for size, module in zip(layer_sizes(model), [model[0], model[1], model[3]], strict=True):
        block = ggn[start : start + size, start : start + size]
        if isinstance(module, nn.BatchNorm1d):  # each feature's (γ_i, β_i) pair: 2 x 2 blocks
            block = torch.block_diag(*[block[i : i + 2, i : i + 2] for i in range(0, size, 2)])
        blocks.append(block)
        start += size
    precision = torch.block_diag(*blocks) + 0.5 * torch.eye(ggn.shape[0], dtype=torch.float64)
    x_test = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))
    expected = torch.logdet(precision) - ggn.shape[0] * torch.log(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(
        la.log_det_posterior(la.prior_precision, la.sigma_noise) - la.log_det_prior(la.prior_precision), expected
    )
    draws = la.sample(3, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (3, ggn.shape[0]) and torch.isfinite(draws).all()


def test_kron_blocks_of_a_transformer_are_kfac_and_unitwise(generator):
    model = token_model()
    x = token_ids(3, generator)
    y = targets("classification", 3, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, y)])
    ggn = dense_ggn(model, x, "classification")
    sizes = layer_sizes(model)
    layer_norm = ggn[sizes[0] : sizes[0] + sizes[1], sizes[0] : sizes[0] + sizes[1]]
    expected = torch.stack([layer_norm[i : i + 2, i : i + 2] for i in range(0, sizes[1], 2)])
    torch.testing.assert_close(la.unitwise_curvature.blocks[0], expected)
    torch.testing.assert_close(la.embedding_curvature.counts[0], torch.bincount(x.flatten(), minlength=7).double())
    restored = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    restored.load_state_dict(la.state_dict())
    torch.testing.assert_close(restored(x), la(x))


@pytest.mark.parametrize("norm", [nn.RMSNorm, TinyRMSNorm], ids=["torch", "hugging-face-like"])
def test_kron_blocks_of_an_rms_norm_are_its_exact_per_feature_curvature(norm, generator):
    model = rms_norm_token_model(norm)
    x = token_ids(3, generator)
    y = targets("classification", 3, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x[:2], y[:2]), (x[2:], y[2:])])
    ggn = dense_ggn(model, x, "classification")
    sizes = layer_sizes(model)
    rms_norm = ggn[sizes[0] : sizes[0] + sizes[1], sizes[0] : sizes[0] + sizes[1]]
    torch.testing.assert_close(la.unitwise_curvature.blocks[0], rms_norm.diagonal().reshape(-1, 1, 1))
    restored = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    restored.load_state_dict(la.state_dict())
    torch.testing.assert_close(restored(x), la(x))


class OffsetRMSNorm(TinyRMSNorm):
    """Gemma's form: ``(1 + weight) * x / rms(x)``, whose curvature in the weight is not an RMSNorm's scale."""

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_a_layer_named_rms_norm_with_another_formula_is_refused_by_name(generator):
    model = rms_norm_token_model(OffsetRMSNorm)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    x, y = token_ids(2, generator), targets("classification", 2, generator=generator)
    with pytest.raises(ValueError, match=r"layer '1' \(OffsetRMSNorm\) is taken for an RMSNorm by its name, but"):
        la.fit([(x, y)])


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("tracked", [True, False], ids=["training-mode", "no-running-statistics"])
def test_batchnorm_normalising_by_the_batch_is_refused_and_left_as_it_was(subset, tracked, generator):
    # Each output would depend on the whole batch: Σ_k g_k g_kᵀ of the batch's columns then mixes the
    # samples (not the GGN), and every forward would update the running statistics.
    model = batchnorm_mlp()
    fitted = Laplace(model, "classification", subset_of_weights=subset, hessian_structure="diag")
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    fitted.fit([(x, targets("classification", 6, generator=generator))])
    if tracked:
        model.train()
    else:
        model[1].running_mean = model[1].running_var = None
    buffers = [b.clone() for b in model.buffers()]
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure="diag")
    reason = "is in training mode" if tracked else "has no running statistics"
    with pytest.raises(ValueError, match=rf"module '1' \(BatchNorm1d\) {reason}: it normalises by each batch"):
        la.fit([(x, targets("classification", 6, generator=generator))])
    with pytest.raises(ValueError, match=reason):
        fitted(x, pred_type="glm")
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))


def test_layernorm_over_several_dimensions_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((2, 4))).double()
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\) must normalise the last dimension only"):
        Laplace(model, "regression", subset_of_weights="all")


class LowRankAdapted(nn.Module):
    """A frozen Linear plus a trainable low-rank update (LoRA), then a trainable head."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 5)
        self.lora_a = nn.Linear(4, 2, bias=False)
        self.lora_b = nn.Linear(2, 5, bias=False)
        self.head = nn.Linear(5, 3)
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x) + self.lora_b(self.lora_a(x))))


def test_only_trainable_parameters_are_covered(generator):
    torch.manual_seed(0)
    model = LowRankAdapted().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    y = targets("classification", 5, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full")
    la.fit([(x, y)])
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    jac = torch.func.vmap(
        torch.func.jacrev(lambda p, xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]), (None, 0)
    )(trainable, x)
    head = torch.cat([jac["head.weight"], jac["head.bias"].unsqueeze(-1)], -1)
    blocks = [jac["lora_a.weight"].flatten(2), jac["lora_b.weight"].flatten(2), head.flatten(2)]
    full_jac = torch.cat(blocks, -1)  # (N, C, P) in [W | b] order, frozen base left out
    probs = model(x).detach().softmax(-1)
    hessians = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    ggn = torch.einsum("ncp,ncd,ndq->pq", full_jac, hessians, full_jac)
    precision = ggn + torch.eye(ggn.shape[0], dtype=torch.float64)
    assert [name for name, _ in la.layers] == ["lora_a", "lora_b", "head"]
    torch.testing.assert_close(la.functional_variance(x)[1], full_jac @ torch.linalg.solve(precision, full_jac.mT))


class NotALayerNorm2d(nn.LayerNorm):
    """Named as a LayerNorm2d, but normalising each channel over the image instead."""

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-2:]) * self.weight[:, None, None] + self.bias[:, None, None]


NotALayerNorm2d.__name__ = "LayerNorm2d"


def test_a_layer_named_layer_norm_2d_with_another_formula_is_refused(generator):
    model = nn.Sequential(nn.Conv2d(2, 4, 1), NotALayerNorm2d(4), nn.Flatten(), nn.Linear(36, 3)).double()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=generator)
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm2d\) is taken for a LayerNorm over the channels"):
        la.fit([(x, targets("classification", 3, generator=generator))])
