"""K-FAC preconditioner: natural gradients against dense matrices built independently, schedules, options."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastlaplace.ops as ops
from fastlaplace.optim import KFACPreconditioner


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.ReLU(), nn.Linear(3, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),  # in place after a hooked layer: the captured gradient must not change
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def sequence_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))


def data(model_name: str, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 4), "cnn": (n, 2, 4, 4), "sequence": (n, 2, 3)}[model_name]
    return torch.randn(shape, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


MODELS = {"mlp": mlp, "cnn": cnn, "sequence": sequence_model}


def make(model_name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_name]().double()


def kron_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def layer_inputs_and_output_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str
) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """Per Linear / Conv2d layer, its input and the gradient of the cross-entropy (``reduction``) at its output."""
    layers = kron_layers(model)
    captured = {}

    def capture(module, inputs, output):
        captured[module] = (inputs[0], output)
        return output.clone()  # the model's in-place ops must not change the tensor differentiated at

    hooks = [m.register_forward_hook(capture) for m in layers]
    loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [captured[m][1] for m in layers])
    return [(m, captured[m][0].detach(), g) for m, g in zip(layers, grads, strict=True)]


def dense_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(A, G)`` of one datum, from explicit patches and per-datum output gradients."""
    factors = []
    for m, a, g in layer_inputs_and_output_grads(model, x, y, "sum"):  # a sum's gradient at s_n is datum n's
        if isinstance(m, nn.Conv2d):
            u = nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            g = g.flatten(2).transpose(1, 2)
        else:
            u, g = (a, g) if a.dim() == 3 else (a[:, None], g[:, None])
        if m.bias is not None:
            u = torch.cat([u, u.new_ones(*u.shape[:2], 1)], dim=-1)
        n, locations = u.shape[:2]
        factors.append((torch.einsum("nli,nlj->ij", u, u) / (n * locations), torch.einsum("nli,nlj->ij", g, g) / n))
    return factors


def gradient_matrix(m: nn.Module) -> torch.Tensor:
    g = m.weight.grad.reshape(m.weight.shape[0], -1).clone()
    return g if m.bias is None else torch.cat([g, m.bias.grad[:, None]], dim=1)


def dense_natural_gradient(a, g, grad, damping: float, mode: str) -> torch.Tensor:
    if mode == "eigen":
        precision = torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    else:
        pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
        root = math.sqrt(damping)
        precision = torch.kron(
            g + root / pi * torch.eye(g.shape[0], dtype=g.dtype), a + pi * root * torch.eye(a.shape[0], dtype=a.dtype)
        )
    return torch.linalg.solve(precision, grad.flatten()).view_as(grad)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()


def started(factor: torch.Tensor, level: float, decay: float = 0.95) -> torch.Tensor:
    """The first update's running factor, blended from a start at ``level`` times the identity."""
    return decay * level * torch.eye(factor.shape[0], dtype=factor.dtype) + (1 - decay) * factor


def mean_eigenvalue(factor: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(factor).mean())


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "sequence"])
@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_natural_gradient_equals_dense_solve(model_name, mode):
    """The v0 conventions: one datum's factors, taken from the first batch alone, and δ as it is."""
    model = make(model_name)
    x, y = data(model_name)
    damping = 0.05
    pre = KFACPreconditioner(model, damping=damping, damping_mode=mode, kl_clip=None, conventions="fastlaplace-v0")
    backward(model, x, y)
    grads = [gradient_matrix(m) for m in kron_layers(model)]
    pre.step()
    expected_factors = dense_factors(model, x, y)
    for i, (m, grad, (a, g)) in enumerate(zip(kron_layers(model), grads, expected_factors, strict=True)):
        torch.testing.assert_close(pre.curvature.input_factors[i], a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pre.curvature.output_factors[i], g, rtol=1e-12, atol=1e-12)
        expected = dense_natural_gradient(a, g, grad, damping, mode)
        torch.testing.assert_close(gradient_matrix(m), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "sequence"])
