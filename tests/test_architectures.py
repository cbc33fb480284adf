"""A small ResNet with BatchNorm and a 2-layer transformer with Embedding and LayerNorm, end to end.

laplace-torch's default backend refuses both; here every structure fits them, and the
exact structures (diag, full) equal the dense GGN of torch.func.
"""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, targets
from torch import nn

from fastlaplace import Laplace


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.norm2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        ResidualBlock(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    ).double()
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            with torch.no_grad():
                norm.running_mean.uniform_(-0.3, 0.3)
                norm.running_var.uniform_(0.5, 1.5)
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3)
    return model.eval()


class Attention(nn.Module):
    """Causal single-head self-attention with Linear projections (as nanoGPT's)."""

    def __init__(self, width: int):
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / k.shape[-1] ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.out(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), Attention(width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, vocabulary: int = 7, width: int = 4, length: int = 5, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.tokens, self.positions = nn.Embedding(vocabulary, width), nn.Embedding(length, width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, ids):
        # Positions per sample (N, T): a layer's input must have one row per sample.
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]).expand_as(ids))
        return self.head(self.norm(self.blocks(x))[:, -1])


MODELS = {
    "resnet": (small_resnet, lambda n, g: torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=g)),
    "transformer": (lambda: Transformer().double(), lambda n, g: torch.randint(0, 7, (n, 5), generator=g)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_exact_structures_equal_the_dense_ggn(name, structure, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    x, y = make_inputs(3, generator), targets("classification", 3, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=0.5)
    la.fit([(x, y)])
    ggn = dense_ggn(model, x, "classification")
    assert ggn.shape[0] == sum(la.layer_sizes())
    precision = (torch.diag(ggn.diagonal()) if structure == "diag" else ggn) + 0.5 * torch.eye(ggn.shape[0]).double()
    x_test = make_inputs(2, generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.mT))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["kron", "lowrank"])
def test_kron_and_low_rank_fit_tune_and_predict(name, structure, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    x, y = make_inputs(8, generator), targets("classification", 8, generator=generator)
    options = {"low_rank": 5} if structure == "lowrank" else {}
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, **options)
    la.fit([(x[:4], y[:4]), (x[4:], y[4:])])
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(n_steps=30)
    assert la.log_marginal_likelihood().item() > before
    probs = la(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, dtype=torch.float64))
    mean, cov = la.functional_variance(x)
    assert (cov.diagonal(dim1=1, dim2=2) > 0).all()
    assert torch.isfinite(la.predictive_entropy(x)).all()


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_one_row_of_position_ids_for_the_batch_is_the_same_as_one_per_sample(structure, generator):
    class BatchPositions(Transformer):
        def __init__(self, per_sample: bool) -> None:
            super().__init__()
            self.per_sample = per_sample

        def forward(self, ids):
            positions = torch.arange(ids.shape[1])[None]  # (1, T), broadcast over the batch (GPT-2's default)
            x = self.tokens(ids) + self.positions(positions.expand(ids.shape[0], -1) if self.per_sample else positions)
            return self.head(self.norm(self.blocks(x))[:, -1])

    ids = torch.randint(0, 7, (3, 5), generator=generator)
    y = targets("classification", 3, generator=generator)
    fits = []
    for per_sample in (False, True):
        torch.manual_seed(0)
        la = Laplace(BatchPositions(per_sample).double(), "classification", "all", structure)
        la.fit([(ids, y)])
        fits.append((la.log_marginal_likelihood(), *la.functional_variance(ids)))
    for shared, own in zip(*fits, strict=True):
        torch.testing.assert_close(shared, own, rtol=1e-12, atol=1e-12)


def test_a_layer_shared_by_the_batch_is_refused_by_name(generator):
    class SharedPositions(Transformer):
        def forward(self, ids):
            x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
            return self.head(self.norm(self.blocks(x))[:, -1])

    la = Laplace(SharedPositions().double(), "classification", subset_of_weights="all", hessian_structure="diag")
    ids = torch.randint(0, 7, (3, 5), generator=generator)
    with pytest.raises(ValueError, match=r"layer 'positions' got an input of shape \(5,\), not one row per sample"):
        la.fit([(ids, targets("classification", 3, generator=generator))])
