"""Reproducible sampling, cached factorisations and eigendecomposition failures as exceptions."""

import pytest
import torch
from dense import targets, tiny_mlp

from fastlaplace import Laplace, ops


def fitted(structure, likelihood="classification"):
    model = tiny_mlp(bias=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure)
    la.fit([(x, targets(likelihood, 20, generator=generator))])
    return la, x


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
def test_a_seeded_generator_reproduces_every_sampled_quantity(structure):
    la, x = fitted(structure)
    calls = {
        "sample": lambda g: la.sample(5, generator=g),
        "mc": lambda g: la(x, link_approx="mc", n_samples=7, generator=g),
        "nn": lambda g: la(x, pred_type="nn", n_samples=3, generator=g),
    }
    for name, call in calls.items():
        first, again = call(torch.Generator().manual_seed(1)), call(torch.Generator().manual_seed(1))
        other = call(torch.Generator().manual_seed(2))
        torch.testing.assert_close(first, again, rtol=0, atol=0, msg=name)
        assert not torch.allclose(first, other), name


def test_mc_draws_are_independent_per_input():
    la, x = fitted("kron")
    same = x[:1].expand(4, -1)
    probs = la(same, link_approx="mc", n_samples=5, generator=torch.Generator().manual_seed(0))
    # four copies of one input get four different Monte-Carlo estimates
    assert len({tuple(row.tolist()) for row in probs}) == 4


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_kron_eigendecomposition_is_computed_once_per_fit(monkeypatch):
    calls = count_calls(monkeypatch, ops, "batched_eigh")
    la, x = fitted("kron")
    for _ in range(3):
        la(x)
        la.log_marginal_likelihood()
    la.prior_precision = 3.0  # the eigenbasis does not depend on the prior
    la(x)
    assert calls == ["batched_eigh"]
    la.fit([(x, torch.zeros(20, dtype=torch.long))], override=False)
    la(x)
    assert calls == ["batched_eigh", "batched_eigh"]


def test_full_cholesky_is_cached_for_the_prior_it_was_computed_with(monkeypatch):
    la, x = fitted("full")
    calls = count_calls(monkeypatch, torch.linalg, "cholesky_ex")
    first = la(x)
    la(x)
    assert len(calls) == 1
    la.prior_precision = 5.0
    tighter = la(x)
    assert len(calls) == 2 and not torch.allclose(first, tighter)
    # an in-place change of the prior is seen too (the cache compares values)
    la.prior_precision.mul_(0.2)
    torch.testing.assert_close(la(x), first)
    assert len(calls) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_eigendecomposition_of_a_non_finite_factor_raises(bad):
    matrices = [torch.eye(3), torch.eye(4)]
    matrices[1][2, 2] = bad
    with pytest.raises(RuntimeError, match=r"matrices\[1\]"):
        ops.batched_eigh(matrices)
