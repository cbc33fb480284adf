"""last_layer_name and feature_reduction: a last layer inside a sequence model, as laplace-torch's."""

import pytest
import torch
from dense import targets
from torch import nn

from fastlaplace import Laplace


class Tokens(nn.Module):
    """Per-token features and a per-token head: outputs (N, T, C)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.body(ids))


class Reduced(nn.Module):
    def __init__(self, body, head, reduce):
        super().__init__()
        self.body, self.head, self.reduce = body, head, reduce

    def forward(self, ids):
        return self.head(self.reduce(self.body(ids)))


REDUCTIONS = {"pick_first": lambda f: f[:, 0], "pick_last": lambda f: f[:, -1], "average": lambda f: f.mean(1)}


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_reduced_features_give_the_posterior_of_the_explicit_model(reduction, structure, generator):
    model = Tokens().double()
    ids = torch.randint(0, 7, (6, 5), generator=generator)
    y = targets("classification", 6, generator=generator)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=structure,
        last_layer_name="head",
        feature_reduction=reduction,
    )
    la.fit([(ids[:3], y[:3]), (ids[3:], y[3:])])
    explicit = Reduced(model.body, model.head, REDUCTIONS[reduction])
    reference = Laplace(explicit, "classification", subset_of_weights="last_layer", hessian_structure=structure)
    reference.fit([(ids[:3], y[:3]), (ids[3:], y[3:])])
    torch.testing.assert_close(la.log_marginal_likelihood(), reference.log_marginal_likelihood())
    torch.testing.assert_close(la(ids), reference(ids))
    torch.testing.assert_close(
        la.sample(4, torch.Generator().manual_seed(1)), reference.sample(4, torch.Generator().manual_seed(1))
    )


def test_a_named_last_layer_without_reduction(generator):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Softmax(-1)).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 5, classes=2, generator=generator)
    with pytest.raises(ValueError, match="is a Softmax, not an nn.Linear; name the last layer"):
        Laplace(model, "classification", subset_of_weights="last_layer")
    la = Laplace(model, "classification", subset_of_weights="last_layer", last_layer_name="2")
    la.fit([(x, y)])
    torch.testing.assert_close(la.functional_variance(x)[0], model[:3](x).detach())  # the Softmax is not part of f


def test_bad_names_and_reductions_are_refused(generator):
    model = Tokens().double()
    with pytest.raises(ValueError, match=r"last_layer_name='tail' is not a module of the model; its Linear layers"):
        Laplace(model, "classification", subset_of_weights="last_layer", last_layer_name="tail")
    with pytest.raises(ValueError, match=r"last_layer_name='body.2' is a Tanh, not an nn.Linear"):
        Laplace(model, "classification", subset_of_weights="last_layer", last_layer_name="body.2")
    with pytest.raises(ValueError, match="feature_reduction needs last_layer_name"):
        Laplace(model, "classification", subset_of_weights="last_layer", feature_reduction="average")
    with pytest.raises(ValueError, match="apply to subset_of_weights='last_layer'"):
        Laplace(model, "classification", subset_of_weights="all", last_layer_name="head")
    with pytest.raises(ValueError, match="feature_reduction must be None or one of"):
        Laplace(
            model, "classification", subset_of_weights="last_layer", last_layer_name="head", feature_reduction="max"
        )
    flat = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    la = Laplace(
        flat, "classification", subset_of_weights="last_layer", last_layer_name="1", feature_reduction="average"
    )
    with pytest.raises(ValueError, match=r"needs \(N, T, d\) features, got \(2, 4\)"):
        la.fit([(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))])


class RandomTokens(Tokens):
    """Tokens whose features are randomly masked while ``random`` is set (a custom dropout, no Dropout module)."""

    random = False

    def forward(self, ids):
        features = self.body(ids)
        return self.head(features * (torch.rand_like(features) > 0.5) if self.random else features)


def test_reduced_features_of_a_model_that_draws_random_numbers_are_refused(generator):
    ids = torch.randint(0, 7, (4, 5), generator=generator)
    model = RandomTokens().double()
    la = Laplace(model, "classification", last_layer_name="head", feature_reduction="average")
    la.fit([(ids, targets("classification", 4, generator=generator))])
    model.random = True
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="the model's forward draws random numbers"):
        la(ids)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="the model's forward draws random numbers"):
        la(ids, pred_type="nn", n_samples=3)