@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_default_conventions_start_from_the_mean_identity_and_damp_relatively(model_name, mode):
    """Default: the first batch's factors blended with their mean eigenvalue times I, δ times m_A m_G."""
    model = make(model_name)
    x, y = data(model_name)
    damping = 0.05
    pre = KFACPreconditioner(model, damping=damping, damping_mode=mode, kl_clip=None)
    backward(model, x, y)
    grads = [gradient_matrix(m) for m in kron_layers(model)]
    pre.step()
    for i, (m, grad, (a, g)) in enumerate(zip(kron_layers(model), grads, dense_factors(model, x, y), strict=True)):
        a, g = started(a, mean_eigenvalue(a)), started(g, mean_eigenvalue(g))
        torch.testing.assert_close(pre.curvature.input_factors[i], a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pre.curvature.output_factors[i], g, rtol=1e-12, atol=1e-12)
        relative = damping * mean_eigenvalue(a) * mean_eigenvalue(g)
        expected = dense_natural_gradient(a, g, grad, relative, mode)
        torch.testing.assert_close(gradient_matrix(m), expected, rtol=1e-9, atol=1e-11)


def test_sum_reduced_loss_gives_the_same_factors():
    model = make("mlp")
    x, y = data("mlp")
    mean = KFACPreconditioner(model, kl_clip=None)
    backward(model, x, y)
    mean.step()
    mean_grads = [gradient_matrix(m) for m in kron_layers(model)]
    mean.remove()
    total = KFACPreconditioner(model, kl_clip=None, loss_reduction="sum")
    backward(model, x, y, reduction="sum")
    total.step()
    for f, h in zip(mean.curvature.output_factors, total.curvature.output_factors, strict=True):
        torch.testing.assert_close(f, h)
    for g, m in zip(mean_grads, kron_layers(model), strict=True):
        torch.testing.assert_close(gradient_matrix(m), g * x.shape[0])


def test_factor_decay_is_an_exponential_moving_average_of_batch_factors():
    model = make("cnn")
    batches = [data("cnn", seed=s) for s in range(3)]
    decay = 0.7
    pre = KFACPreconditioner(model, factor_decay=decay, kl_clip=None, conventions="fastlaplace-v0")
    expected = None
    for x, y in batches:
        twin = make("cnn")  # without the preconditioner's hooks
        twin.load_state_dict(model.state_dict())
        batch = dense_factors(twin, x, y)
        expected = (
            batch
            if expected is None
            else [(decay * a + (1 - decay) * c, decay * g + (1 - decay) * h) for (a, g), (c, h) in zip(expected, batch)]
        )
        backward(model, x, y)
        grads = [gradient_matrix(m) for m in kron_layers(model)]
        pre.step()
    for i, (m, grad, (a, g)) in enumerate(zip(kron_layers(model), grads, expected, strict=True)):
        torch.testing.assert_close(pre.curvature.input_factors[i], a)
        torch.testing.assert_close(pre.curvature.output_factors[i], g)
        torch.testing.assert_close(gradient_matrix(m), dense_natural_gradient(a, g, grad, 1e-3, "eigen"))


def test_update_schedules():
    model = make("mlp")
    pre = KFACPreconditioner(model, factor_update_steps=2, inv_update_steps=3, kl_clip=None)
    factor_updates, eigen_factors = [], []
    for step in range(7):
        before = pre.curvature.num_data
        x, y = data("mlp", seed=step)
        backward(model, x, y)
        pre.step()
        factor_updates.append(pre.curvature.num_data > before)
        eigen_factors.append([q @ torch.diag(v) @ q.T for q, v, _, _ in pre.eigendecomposition()])
    assert factor_updates == [True, False, True, False, True, False, True]
    # eigenpairs of the factors as they were at steps 0, 3 and 6 (those of 0 and 2, and of 6)
    assert all(torch.equal(e, f) for e, f in zip(eigen_factors[0], eigen_factors[2], strict=True))
    assert not torch.allclose(eigen_factors[2][0], eigen_factors[3][0])
    assert all(torch.equal(e, f) for e, f in zip(eigen_factors[3], eigen_factors[5], strict=True))
    for e, a in zip(eigen_factors[6], pre.curvature.input_factors, strict=True):
        torch.testing.assert_close(e, a)


