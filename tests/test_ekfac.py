"""EKFAC in the K-FAC preconditioner: the measured second moments and the step, against per-datum brute force."""

import pytest
import torch
from test_optim import backward, data, gradient_matrix, kron_layers, layer_inputs_and_output_grads, make
from torch import nn

import fastlaplace.ops as ops
from fastlaplace.optim import KFACPreconditioner


def per_datum_gradients(model_name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``(N, d_G, d_A)``: each datum's loss gradient as a ``[W | b]`` matrix, one backward per datum.

    On a fresh model with the same weights: the preconditioner's hooks must not see these forwards.
    """
    weights, model = model.state_dict(), make(model_name)
    model.load_state_dict(weights)
    rows = []
    for n in range(x.shape[0]):
        backward(model, x[n : n + 1], y[n : n + 1], reduction="sum")
        rows.append([gradient_matrix(m) for m in kron_layers(model)])
    return [torch.stack(layer) for layer in zip(*rows, strict=True)]


def rotated_moments(gradients: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """``(d_G, d_A)`` mean over the data of ``(Q_Gᵀ ∇W_n Q_A)²``."""
    return (q_g.T @ gradients @ q_a).square().mean(0)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "sequence"])
def test_scales_and_step_between_refreshes_equal_the_brute_force(model_name):
    model = make(model_name)
    decay, damping = 0.7, 0.1
    pre = KFACPreconditioner(
        model, damping=damping, inv_update_steps=3, factor_decay=decay, kl_clip=None, damping_mode="ekfac"
    )
    x0, y0 = data(model_name, seed=0)
    backward(model, x0, y0)
    pre.step()  # a refresh: S = μ λᵀ
    bases = pre.eigendecomposition()
    for basis in bases:
        torch.testing.assert_close(basis.scales, torch.outer(basis.l_g.clamp_min(0), basis.l_a.clamp_min(0)))
    x1, y1 = data(model_name, seed=1)
    expected_scales = [
        decay * basis.scales + (1 - decay) * rotated_moments(g, basis.q_a, basis.q_g)
        for basis, g in zip(bases, per_datum_gradients(model_name, model, x1, y1), strict=True)
    ]
    backward(model, x1, y1)
    grads = [gradient_matrix(m) for m in kron_layers(model)]
    pre.step()  # no refresh: S corrected by the batch
    for basis, scales, grad, m in zip(
        pre.eigendecomposition(), expected_scales, grads, kron_layers(model), strict=True
    ):
        torch.testing.assert_close(basis.scales, scales, rtol=1e-10, atol=1e-12)
        delta = damping * scales.mean()  # the default conventions' relative damping
        natural = basis.q_g @ ((basis.q_g.T @ grad @ basis.q_a) / (scales + delta)) @ basis.q_a.T
        torch.testing.assert_close(gradient_matrix(m), natural, rtol=1e-9, atol=1e-12)


def test_refreshing_at_every_factor_update_is_eigen_kfac():
    steps = []
    for mode in ("eigen", "ekfac"):
        model = make("mlp")
        pre = KFACPreconditioner(model, damping_mode=mode, inv_update_steps=2, factor_update_steps=2)
        grads = []
        for seed in range(4):
            backward(model, *data("mlp", seed=seed))
            pre.step()
            grads.append([gradient_matrix(m) for m in kron_layers(model)])
        steps.append(grads)
    for eigen, ekfac in zip(*steps, strict=True):
        for a, b in zip(eigen, ekfac, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_measured_scales_are_the_best_diagonal_in_the_kronecker_basis():
    # George et al.: with S the diagonal of F in Q_A ⊗ Q_G, Q diag(S) Qᵀ is nearer F than A ⊗ G (Frobenius)
    model = make("mlp")
    x, y = data("mlp", n=12)
    layers = layer_inputs_and_output_grads(model, x, y, "sum")
    for gradients, (m, inputs, output_grads) in zip(per_datum_gradients("mlp", model, x, y), layers, strict=True):
        n, d_g, d_a = gradients.shape
        vectors = gradients.reshape(n, -1)
        fisher = vectors.T @ vectors / n
        if m.bias is not None:
            inputs = torch.cat([inputs, inputs.new_ones(n, 1)], dim=1)
        a, g = inputs.T @ inputs / n, output_grads.T @ output_grads / n  # one datum's Kronecker factors
        _, q_a = torch.linalg.eigh(a)
        _, q_g = torch.linalg.eigh(g)
        scales = [torch.zeros(d_g, d_a, dtype=torch.float64)]
        ops.ekfac_scales_(scales, [inputs], [output_grads], [q_a], [q_g], weight=1 / n)
        basis = torch.kron(q_g, q_a)
        ekfac = basis @ torch.diag(scales[0].reshape(-1)) @ basis.T
        torch.testing.assert_close(torch.diag(basis.T @ fisher @ basis), scales[0].reshape(-1))
        assert torch.linalg.norm(fisher - ekfac) < torch.linalg.norm(fisher - torch.kron(g, a)), m


def test_state_dict_round_trip_continues_identically():
    def run(resume: bool) -> list[torch.Tensor]:
        model = make("mlp")
        pre = KFACPreconditioner(model, damping_mode="ekfac", inv_update_steps=3)
        for seed in range(2):
            backward(model, *data("mlp", seed=seed))
            pre.step()
        if resume:
            state = pre.state_dict()
            pre = KFACPreconditioner(model, damping_mode="ekfac", inv_update_steps=3)
            pre.load_state_dict(state)
        backward(model, *data("mlp", seed=2))
        pre.step()
        return [gradient_matrix(m) for m in kron_layers(model)]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_tampered_or_foreign_state_is_refused_by_name():
    model = make("mlp")
    pre = KFACPreconditioner(model, damping_mode="ekfac", inv_update_steps=3)
    backward(model, *data("mlp"))
    pre.step()
    state = pre.state_dict()
    wrong = dict(state, eigendecomposition=[(*b[:4], b[4][:, :-1]) for b in state["eigendecomposition"]])
    with pytest.raises(ValueError, match=r"the saved scales is \(\d+, \d+\) \(it must be"):
        KFACPreconditioner(model, damping_mode="ekfac").load_state_dict(wrong)
    with pytest.raises(ValueError, match="conventions='fastlaplace', this preconditioner has 'kfac-pytorch'"):
        KFACPreconditioner(model, damping_mode="ekfac", conventions="kfac-pytorch").load_state_dict(state)
    with pytest.raises(ValueError, match="damping_mode='ekfac', this preconditioner has 'eigen'"):
        KFACPreconditioner(model).load_state_dict(state)


def test_gradient_broadcast_is_refused_with_ekfac():
    with pytest.raises(ValueError, match="damping_mode='ekfac' needs every layer's eigenbasis on every rank"):
        KFACPreconditioner(make("mlp"), damping_mode="ekfac", broadcast="gradient")
