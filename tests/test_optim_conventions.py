"""K-FAC conventions: kfac-pytorch's preconditioned gradient re-derived from its formulas, and the momentum KL clip."""

import pytest
import torch
from test_optim import backward, data, gradient_matrix, kron_layers, layer_inputs_and_output_grads, make
from torch import nn

from fastlaplace.optim import KFACPreconditioner


def kfac_pytorch_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, decay: float) -> list[tuple]:
    """Per layer kfac-pytorch's ``(A, G)`` after its first update, from its formulas.

    A layer's input rows (a Conv2d's patches) get a ones column for the bias and, for a
    Conv2d, are divided by its L output locations; so are a Conv2d's output gradient rows,
    taken from the mean loss as they arrive. Each factor is the mean of its rows' outer
    products, blended into the identity it starts from.
    """
    factors = []
    for m, a, g in layer_inputs_and_output_grads(model, x, y, "mean"):
        if isinstance(m, nn.Conv2d):
            rows = nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            locations = rows.shape[1]
            rows = rows.reshape(-1, rows.shape[-1])
            g_rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) / locations
        else:
            rows, g_rows, locations = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]), 1
        if m.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        rows = rows / locations
        pair = []
        for r in (rows, g_rows):
            covariance = r.T @ r / r.shape[0]
            pair.append(decay * torch.eye(r.shape[1], dtype=r.dtype) + (1 - decay) * covariance)
        factors.append(tuple(pair))
    return factors


def kfac_pytorch_step(factors, grads, damping: float, kl_clip: float, lr: float) -> list[torch.Tensor]:
    """kfac-pytorch's eigen preconditioning ``Q_G [(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + δ)] Q_Aᵀ``, then its KL clip."""
    natural = []
    for (a, g), v in zip(factors, grads, strict=True):
        d_a, q_a = torch.linalg.eigh(a)
        d_g, q_g = torch.linalg.eigh(g)
        scaled = (q_g.T @ v @ q_a) / (torch.outer(d_g.clamp(min=0), d_a.clamp(min=0)) + damping)
        natural.append(q_g @ scaled @ q_a.T)
    vg_sum = sum((n * v * lr**2).sum() for n, v in zip(natural, grads, strict=True))
    nu = min(1.0, float(torch.sqrt(kl_clip / vg_sum.abs())))
    return [n * nu for n in natural]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("kl_clip", [1e-3, 1e3])
def test_kfac_pytorch_conventions_give_its_preconditioned_gradient(model_name, kl_clip):
    model = make(model_name)
    x, y = data(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # kfac-pytorch ignores the momentum
    pre = KFACPreconditioner(model, conventions="kfac-pytorch", kl_clip=kl_clip, lr=optimizer)
    backward(model, x, y)
    grads = [gradient_matrix(m) for m in kron_layers(model)]
    pre.step()
    expected_factors = kfac_pytorch_factors(model, x, y, decay=0.95)
    for i, (a, g) in enumerate(expected_factors):
        torch.testing.assert_close(pre.curvature.input_factors[i], a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pre.curvature.output_factors[i], g, rtol=1e-12, atol=1e-12)
    expected = kfac_pytorch_step(expected_factors, grads, damping=1e-3, kl_clip=kl_clip, lr=0.1)
    for m, e in zip(kron_layers(model), expected, strict=True):
        torch.testing.assert_close(gradient_matrix(m), e, rtol=1e-9, atol=1e-12)


def test_kfac_pytorch_conventions_refuse_reduce():
    with pytest.raises(ValueError, match="kfac_approx='reduce'"):
        KFACPreconditioner(make("cnn"), conventions="kfac-pytorch", kfac_approx="reduce")


def preconditioner_norm(pre: KFACPreconditioner, deltas: list[torch.Tensor]) -> float:
    """``Σ_l ⟨D_l, (A_l ⊗ G_l + δ_l) D_l⟩`` with the eigenpairs and dampings in use."""
    total = 0.0
    relative = pre.conventions.relative_damping
    for (q_a, l_a, q_g, l_g), d in zip(pre.eigendecomposition(), deltas, strict=True):
        l_a, l_g = l_a.clamp_min(0), l_g.clamp_min(0)
        damping = pre.damping * (l_a.mean() * l_g.mean() if relative else 1.0)
        total += float(((q_g.T @ d @ q_a) ** 2 * (torch.outer(l_g, l_a) + damping)).sum())
    return total


@pytest.mark.parametrize("conventions, bounded", [("fastlaplace", True), ("fastlaplace-v0", False)])
def test_momentum_cannot_take_the_step_beyond_the_kl_clip(conventions, bounded):
    """With SGD momentum μ each step's ``lr² ⟨Δθ, (F + δ) Δθ⟩`` stays within kl_clip (the metric held fixed)."""
    model = make("mlp")
    lr, clip = 0.3, 1e-4
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = KFACPreconditioner(model, kl_clip=clip, lr=optimizer, inv_update_steps=100, conventions=conventions)
    largest = 0.0
    for _ in range(8):
        backward(model, *data("mlp"))  # one batch: the momentum builds up
        pre.step()
        before = [gradient_matrix_of_weights(m) for m in kron_layers(model)]
        optimizer.step()
        deltas = [gradient_matrix_of_weights(m) - b for m, b in zip(kron_layers(model), before, strict=True)]
        largest = max(largest, preconditioner_norm(pre, deltas))
    assert (largest <= clip * (1 + 1e-9)) == bounded
    assert largest > clip / 10  # the clip is what limits the steps


def gradient_matrix_of_weights(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().reshape(m.weight.shape[0], -1)
    return w.clone() if m.bias is None else torch.cat([w, m.bias.detach()[:, None]], dim=1)


def test_adam_betas_are_not_momentum():
    model = make("mlp")
    x, y = data("mlp")
    natural = []
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.3), torch.optim.Adam(model.parameters(), lr=0.3)):
        pre = KFACPreconditioner(model, kl_clip=1e-6, lr=optimizer)
        backward(model, x, y)
        pre.step()
        pre.remove()
        natural.append([gradient_matrix(m) for m in kron_layers(model)])
    for s, a in zip(*natural, strict=True):
        torch.testing.assert_close(s, a)


def test_momentum_of_one_is_named():
    model = make("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=1.0)
    pre = KFACPreconditioner(model, lr=optimizer)
    backward(model, *data("mlp"))
    with pytest.raises(ValueError, match="momentum must be below 1"):
        pre.step()