@pytest.mark.parametrize("lr_kind", ["float", "callable", "optimizer"])
def test_kl_clip_scales_to_the_bound(lr_kind):
    model = make("mlp")
    x, y = data("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    lr = {"float": 0.3, "callable": lambda: 0.3, "optimizer": optimizer}[lr_kind]
    free = KFACPreconditioner(model, kl_clip=None)
    backward(model, x, y)
    grads = [gradient_matrix(m) for m in kron_layers(model)]
    free.step()
    natural = [gradient_matrix(m) for m in kron_layers(model)]
    free.remove()
    total = 0.3**2 * sum((g * n).sum() for g, n in zip(grads, natural, strict=True))
    for clip, expected in [(1e-6, math.sqrt(1e-6 / total)), (1e6, 1.0)]:
        clipped = KFACPreconditioner(model, kl_clip=clip, lr=lr)
        backward(model, x, y)
        clipped.step()
        clipped.remove()
        for m, n in zip(kron_layers(model), natural, strict=True):
            torch.testing.assert_close(gradient_matrix(m), n * expected)
    assert expected == 1.0 and math.sqrt(1e-6 / total) < 1


def test_skip_layers_by_name_type_and_class_name():
    model = make("cnn")
    x, y = data("cnn")
    for skip, kept in [(["0"], [2, 4]), ([nn.Conv2d], [4]), (["Linear"], [0, 2])]:
        pre = KFACPreconditioner(model, skip_layers=skip)
        assert [name for name, _ in pre.layers] == [str(k) for k in kept]
        backward(model, x, y)
        plain = {name: p.grad.clone() for name, p in model.named_parameters()}
        pre.step()
        pre.remove()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, plain[name]) != (int(name.split(".")[0]) in kept)


def test_unsupported_layer_is_named_unless_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 1, 1), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(Conv1d\)"):
        KFACPreconditioner(model)
    pre = KFACPreconditioner(model, skip_layers=["1"])
    assert [name for name, _ in pre.layers] == ["0", "2"]
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="'nope'"):
        KFACPreconditioner(model, skip_layers=["nope"])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("damping", 0.0, "damping"),
        ("factor_decay", 1.0, "factor_decay"),
        ("inv_update_steps", 0, "inv_update_steps"),
        ("damping_mode", "inverse", "damping_mode"),
        ("kl_clip", -1.0, "kl_clip"),
        ("loss_reduction", "none", "loss_reduction"),
        ("broadcast", "all", "broadcast"),
        ("conventions", "kfac", "conventions"),
    ],
)
def test_bad_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        KFACPreconditioner(make("mlp"), **{option: value})


def test_step_without_backward_names_the_layers():
    model = make("mlp")
    pre = KFACPreconditioner(model)
    with torch.no_grad():
        model(data("mlp")[0])
    with pytest.raises(RuntimeError, match=r"\['0', '2', '4'\]"):
        pre.step()


def test_bf16_autocast_keeps_float32_factors():
    model, cnn_copy = make("cnn").float(), make("cnn").float()
    x, y = data("cnn")
    x = x.float()
    pre = KFACPreconditioner(model, kl_clip=None, damping=0.1)
    reference = KFACPreconditioner(cnn_copy, kl_clip=None, damping=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    pre.step()
    backward(cnn_copy, x, y)
    reference.step()
    assert all(f.dtype == torch.float32 for f in pre.curvature.input_factors + pre.curvature.output_factors)
    for f, r in zip(pre.curvature.input_factors, reference.curvature.input_factors, strict=True):
        torch.testing.assert_close(f, r, rtol=0.05, atol=0.05 * r.abs().max().item())
    for p, r in zip(model.parameters(), cnn_copy.parameters(), strict=True):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert nn.functional.cosine_similarity(p.grad.flatten(), r.grad.flatten(), dim=0) > 0.95


def train(model, pre, optimizer, steps: int, seed: int) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = data(model_name="mlp", n=16, seed=seed + step)
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if pre is not None:
            pre.step()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_continues_identically():
    model = make("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, inv_update_steps=3, factor_decay=0.8, lr=optimizer)
    train(model, pre, optimizer, 4, seed=0)  # saved between two eigendecomposition updates
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), pre.state_dict()))
    train(model, pre, optimizer, 4, seed=10)
    resumed = make("mlp", seed=1)
    resumed.load_state_dict(saved[0])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(saved[1])
    resumed_pre = KFACPreconditioner(resumed, inv_update_steps=3, factor_decay=0.8, lr=resumed_optimizer)
    resumed_pre.load_state_dict(saved[2])
    train(resumed, resumed_pre, resumed_optimizer, 4, seed=10)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed_pre.steps == pre.steps == 8
    without = KFACPreconditioner(make("mlp"), inv_update_steps=3)
    without.load_state_dict(pre.state_dict(include_eigendecomposition=False))
    for (qa, la, _, _), a in zip(without.eigendecomposition(), pre.curvature.input_factors, strict=True):
        torch.testing.assert_close(qa @ torch.diag(la) @ qa.T, a)
    with pytest.raises(ValueError, match="saved for layers"):
        KFACPreconditioner(make("sequence")).load_state_dict(saved[2])


