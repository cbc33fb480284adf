"""K-FAC natural-gradient preconditioner for any ``torch.optim`` optimiser."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlaplace import distributed, ops
from fastlaplace.curvature import KronCurvature, LayerStatistics, supported_layers, trainable_bias
from fastlaplace.curvature.statistics import INPUT_DIMS, KRON_LAYERS

#: ``"eigen"``: exact ``(A ⊗ G + δ)⁻¹``; ``"factored"``: ``(A + π√δ)⁻¹ ⊗ (G + √δ/π)⁻¹`` (Martens & Grosse)
DAMPING_MODES = ("eigen", "factored")
#: what the owner of a layer's work sends under torch.distributed (KAISA's memory/communication knob)
BROADCASTS = ("eigen", "gradient")

Schedule = float | Callable[[], float]


@dataclass
class _Capture:
    """One forward of a layer during a factor-update step: its input, and later its output gradient."""

    inputs: Tensor
    grad: Tensor | None = None


def _value(setting: Schedule) -> float:
    return float(setting()) if callable(setting) else float(setting)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_schedule(value: object, name: str, low: float, high: float = math.inf, low_open: bool = True) -> None:
    """A number in (low, high) (``[low, high)`` unless ``low_open``), or a callable checked at each use."""
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a callable returning one, got {value!r}")
    if not (low < value if low_open else low <= value) or not value < high:
        bounds = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(f"{name} must lie in {bounds}, got {value!r}")


def _skipped(name: str, module: nn.Module, skip: list[str | type]) -> bool:
    """Whether skip names the module, one of its ancestors, its class, or a type it is an instance of."""
    for entry in skip:
        if isinstance(entry, type):
            if isinstance(module, entry):
                return True
        elif entry in (name, type(module).__name__) or name.startswith(entry + "."):
            return True
    return False


def _preconditioned_layers(
    model: nn.Module, skip_layers: Iterable[str | type[nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """The model's Linear and Conv2d layers that are not skipped, validated by :func:`supported_layers`."""
    skip = list(skip_layers)
    names = {name for name, _ in model.named_modules()}
    classes = {type(m).__name__ for _, m in model.named_modules()}
    for entry in skip:
        if isinstance(entry, str):
            if entry not in names and entry not in classes:
                raise ValueError(
                    f"skip_layers names {entry!r}, which is neither a module nor a module class of the model"
                )
        elif not (isinstance(entry, type) and issubclass(entry, nn.Module)):
            raise ValueError(f"skip_layers entries must be module names, class names or nn.Module types, got {entry!r}")
    # supported_layers checks every trainable layer; skipped ones are frozen for the check only,
    # so that an unsupported layer can be left to the plain gradient by naming it.
    frozen = [
        p for name, m in model.named_modules() if _skipped(name, m, skip) for p in m.parameters() if p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        layers = supported_layers(model)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    layers = [(name, m) for name, m in layers if isinstance(m, KRON_LAYERS)]
    if not layers:
        raise ValueError("the model has no trainable Linear or Conv2d layer left to precondition")
    return layers


class KFACPreconditioner:
    """Replaces the gradients of a model's Linear and Conv2d layers by K-FAC natural gradients.

    Usage, with any optimiser: ``loss.backward(); pre.step(); optimizer.step()``.
    :meth:`step` rewrites ``.grad`` of each preconditioned layer's weight and bias (taken
    together as the ``(d_out, d_in + 1)`` matrix ``[∇W | ∇b]``) into

        ``ν (F + δ)⁻¹ vec[∇W | ∇b]``,  ``F = A ⊗ G``,

    the curvature of one datum (Fisher, empirical Fisher when the loss uses the true
    labels), with ``ν ≤ 1`` from ``kl_clip``. The factors are running averages
    (:class:`~fastlaplace.curvature.KronCurvature` with ``decay = factor_decay``) of each
    factor-update batch's per-datum factors, ``A = Σ â âᵀ / (N L)`` over the layer's inputs
    (with a ones entry for the bias, over the L patches of a Conv2d or tokens of a
    sequence) captured by a forward hook, and ``G = Σ ĝ ĝᵀ / N`` over the gradients ĝ of
    each datum's loss w.r.t. the layer's output, captured by a tensor hook during your
    own ``loss.backward()``: with ``loss_reduction="mean"`` (a loss averaged over the
    batch, as kfac-pytorch assumes) the captured gradient is multiplied by the batch size
    N; with ``"sum"`` it is used as it is. Factors are kept in float32 (float64 for a
    float64 model) whatever autocast computes the forward in.

    Other trainable layers that :func:`~fastlaplace.curvature.supported_layers` accepts
    (Embedding, LayerNorm, BatchNorm) and those in ``skip_layers`` keep their plain
    gradients; any other trainable layer raises a ValueError naming it, unless skipped.

    Under ``torch.distributed`` (for instance with DistributedDataParallel, whose
    gradients are already averaged) the factors are averaged over the ranks before each
    eigendecomposition update (exact: the running average is linear), each factor is
    eigendecomposed by one owner rank only (chosen by its ``d³`` cost, largest first) and
    the eigenpairs are broadcast; with ``broadcast="gradient"`` each layer's owner keeps
    its eigenpairs and broadcasts the layer's preconditioned gradient at every step
    instead (less memory, more communication; KAISA's knob).

    A layer that runs several forwards before a step (gradient accumulation, weight
    sharing) has them counted as one batch of all their samples.

    With ``damping_mode="factored"`` nothing is eigendecomposed: each update keeps the
    averaged factors and inverts ``A + π√δ I`` and ``G + √δ/π I`` by Cholesky (a fraction
    of an eigendecomposition's cost), and a step is two GEMMs per layer. Every rank inverts
    the factors it needs itself (they are the same averaged factors on every rank), so
    there is no owner and no broadcast of inverses; ``broadcast="gradient"`` still has
    each layer's owner alone precondition it.

    Cost per step: the forward hooks are registered only while the coming step updates the
    factors (other forwards run hook-free); the damped spectra ``1 / (μ λᵀ + δ)`` (or the
    damped inverses) are kept between updates (remade when the damping changes), so a step
    that updates nothing is four (factored: two) GEMMs per layer and no host synchronisation.

    Args:
        model: the network (or its DistributedDataParallel wrapper).
        damping: δ > 0, or a callable returning it (read at every step).
        factor_update_steps: update the factors every this many steps.
        inv_update_steps: recompute the eigendecompositions every this many steps.
        factor_decay: β in ``F ← β F + (1 − β) F_batch`` (0 keeps the last batch only), or a callable.
        damping_mode: ``"eigen"``, exactly ``(λ_A μ_G + δ)⁻¹`` in the factors' eigenbasis;
            or ``"factored"``, ``(A + π√δ I)⁻¹ ⊗ (G + √δ/π I)⁻¹`` with
            ``π² = (tr A / d_A) / (tr G / d_G)`` (Martens & Grosse 2015).
        kl_clip: scale the natural gradient by ``ν = min(1, √(kl_clip / Σ_l lr_l² ⟨∇_l, ñ_l⟩))``,
            as kfac-pytorch; None turns it off. A number > 0 or a callable.
        lr: the learning rate(s) that kl_clip assumes: a number, a callable, or the optimiser
            (each layer then uses the lr of the parameter group holding its weight).
        skip_layers: module names (a name also skips the module's children), module class
            names or nn.Module types to leave out.
        loss_reduction: ``"mean"`` or ``"sum"``, how your loss reduces over the batch.
        kfac_approx: ``"expand"`` (every patch or token is a sample) or ``"reduce"``, as
            in :class:`~fastlaplace.curvature.KronCurvature`.
        broadcast: ``"eigen"`` or ``"gradient"``, see above (ignored on one process).
        bucket_mb: the largest buffer of one collective call, in megabytes.

    Raises:
        ValueError: on an invalid option, an unsupported trainable layer (named), or a
            ``skip_layers`` entry that names nothing in the model.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: Schedule = 1e-3,
        factor_update_steps: int = 1,
        inv_update_steps: int = 1,
        factor_decay: Schedule = 0.95,
        damping_mode: str = "eigen",
        kl_clip: Schedule | None = 1e-3,
        lr: Schedule | torch.optim.Optimizer = 0.1,
        skip_layers: Iterable[str | type[nn.Module]] = (),
        loss_reduction: str = "mean",
        kfac_approx: str = "expand",
        broadcast: str = "eigen",
        bucket_mb: float = distributed.BUCKET_MB,
    ) -> None:
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {broadcast!r}")
        _check_schedule(damping, "damping", 0.0)
        _check_schedule(factor_decay, "factor_decay", 0.0, 1.0, low_open=False)
        if kl_clip is not None:
            _check_schedule(kl_clip, "kl_clip", 0.0)
        if not isinstance(lr, torch.optim.Optimizer):
            _check_schedule(lr, "lr", 0.0, low_open=False)
        self.damping = damping
        self.factor_update_steps = _check_positive_int(factor_update_steps, "factor_update_steps")
        self.inv_update_steps = _check_positive_int(inv_update_steps, "inv_update_steps")
        self.factor_decay = factor_decay
        self.damping_mode = damping_mode
        self.kl_clip = kl_clip
        self.lr = lr
        self.loss_reduction = loss_reduction
        self.broadcast = broadcast
        self.bucket_mb = bucket_mb
        self.layers = _preconditioned_layers(model, skip_layers)
        self.curvature = KronCurvature(kfac_approx, decay=0.0)
        self.steps = 0
        self._captures: list[list[_Capture]] = [[] for _ in self.layers]
        # Per layer, what the preconditioning is made from, as of the last update: the eigenpairs
        # (Q_A, λ_A, Q_G, λ_G) in "eigen" mode, the averaged factors (A, G) in "factored" mode;
        # None where another rank owns the layer in "gradient" mode.
        self._in_use: list[tuple[Tensor, ...] | None] = [None] * len(self.layers)
        # Per layer, fixed for the preconditioner's life (the factors' sizes depend on them):
        # its weight, trainable bias (or None) and number of weight columns.
        self._parameters = [(m.weight, trainable_bias(m), m.weight[0].numel()) for _, m in self.layers]
        sizes = [(d_in + (bias is not None), w.shape[0]) for w, bias, d_in in self._parameters]
        # Eigendecompositions cost d³; in "gradient" mode the owner of a layer also solves with it at every step.
        self._layer_owners = distributed.assign_owners(
            [d_a**3 + d_g**3 for d_a, d_g in sizes], distributed.rank_and_size()[1]
        )
        # Per layer, made from _in_use for the damping _damped_with: the damped spectrum's reciprocal
        # (d_G, d_A) ("eigen") or the damped inverses (A⁻¹, G⁻¹) ("factored"); recomputed after each
        # update or change of damping, not at every step.
        self._damped: list[Tensor | tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self._damped_with: float | None = None
        # The KL clip's per-layer weights lr_l² / kl_clip, kept with the (kl_clip, layers, lr_l²) they were made for.
        self._kl_weights_key: tuple | None = None
        self._kl_weights_tensor: Tensor | None = None
        self._groups: tuple[int, list[int | None]] | None = None
        # The capture hooks are registered only while the next step updates the factors, so that the
        # forwards of the other steps run without any hook of ours.
        self._hooks_wanted = True
        self._handles: list = []
        self._arm_hooks()

    # ------------------------------------------------------------------ hooks

    def _capture_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled() or self.steps % self.factor_update_steps or not output.requires_grad:
                return
            capture = _Capture(inputs[0].detach())
            self._captures[index].append(capture)

            def store(grad: Tensor) -> None:
                capture.grad = grad.detach()

            output.register_hook(store)

        return hook

    def _arm_hooks(self) -> None:
        """Register the capture hooks if the coming step updates the factors, remove them otherwise."""
        wanted = self._hooks_wanted and self.steps % self.factor_update_steps == 0
        if wanted and not self._handles:
            self._handles = [
                module.register_forward_hook(self._capture_hook(i)) for i, (_, module) in enumerate(self.layers)
            ]
        elif not wanted and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def remove(self) -> None:
        """Remove the hooks from the model (the preconditioner cannot update its factors afterwards)."""
        self._hooks_wanted = False
        self._arm_hooks()

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def step(self) -> None:
        """Update the factors and eigendecompositions when scheduled, then precondition the gradients.

        Call it after ``loss.backward()`` and before ``optimizer.step()``; it rewrites the
        ``.grad`` of every preconditioned layer's weight and bias in place.

        Raises:
            RuntimeError: at a factor-update step where some layer ran no forward and
                backward with gradients enabled since the last step, or when a factor holds
                NaN or Inf (the layers are named).
        """
        device = self._parameters[0][0].device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
            if self.steps % self.factor_update_steps == 0:
                self._update_factors()
            if self.steps % self.inv_update_steps == 0:
                self.update_eigendecomposition()
            self._precondition()
        self.steps += 1
        self._arm_hooks()

    precondition = step

    def _needed_owners(self) -> list[bool]:
        """Per layer, whether this rank needs its eigenpairs (all in "eigen" mode, its own in "gradient" mode)."""
        rank, size = distributed.rank_and_size()
        if self.broadcast == "eigen" or size == 1:
            return [True] * len(self.layers)
        return [owner == rank for owner in self._layer_owners]

    def _update_factors(self) -> None:
        statistics, scales, missing = [], [], []
        mean = self.loss_reduction == "mean"
        for (name, module), captures in zip(self.layers, self._captures, strict=True):
            done = [c for c in captures if c.grad is not None]
            if not done:
                missing.append(name)
                continue
            allowed = INPUT_DIMS[nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear]
            for c in done:
                if c.inputs.dim() not in allowed:
                    raise ValueError(
                        f"layer {name!r} ({type(module).__name__}) got an input of shape {tuple(c.inputs.shape)}; "
                        f"K-FAC accepts inputs with {' or '.join(map(str, allowed))} dimensions (batch first)"
                    )
            # The gradient of a mean loss is 1/N of each datum's; G wants the datum's: a factor N on the
            # gradients, N² on G, folded into G's scale for a single forward (no scaled copy).
            if len(done) == 1:
                inputs, grads = done[0].inputs, done[0].grad
                grad_scale = float(inputs.shape[0]) if mean else 1.0
            else:
                inputs = torch.cat([c.inputs for c in done])
                grads = torch.cat([c.grad * c.inputs.shape[0] if mean else c.grad for c in done])
                grad_scale = 1.0
            statistics.append(LayerStatistics(name, module, inputs, grads.unsqueeze(1)))  # K = 1 column
            scales.append(grad_scale)
        self._captures = [[] for _ in self.layers]
        if missing:
            raise RuntimeError(
                f"layers {missing} ran no forward and backward with gradients enabled since the last step(); "
                "call step() after loss.backward() (K-FAC updates its factors at this step)"
            )
        self.curvature.decay = _value(self.factor_decay)
        self.curvature.update(statistics, output_scales=scales)

    def update_eigendecomposition(self) -> None:
        """Average the factors over the ranks and eigendecompose them (each factor on its owner rank).

        In "factored" mode the averaged factors are kept instead, to be inverted with the
        damping of the coming step. :meth:`step` calls it every ``inv_update_steps`` steps;
        call it yourself after changing the factors.
        """
        if not self.curvature.names:
            raise RuntimeError("no factors yet: call step() after a forward and backward first")
        factors = self.curvature.input_factors + self.curvature.output_factors
        distributed.all_reduce_(factors, average=True, bucket_mb=self.bucket_mb)
        finite = torch.isfinite(torch.stack([f.sum() for f in factors])).tolist()  # one sync per update
        if not all(finite):
            names = [self.layers[j % len(self.layers)][0] for j, ok in enumerate(finite) if not ok]
            raise RuntimeError(
                f"the K-FAC factors of layers {sorted(set(names))} contain NaN or Inf (training diverged?)"
            )
        rank, size = distributed.rank_and_size()
        count = len(self.layers)
        if self.damping_mode == "factored" or size == 1:  # every rank makes what it needs itself
            needed = [i for i, want in enumerate(self._needed_owners()) if want]
            made = self._made_from([factors[i] for i in needed], [factors[count + i] for i in needed])
            self._set_in_use(dict(zip(needed, made, strict=True)))
            return
        if self.broadcast == "eigen":
            owners = distributed.assign_owners([f.shape[0] ** 3 for f in factors], size)
        else:
            owners = self._layer_owners * 2
        mine = [j for j, owner in enumerate(owners) if owner == rank]
        values, vectors = ops.batched_eigh([factors[j] for j in mine])
        all_values = [f.new_empty(f.shape[0]) for f in factors]
        all_vectors = [torch.empty_like(f) for f in factors]
        for j, v, q in zip(mine, values, vectors, strict=True):
            all_values[j], all_vectors[j] = v, q
        if self.broadcast == "eigen":
            distributed.broadcast_from_owners_(all_values + all_vectors, owners * 2, self.bucket_mb)
        needed = self._needed_owners()
        self._set_in_use(
            {
                i: (all_vectors[i], all_values[i], all_vectors[count + i], all_values[count + i])
                for i in range(count)
                if needed[i]
            }
        )

    def _made_from(self, input_factors: list[Tensor], output_factors: list[Tensor]) -> list[tuple[Tensor, ...]]:
        """Per layer what its preconditioning is made from: ``(Q_A, λ_A, Q_G, λ_G)`` or copies of ``(A, G)``."""
        if self.damping_mode == "factored":
            return [(a.clone(), g.clone()) for a, g in zip(input_factors, output_factors, strict=True)]
        count = len(input_factors)
        values, vectors = ops.batched_eigh(input_factors + output_factors)
        return [(vectors[k], values[k], vectors[count + k], values[count + k]) for k in range(count)]

    def _set_in_use(self, in_use: dict[int, tuple[Tensor, ...]]) -> None:
        """Use these layers' eigenpairs or factors (None for the others), dropping what was made from the old ones."""
        self._in_use = [in_use.get(i) for i in range(len(self.layers))]
        self._damped = [None] * len(self.layers)

    def eigendecomposition(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor] | None]:
        """Per layer ``(Q_A, λ_A, Q_G, λ_G)`` in use (None for a layer owned by another rank in "gradient" mode).

        Raises:
            RuntimeError: in "factored" mode, which keeps no eigendecomposition (see :meth:`damped_inverses`).
        """
        if self.damping_mode == "factored":
            raise RuntimeError("damping_mode='factored' keeps no eigendecomposition; see damped_inverses()")
        return list(self._in_use)

    def damped_inverses(self) -> list[tuple[Tensor, Tensor] | None]:
        """In "factored" mode, per layer ``((A + π√δ I)⁻¹, (G + √δ/π I)⁻¹)`` for the current damping.

        ``π² = (tr A / d_A) / (tr G / d_G)`` (1 when a factor is zero), from the factors as
        averaged at the last update; None for a layer owned by another rank in "gradient" mode.

        Raises:
            RuntimeError: in "eigen" mode (see :meth:`eigendecomposition`), or before any update.
        """
        if self.damping_mode != "factored":
            raise RuntimeError("damping_mode='eigen' keeps eigenpairs, not damped inverses; see eigendecomposition()")
        if not self.curvature.names:
            raise RuntimeError("no factors yet: call step() after a forward and backward first")
        return list(self._damped_inverses([i for i, f in enumerate(self._in_use) if f is not None]))

    def _precondition(self) -> None:
        rank, size = distributed.rank_and_size()
        with_grad = [i for i, (weight, _, _) in enumerate(self._parameters) if weight.grad is not None]
        if not with_grad:
            return
        if self.broadcast == "gradient" and size > 1:
            self._precondition_distributed(with_grad, rank)
            return
        # One fused call for all layers: (F + δ)⁻¹ vec V scaled by the KL clip, written into the gradients,
        # with the damped spectra (or inverses) kept from step to step.
        gradients, blocks = [], []
        for i in with_grad:
            weight, bias, _ = self._parameters[i]
            gradients.append(weight.grad)
            if bias is not None:  # a bias without a gradient is a zero column whose update is dropped
                gradients.append(bias.grad if bias.grad is not None else weight.grad.new_zeros(weight.shape[0]))
            blocks.append(1 + (bias is not None))
        self._solve_(gradients, blocks, with_grad, None if self.kl_clip is None else self._kl_weights(with_grad))

    def _solve_(self, gradients: list[Tensor], blocks: list[int], layers: list[int], kl_weights: Tensor | None) -> None:
        """``ν (F + δ)⁻¹`` in place on the gradient blocks of the given layers (the fused operator of the mode)."""
        if self.damping_mode == "factored":
            inverses = self._damped_inverses(layers)
            ops.kron_inverse_precondition_(
                gradients,
                blocks,
                [inverses[i][0] for i in layers],
                [inverses[i][1] for i in layers],
                kl_weights,
                validate=False,  # built here from the layers' own tensors, at every step
            )
            return
        weights = self._damped_weights(layers)
        ops.kron_precondition_(
            gradients,
            blocks,
            [self._in_use[i][0] for i in layers],
            [self._in_use[i][2] for i in layers],
            [weights[i] for i in layers],
            kl_weights,
            validate=False,
        )

    def _precondition_distributed(self, with_grad: list[int], rank: int) -> None:
        """``broadcast="gradient"``: each layer's owner solves and broadcasts its natural gradient."""
        compute = [i for i in with_grad if self._layer_owners[i] == rank]
        gradients = {i: self._gradient_matrix(i) for i in with_grad}
        natural = {i: gradients[i].clone() for i in compute}
        if compute:
            self._solve_([natural[i] for i in compute], [1] * len(compute), compute, None)
        for i in with_grad:
            natural.setdefault(i, torch.empty_like(gradients[i]))
        distributed.broadcast_from_owners_(
            [natural[i] for i in with_grad], [self._layer_owners[i] for i in with_grad], self.bucket_mb
        )
        if self.kl_clip is not None:  # the same sums on every rank, from the broadcast natural gradients
            dots = torch.stack([torch.vdot(gradients[i].view(-1), natural[i].view(-1)) for i in with_grad])
            ratio = dots @ self._kl_weights(with_grad)  # Σ_l lr_l² ⟨∇_l, ñ_l⟩ / kl_clip
            # ν = min(1, 1 / √ratio): 1 / √0 = ∞ (and rounding below 0) give ν = 1, as in kron_precondition_
            torch._foreach_mul_([natural[i] for i in with_grad], ratio.clamp_min_(0.0).rsqrt_().clamp_(max=1.0))
        for i in with_grad:
            self._write_gradient(i, natural[i])

    def _write_gradient(self, i: int, update: Tensor) -> None:
        """Copy a ``(d_out, d_A)`` ``[∇W | ∇b]`` update into layer i's gradients."""
        weight, bias, d_in = self._parameters[i]
        weight.grad.copy_(update[:, :d_in].view_as(weight))
        if bias is not None and bias.grad is not None:
            bias.grad.copy_(update[:, d_in])

    def _dtype(self) -> torch.dtype:
        return self.curvature.input_factors[0].dtype

    def _gradient_matrix(self, i: int) -> Tensor:
        """``(d_out, d_A)`` ``[∇W | ∇b]`` in the factors' dtype (a zero bias column for a bias without grad)."""
        weight, bias, d_in = self._parameters[i]
        dtype = self._dtype()
        grad = weight.grad.reshape(weight.shape[0], d_in)
        if bias is None:
            return grad if grad.dtype == dtype else grad.to(dtype)
        if bias.grad is None:
            return torch.cat([grad.to(dtype), grad.new_zeros(grad.shape[0], 1, dtype=dtype)], dim=1)
        matrix = torch.cat([grad, bias.grad.unsqueeze(1)], dim=1)
        return matrix if matrix.dtype == dtype else matrix.to(dtype)

    def _damping(self) -> float:
        """δ, read now; a new value drops the damped spectra and inverses made with the previous one."""
        delta = _value(self.damping)
        if delta <= 0:
            raise ValueError(f"damping must be positive, got {delta}")
        if delta != self._damped_with:
            self._damped = [None] * len(self.layers)
            self._damped_with = delta
        return delta

    def _damped_weights(self, layers: list[int]) -> list[Tensor | None]:
        """In "eigen" mode, per layer ``1 / (μ λᵀ + δ)`` of the clamped spectra, kept until they or δ change."""
        delta = self._damping()
        for i in layers:
            if self._damped[i] is None:
                _, la, _, lg = self._in_use[i]
                self._damped[i] = torch.outer(lg.clamp_min(0), la.clamp_min(0)).add_(delta).reciprocal_()
        return self._damped

    def _damped_inverses(self, layers: list[int]) -> list[tuple[Tensor, Tensor] | None]:
        """In "factored" mode, per layer ``((A + π√δ I)⁻¹, (G + √δ/π I)⁻¹)``, kept until the factors or δ change.

        ``π² = (tr A / d_A) / (tr G / d_G)``, 1 when either trace is zero (Martens & Grosse 2015).
        """
        root = math.sqrt(self._damping())
        missing = [i for i in layers if self._damped[i] is None]
        if missing:
            factors = [self._in_use[i][0] for i in missing] + [self._in_use[i][1] for i in missing]
            means = torch.stack([f.diagonal().mean() for f in factors]).clamp_min(0).view(2, -1)
            both = (means > 0).all(0)
            pi = torch.where(both, means[0] / torch.where(both, means[1], 1), 1).sqrt()
            inverses = ops.damped_inverses(factors, torch.cat([pi * root, root / pi]))
            for k, i in enumerate(missing):
                self._damped[i] = (inverses[k], inverses[k + len(missing)])
        return self._damped

    def _kl_weights(self, layers: list[int]) -> Tensor:
        """``(len(layers),)`` weights ``lr_l² / kl_clip`` of the KL clip, remade when a setting changes.

        With them ``ν = min(1, 1 / √(Σ_l w_l ⟨∇_l, ñ_l⟩))``; ``⟨∇_l, ñ_l⟩ ≥ 0`` (a positive
        definite solve), and a zero sum gives ν = 1.
        """
        clip = _value(self.kl_clip)
        if clip <= 0:
            raise ValueError(f"kl_clip must be positive, got {clip}")
        rates = self._learning_rates()
        key = (clip, *((i, rates[i] ** 2) for i in layers))
        if self._kl_weights_key != key:
            weights = [rates[i] ** 2 / clip for i in layers]
            device = self._parameters[0][0].device
            self._kl_weights_tensor = torch.tensor(weights, dtype=self._dtype(), device=device)
            self._kl_weights_key = key
        return self._kl_weights_tensor

    def _learning_rates(self) -> list[float]:
        """The lr of each layer: from the optimiser's parameter group holding its weight (0 if none), or lr."""
        if not isinstance(self.lr, torch.optim.Optimizer):
            return [_value(self.lr)] * len(self.layers)
        groups = self.lr.param_groups
        if self._groups is None or self._groups[0] != len(groups):  # which group holds each weight, cached
            where = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
            self._groups = (len(groups), [where.get(id(w)) for w, _, _ in self._parameters])
        return [0.0 if g is None else float(groups[g]["lr"]) for g in self._groups[1]]

    # ------------------------------------------------------------------ saving

    def state_dict(self, include_eigendecomposition: bool = True) -> dict:
        """The step counter, the factors and (by default) the eigenpairs in use, to resume training.

        In "factored" mode the averaged factors of the last update stand for the eigenpairs.
        With them a resumed run continues exactly as an uninterrupted one; without them
        :meth:`load_state_dict` recomputes them from the saved factors, which differ from the
        ones in use when saved between two updates. Under torch.distributed, factors between
        two updates are this rank's running averages.
        """
        return {
            "steps": self.steps,
            "layers": [name for name, _ in self.layers],
            "damping_mode": self.damping_mode,
            "input_factors": [f.clone() for f in self.curvature.input_factors],
            "output_factors": [f.clone() for f in self.curvature.output_factors],
            "locations": list(self.curvature.locations),
            "num_data": self.curvature.num_data,
            "eigendecomposition": (
                [None if e is None else tuple(t.clone() for t in e) for e in self._in_use]
                if include_eigendecomposition
                else None
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` saved for the same layers (no communication: every rank loads the same).

        Raises:
            ValueError: if the state was saved for other layers, or with another damping_mode.
        """
        names = [name for name, _ in self.layers]
        if list(state["layers"]) != names:
            raise ValueError(f"the state was saved for layers {list(state['layers'])}, this preconditioner has {names}")
        saved_mode = state.get("damping_mode", "eigen")  # states saved before it was recorded hold eigenpairs
        if saved_mode != self.damping_mode:
            raise ValueError(
                f"the state was saved with damping_mode={saved_mode!r}, this preconditioner has {self.damping_mode!r}"
            )
        device = self.layers[0][1].weight.device
        self.steps = int(state["steps"])
        self._captures = [[] for _ in self.layers]
        self._arm_hooks()
        self.curvature.names = names if state["input_factors"] else []
        self.curvature.input_factors = [f.to(device, copy=True) for f in state["input_factors"]]
        self.curvature.output_factors = [f.to(device, copy=True) for f in state["output_factors"]]
        self.curvature.locations = list(state["locations"])
        self.curvature.num_data = int(state["num_data"])
        saved = state.get("eigendecomposition") or [None] * len(names)
        needed = self._needed_owners()
        in_use = {
            i: tuple(t.to(device, copy=True) for t in e)
            for i, (e, want) in enumerate(zip(saved, needed, strict=True))
            if e is not None and want
        }
        missing = [i for i, want in enumerate(needed) if want and i not in in_use]
        if missing and self.curvature.names:  # recomputed locally, the same on every rank
            made = self._made_from(
                [self.curvature.input_factors[i] for i in missing], [self.curvature.output_factors[i] for i in missing]
            )
            in_use.update(zip(missing, made, strict=True))
        self._set_in_use(in_use)
