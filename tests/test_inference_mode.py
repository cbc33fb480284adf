"""A posterior used under torch.inference_mode() answers as outside it and keeps no inference tensor."""

import pytest
import torch
from torch import nn

from fastlaplace import Laplace

STRUCTURES = ["diag", "kron", "ekfac", "full", "lowrank", "gp"]


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(12, 2, 6, 6, dtype=torch.float64, generator=generator), torch.randint(0, 3, (12,))


def posterior(structure: str, subset: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double().eval()
    options = {"n_subset": 12} if structure == "gp" else {}
    return Laplace(model, "classification", subset, structure, **options)


def predictions(la, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = [la(x), la(x, link_approx="bridge"), *la.predict(x, generator=torch.Generator().manual_seed(0))]
    outputs.append(la.predictive_entropy(x))
    if "nn" in la.pred_types:
        outputs.append(la(x, pred_type="nn", n_samples=3, generator=torch.Generator().manual_seed(0)))
    return outputs


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_predictives_under_inference_mode_equal_the_plain_ones_and_leave_the_prior_tunable(structure, subset):
    x, y = data()
    plain, shielded = posterior(structure, subset), posterior(structure, subset)
    plain.fit([(x, y)])
    shielded.fit([(x, y)])
    want = predictions(plain, x[:3])
    with torch.inference_mode():
        x_inference = x[:3].clone()
        got = predictions(shielded, x_inference)  # the first predictive: caches are made here
        evidence = shielded.log_marginal_likelihood()
    for g, w in zip(got, want, strict=True):
        assert not g.is_inference() and not g.requires_grad
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not evidence.is_inference()
    # What was cached under inference mode still joins autograd graphs afterwards.
    plain.optimize_prior_precision(method="marglik", n_steps=5)
    shielded.optimize_prior_precision(method="marglik", n_steps=5)
    torch.testing.assert_close(shielded.prior_precision, plain.prior_precision, rtol=1e-12, atol=0)
    torch.testing.assert_close(shielded(x[:3]), plain(x[:3]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_a_fit_under_inference_mode_equals_the_plain_fit_and_can_be_extended(structure):
    x, y = data()
    plain = posterior(structure, "all")
    plain.fit([(x, y)])
    shielded = posterior(structure, "all")
    with torch.inference_mode():
        shielded.fit([(x.clone(), y.clone())])
    for got, want in zip(shielded._curvature_tensors(), plain._curvature_tensors(), strict=True):
        assert not got.is_inference()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    more = data(seed=1)
    plain.fit([more], override=False)
    shielded.fit([more], override=False)
    torch.testing.assert_close(shielded.log_marginal_likelihood(), plain.log_marginal_likelihood())