@pytest.mark.parametrize("optimizer_class, lr", [(torch.optim.SGD, 0.2), (torch.optim.Adam, 0.05)])
def test_trains_with_any_optimizer(optimizer_class, lr):
    model = make("mlp")
    x = data("mlp", n=64, seed=5)[0]
    y = x[:, :3].argmax(1)  # learnable labels
    optimizer = optimizer_class(model.parameters(), lr=lr)
    pre = KFACPreconditioner(model, damping=0.01, lr=optimizer, inv_update_steps=5)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_diverged_factors_name_the_layer():
    model = make("mlp")
    pre = KFACPreconditioner(model, inv_update_steps=2)
    x, y = data("mlp")
    backward(model, x, y)
    pre.step()
    pre.curvature.output_factors[1][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"\['2'\].*NaN"):
        pre.update_eigendecomposition()


def test_hooks_are_registered_only_for_factor_update_steps():
    model = make("cnn")
    layers = kron_layers(model)
    pre = KFACPreconditioner(model, factor_update_steps=3, inv_update_steps=2)
    armed = []
    for step in range(7):
        armed.append(all(len(m._forward_hooks) == 1 for m in layers))
        assert armed[-1] or all(not m._forward_hooks for m in layers)
        backward(model, *data("cnn", seed=step))
        pre.step()
    assert armed == [True, False, False, True, False, False, True]
    pre.remove()
    assert all(not m._forward_hooks for m in layers)
    backward(model, *data("cnn", seed=9))
    pre.step()  # step 7: no factor update, plain preconditioning
    pre.steps = 9  # a factor-update step next: a removed preconditioner stays removed
    pre.load_state_dict(pre.state_dict())
    assert all(not m._forward_hooks for m in layers)


