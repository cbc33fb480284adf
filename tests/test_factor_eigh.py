"""factor_eigh: a failing float32 eigensolver is retried in float64, then with a documented shift; never raised."""

import pytest
import torch
from torch import nn

from fastlaplace import ops
from fastlaplace.curvature import eigen
from fastlaplace.curvature.eigen import factor_eigh
from fastlaplace.optim import KFACPreconditioner


def factors(dtype=torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 12, dtype=torch.float64))
    x[:, :4] = 0  # exact zero rows, as dead ReLU or max-pool inputs give
    g = torch.randn(32, 5, dtype=torch.float64)
    return [(x.T @ x).to(dtype), (g.T @ g).to(dtype)]


def assert_reconstructs(values, vectors, matrices, atol):
    for v, q, m in zip(values, vectors, matrices, strict=True):
        assert v.dtype == m.dtype and q.dtype == m.dtype
        torch.testing.assert_close((q * v) @ q.T, m, atol=atol, rtol=0)


def failing_solver(monkeypatch, fail_dtypes):
    """ops.batched_eigh raising LAPACK's error for the dtypes given (float64 only on its first call)."""
    solve, calls = ops.batched_eigh, []

    def fails(matrices):
        calls.append(matrices[0].dtype)
        first64 = matrices[0].dtype == torch.float64 and calls.count(torch.float64) == 1
        if matrices[0].dtype in fail_dtypes and (matrices[0].dtype == torch.float32 or first64):
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return solve(matrices)

    monkeypatch.setattr(ops, "batched_eigh", fails)
    return calls


def test_a_float32_failure_is_retried_in_float64(monkeypatch):
    matrices = factors()
    calls = failing_solver(monkeypatch, {torch.float32})
    values, vectors = factor_eigh(matrices)
    assert calls == [torch.float32, torch.float64]
    assert_reconstructs(values, vectors, matrices, atol=1e-4)


def test_a_float64_failure_is_retried_with_a_shift(monkeypatch):
    matrices = factors(torch.float64)
    calls = failing_solver(monkeypatch, {torch.float64})
    values, vectors = factor_eigh(matrices)
    assert calls == [torch.float64, torch.float64]
    assert_reconstructs(values, vectors, matrices, atol=1e-8)
    exact = torch.linalg.eigvalsh(matrices[0])
    shift = eigen.SHIFT * float(matrices[0].diagonal().mean())
    torch.testing.assert_close(values[0], exact, atol=10 * shift, rtol=0)


def test_non_finite_factors_still_raise():
    matrices = factors()
    matrices[0][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        factor_eigh(matrices)


def test_kfac_keeps_training_when_float32_eigh_fails(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pre = KFACPreconditioner(model, inv_update_steps=1)
    calls = failing_solver(monkeypatch, {torch.float32})
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
        pre.step()
    assert torch.float64 in calls
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(basis.q_a.dtype == torch.float32 for basis in pre.eigendecomposition())