@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_changing_damping_and_learning_rate_between_eigendecompositions(mode):
    # The damped spectra (or inverses) are kept from step to step: a new damping or lr must still be used at once.
    model = make("cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    dampings = iter([0.05, 0.05, 0.2, 0.01])
    current = {}

    def damping():
        current["delta"] = next(dampings)
        return current["delta"]

    pre = KFACPreconditioner(
        model,
        damping=damping,
        damping_mode=mode,
        inv_update_steps=100,
        kl_clip=1e-4,
        lr=optimizer,
        conventions="fastlaplace-v0",
    )
    for step in range(4):
        optimizer.param_groups[0]["lr"] = 0.3 / (step + 1)
        backward(model, *data("cnn", seed=step))
        grads = [gradient_matrix(m) for m in kron_layers(model)]
        pre.step()
        delta = current["delta"]
        if step == 0:  # the factors that step's update averaged, in use from then on
            in_use = [(a.clone(), g.clone()) for a, g in zip(pre.curvature.input_factors, pre.curvature.output_factors)]
        if mode == "eigen":
            natural = [
                ops.kron_solve(
                    [qa],
                    [la],
                    [qg],
                    [lg],
                    [grad],
                    torch.ones(1, dtype=qa.dtype),
                    torch.full((1,), delta, dtype=qa.dtype),
                )[0]
                for (qa, la, qg, lg), grad in zip(pre.eigendecomposition(), grads, strict=True)
            ]
        else:
            natural = [
                dense_natural_gradient(a, g, grad, delta, mode) for (a, g), grad in zip(in_use, grads, strict=True)
            ]
        total = (0.3 / (step + 1)) ** 2 * sum((g * n).sum() for g, n in zip(grads, natural, strict=True))
        nu = min(1.0, math.sqrt(1e-4 / total))
        assert nu < 1
        for m, n in zip(kron_layers(model), natural, strict=True):
            torch.testing.assert_close(gradient_matrix(m), n * nu, rtol=1e-9, atol=1e-12)


def test_factored_mode_keeps_damped_inverses_not_eigenpairs():
    model = make("cnn")
    x, y = data("cnn")
    delta = 0.04
    pre = KFACPreconditioner(model, damping=delta, damping_mode="factored", conventions="fastlaplace-v0")
    with pytest.raises(RuntimeError, match="no factors yet"):
        pre.damped_inverses()
    backward(model, x, y)
    pre.step()
    for (inverse_a, inverse_g), a, g in zip(
        pre.damped_inverses(), pre.curvature.input_factors, pre.curvature.output_factors, strict=True
    ):
        pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
        eye_a, eye_g = (torch.eye(f.shape[0], dtype=f.dtype) for f in (a, g))
        torch.testing.assert_close(inverse_a, torch.linalg.inv(a + pi * math.sqrt(delta) * eye_a))
        torch.testing.assert_close(inverse_g, torch.linalg.inv(g + math.sqrt(delta) / pi * eye_g))
    with pytest.raises(RuntimeError, match="keeps no eigendecomposition"):
        pre.eigendecomposition()
    with pytest.raises(RuntimeError, match="keeps eigenpairs, not damped inverses"):
        KFACPreconditioner(make("cnn")).damped_inverses()


@pytest.mark.parametrize("with_factors_in_use", [True, False])
def test_factored_state_dict_resumes_from_the_factors_in_use(with_factors_in_use):
    def step(pre, model, seed):
        backward(model, *data("cnn", seed=seed))
        pre.step()
        return [gradient_matrix(m) for m in kron_layers(model)]

    options = {"damping_mode": "factored", "damping": 0.02, "inv_update_steps": 4}
    model = make("cnn")
    pre = KFACPreconditioner(model, **options)
    for seed in range(6):  # inverted at step 4, factors updated again at step 5
        step(pre, model, seed)
    state = pre.state_dict(include_eigendecomposition=with_factors_in_use)
    expected = step(pre, model, 6)
    resumed = KFACPreconditioner(model, **options)  # no optimiser step: the same weights
    pre.remove()
    resumed.load_state_dict(state)
    got = step(resumed, model, 6)
    # Without the factors in use the inverses are remade from the step-5 factors.
    same = [torch.allclose(g, e, rtol=1e-12, atol=1e-14) for g, e in zip(got, expected, strict=True)]
    assert all(same) if with_factors_in_use else not any(same)
    with pytest.raises(ValueError, match="saved with damping_mode='factored', this preconditioner has 'eigen'"):
        KFACPreconditioner(make("cnn")).load_state_dict(state)


def test_digits_example_trains():
    script = Path(__file__).parents[1] / "examples" / "train_digits.py"
    command = [sys.executable, str(script), "--epochs", "1", "--model", "cnn"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["cnn", "sgd"], ["cnn", "adam"], ["cnn", "kfac"]]
    assert float(lines[-1].split("epoch")[1].split()[0]) > 0.8  # K-FAC after one epoch
    factored = command + ["--optimizer", "kfac", "--damping-mode", "factored"]
    result = subprocess.run(factored, capture_output=True, text=True, timeout=120, check=True)
    assert float(result.stdout.split("epoch")[1].split()[0]) > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_cuda_natural_gradient_equals_cpu(mode):
    results = []
    for device in ("cpu", "cuda"):
        model = make("cnn").to(device)
        x, y = data("cnn")
        pre = KFACPreconditioner(model, damping=0.05, damping_mode=mode)
        backward(model, x.to(device), y.to(device))
        pre.step()
        results.append([p.grad.cpu() for p in model.parameters()])
    for cpu, cuda in zip(*results, strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-12)
