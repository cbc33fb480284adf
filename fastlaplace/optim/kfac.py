"""K-FAC natural-gradient preconditioner for any ``torch.optim`` optimiser."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from fastlaplace import distributed
from fastlaplace.curvature import KronCurvature, LayerStatistics
from fastlaplace.curvature.statistics import INPUT_DIMS, all_finite, as_tokens
from fastlaplace.optim.conventions import CONVENTIONS, Conventions
from fastlaplace.optim.layers import PreconditionedLayer, preconditioned_layers
from fastlaplace.optim.modes import MODES, DampedInverses, EigenBasis

#: ``"eigen"``: exact ``(A ⊗ G + δ)⁻¹``; ``"factored"``: ``(A + π√δ)⁻¹ ⊗ (G + √δ/π)⁻¹`` (Martens & Grosse);
#: ``"ekfac"``: ``(S + δ)⁻¹`` in the eigenbasis of A ⊗ G, S measured (George et al.)
DAMPING_MODES = tuple(MODES)
#: what the owner of a layer's work sends under torch.distributed (KAISA's memory/communication knob)
BROADCASTS = ("eigen", "gradient")

Schedule = float | Callable[[], float]


def _value(setting: Schedule, name: str) -> float:
    """A setting's value now (a callable is called); a callable that returns no number is named."""
    value = setting() if callable(setting) else setting
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        return float(value)  # a number, a NumPy scalar or a one-element tensor
    except (TypeError, ValueError):
        raise ValueError(f"{name} must return a number, got {value!r}") from None


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
    (Embedding, the norm layers) and those in ``skip_layers`` keep their plain
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
        damping: δ > 0, or a callable returning it (read at every step); None takes the
            conventions' default (0.1 of each layer's mean eigenvalue for ``"fastlaplace"``,
            1e-3 for the others).
        factor_update_steps: update the factors every this many steps.
        inv_update_steps: recompute the eigendecompositions every this many steps.
        factor_decay: β in ``F ← β F + (1 − β) F_batch`` (0 keeps the last batch only), or a callable.
        damping_mode: ``"eigen"``, exactly ``(λ_A μ_G + δ)⁻¹`` in the factors' eigenbasis;
            ``"factored"``, ``(A + π√δ I)⁻¹ ⊗ (G + √δ/π I)⁻¹`` with
            ``π² = (tr A / d_A) / (tr G / d_G)`` (Martens & Grosse 2015); or ``"ekfac"``,
            ``(S + δ)⁻¹`` in the same eigenbasis with S the measured second moments of the
            gradients in it, corrected at every factor update between two refreshes of the
            basis (George et al. 2018; see :class:`~fastlaplace.optim.modes.EKFACDamping`).
        kl_clip: scale the natural gradient by ``ν = min(1, √(kl_clip / Σ_l lr_l² ⟨∇_l, ñ_l⟩))``,
            as kfac-pytorch; None turns it off. A number > 0 or a callable.
        lr: the learning rate(s) that kl_clip assumes: a number, a callable, or the optimiser
            (each layer then uses the lr of the parameter group holding its weight, with the
            ``"fastlaplace"`` conventions divided by ``1 − momentum``, so that SGD's momentum
            cannot take the step beyond the clip: pass the optimiser when it has momentum).
        skip_layers: module names (a name also skips the module's children), module class
            names or nn.Module types to leave out.
        loss_reduction: ``"mean"`` or ``"sum"``, how your loss reduces over the batch.
        kfac_approx: ``"expand"`` (every patch or token is a sample) or ``"reduce"``, as
            in :class:`~fastlaplace.curvature.KronCurvature`.
        broadcast: ``"eigen"`` or ``"gradient"``, see above (ignored on one process).
        bucket_mb: the largest buffer of one collective call, in megabytes.
        conventions: ``"fastlaplace"`` (default), ``"fastlaplace-v0"`` (the behaviour before
            the conventions: the first batch's factors, absolute δ = 1e-3, the KL clip without
            momentum) or ``"kfac-pytorch"`` (its factor scales, identity start and damping):
            the table in :mod:`fastlaplace.optim.conventions`.

    Raises:
        ValueError: on an invalid option, an unsupported trainable layer (named), or a
            ``skip_layers`` entry that names nothing in the model.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: Schedule | None = None,
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
        conventions: str = "fastlaplace",
    ) -> None:
        if conventions not in CONVENTIONS:
            raise ValueError(f"conventions must be one of {tuple(CONVENTIONS)}, got {conventions!r}")
        self.conventions: Conventions = CONVENTIONS[conventions]
        if damping is None:
            damping = self.conventions.default_damping
        if kfac_approx == "reduce" and self.conventions.conv_location_scaling:
            raise ValueError(f"conventions={conventions!r} has no kfac_approx='reduce' (kfac-pytorch expands)")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {broadcast!r}")
        if damping_mode == "ekfac" and broadcast == "gradient":
            raise ValueError(
                "damping_mode='ekfac' needs every layer's eigenbasis on every rank (each rank measures its batch's "
                "moments in it): use broadcast='eigen'"
            )
        _check_schedule(damping, "damping", 0.0)
        _check_schedule(factor_decay, "factor_decay", 0.0, 1.0, low_open=False)
        if kl_clip is not None:
            _check_schedule(kl_clip, "kl_clip", 0.0)
        if not isinstance(lr, torch.optim.Optimizer):
            _check_schedule(lr, "lr", 0.0, low_open=False)
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not 0 < bucket_mb < math.inf:
            raise ValueError(f"bucket_mb must be a positive number of megabytes, got {bucket_mb!r}")
        self.damping = damping
        self.factor_update_steps = _check_positive_int(factor_update_steps, "factor_update_steps")
        self.inv_update_steps = _check_positive_int(inv_update_steps, "inv_update_steps")
        self.factor_decay = factor_decay
        self.mode = MODES[damping_mode]()
        self.kl_clip = kl_clip
        self.lr = lr
        self.loss_reduction = loss_reduction
        self.broadcast = broadcast
        self.bucket_mb = bucket_mb
        self._layers = preconditioned_layers(model, skip_layers)
        self.curvature = KronCurvature(kfac_approx, decay=0.0)
        self.steps = 0
        # Eigendecompositions cost d³; in "gradient" mode the owner of a layer also solves with it at every step.
        owners = distributed.assign_owners(
            [d_a**3 + d_g**3 for d_a, d_g in (layer.factor_sizes for layer in self._layers)],
            distributed.rank_and_size()[1],
        )
        for layer, owner in zip(self._layers, owners, strict=True):
            layer.owner = owner
        # the damping the layers' damped data was made with (None: none made yet)
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

    @property
    def damping_mode(self) -> str:
        """``"eigen"``, ``"factored"`` or ``"ekfac"``."""
        return self.mode.name

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The preconditioned layers as ``(name, module)``, in model order."""
        return [(layer.name, layer.module) for layer in self._layers]

    # ------------------------------------------------------------------ hooks

    def _capturing(self) -> bool:
        return self.steps % self.factor_update_steps == 0

    def _arm_hooks(self) -> None:
        """Register the capture hooks if the coming step updates the factors, remove them otherwise."""
        wanted = self._hooks_wanted and self._capturing()
        if wanted and not self._handles:
            self._handles = [
                layer.module.register_forward_hook(layer.capture_hook(self._capturing)) for layer in self._layers
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
        # The step's settings (callables included) are read and checked before anything changes.
        delta = self._checked_damping()
        kl = None if self.kl_clip is None else (self._checked_kl_clip(), self._learning_rates())
        device = self._layers[0].weight.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
            batch = self._update_factors() if self.steps % self.factor_update_steps == 0 else None
            if self.steps % self.inv_update_steps == 0:
                self.update_eigendecomposition()
            elif batch is not None:  # EKFAC's scales between two refreshes of the basis
                self.mode.update_scales(self._layers, *batch)
            self._precondition(delta, kl)
        self.steps += 1
        self._arm_hooks()

    precondition = step

    def _needed(self) -> list[bool]:
        """Per layer, whether this rank needs its basis (all in "eigen" broadcast, its own in "gradient" mode)."""
        rank, size = distributed.rank_and_size()
        if self.broadcast == "eigen" or size == 1:
            return [True] * len(self._layers)
        return [layer.owner == rank for layer in self._layers]

    def _gradient_scale(self, batch_size: int) -> float:
        """The factor on a captured output gradient whose square G gets, as the conventions take G."""
        if self.conventions.datum_output_factor:  # a mean loss's gradient is 1/N of each datum's
            return float(batch_size) if self.loss_reduction == "mean" else 1.0
        return 1.0 if self.loss_reduction == "mean" else 1.0 / batch_size

    def _location_scales(self, statistics: list[LayerStatistics]) -> tuple[list[float], list[float] | None]:
        """Per layer the factors on its output gradients and on its batch A from the L locations it is applied at.

        kfac-pytorch divides a Conv2d's patches and output gradients by L before taking each
        factor's mean over the N L rows (A / L², G / L³ against one datum's, which sums G over
        the locations), and a Linear's over T tokens takes G's mean over the N T rows (G / T).
        """
        if not self.conventions.conv_location_scaling:
            return [1.0] * len(statistics), None
        output, inputs = [], []
        for s in statistics:
            locations = s.locations
            output.append(locations**-1.5 if s.is_conv else locations**-0.5)
            inputs.append(float(locations) ** -2 if s.is_conv else 1.0)
        return output, inputs

    def _update_factors(self) -> tuple[list[LayerStatistics], list[float], float]:
        """Add the captured batch to the factors; returns its statistics, each layer's datum weight and β.

        A layer's weight ``(1 − β) / N s_G² s_A`` (its gradient and input scales) turns the
        batch's sums into one datum's, as its factors take them (:meth:`DampingMode.update_scales`).
        """
        statistics, scales, missing = [], [], []
        for layer in self._layers:
            done = [c for c in layer.captures if c.grad is not None]
            if not done:
                missing.append(layer.name)
                continue
            allowed = INPUT_DIMS[nn.Conv2d if isinstance(layer.module, nn.Conv2d) else nn.Linear]
            for c in done:
                if c.inputs.dim() not in allowed:
                    raise ValueError(
                        f"layer {layer.name!r} ({type(layer.module).__name__}) got an input of shape "
                        f"{tuple(c.inputs.shape)}; K-FAC accepts inputs with {' or '.join(map(str, allowed))} "
                        "dimensions (batch first)"
                    )
            # The gradients' scale is folded into G's scale for a single forward (no scaled copy).
            if len(done) == 1:
                inputs, grads = done[0].inputs, done[0].grad
                grad_scale = self._gradient_scale(inputs.shape[0])
            else:
                inputs = torch.cat([c.inputs for c in done])
                grads = torch.cat([c.grad * self._gradient_scale(c.inputs.shape[0]) for c in done])
                grad_scale = 1.0
            for what, tensor in (("inputs", inputs), ("output gradients", grads)):
                if not all_finite(tensor):
                    for other in self._layers:  # the batch is dropped, so that the next one starts clean
                        other.captures = []
                    raise ValueError(
                        f"layer {layer.name!r}: the batch's {what} contain NaN or Inf; the batch is dropped and "
                        "the factors are left as they were (skip the optimiser step for it)"
                    )
            inputs, grads = as_tokens(layer.module, inputs), as_tokens(layer.module, grads)  # (N, H, W, d): tokens
            statistics.append(LayerStatistics(layer.name, layer.module, inputs, grads.unsqueeze(1)))  # K = 1 column
            scales.append(grad_scale)
        frozen = [layer.name for layer in self._layers if not layer.weight.requires_grad]
        if frozen:
            raise RuntimeError(
                f"layers {frozen} were frozen (requires_grad=False) after the preconditioner was made; make a new "
                "KFACPreconditioner for the layers that train (or name the frozen ones in skip_layers)"
            )
        if missing:
            raise RuntimeError(
                f"layers {missing} ran no forward and backward with gradients enabled since the last step(); "
                "call step() after loss.backward() (K-FAC updates its factors at this step)"
            )
        decay = _value(self.factor_decay, "factor_decay")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"factor_decay must lie in [0, 1), got {decay}")
        for layer in self._layers:
            layer.captures = []
        location_output, location_input = self._location_scales(statistics)
        first = not self.curvature.num_data
        self.curvature.decay = decay
        output_scales = [g * s for g, s in zip(scales, location_output, strict=True)]
        self.curvature.update(statistics, output_scales=output_scales, input_scales=location_input)
        if first:
            self._blend_start(decay)
        size = statistics[0].inputs.shape[0]
        input_scales = location_input or [1.0] * len(statistics)
        weights = [(1.0 - decay) / size * g * g * a for g, a in zip(output_scales, input_scales, strict=True)]
        return statistics, weights, decay

    def _blend_start(self, decay: float) -> None:
        """Make the first update's factors ``β S + (1 − β) F_batch``, from the conventions' start S."""
        if self.conventions.start == "batch" or decay == 0.0:
            return
        for factor in self.curvature.input_factors + self.curvature.output_factors:
            level = 1.0 if self.conventions.start == "identity" else factor.diagonal().mean().clamp_min(0)
            factor.mul_(1.0 - decay).diagonal().add_(decay * level)

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
            names = [self._layers[j % len(self._layers)].name for j, ok in enumerate(finite) if not ok]
            raise RuntimeError(
                f"the K-FAC factors of layers {sorted(set(names))} contain NaN or Inf (training diverged?)"
            )
        rank, size = distributed.rank_and_size()
        count = len(self._layers)
        needed = self._needed()
        bases = None
        if size > 1:
            if self.broadcast == "eigen":
                owners = distributed.assign_owners([f.shape[0] ** 3 for f in factors], size)
            else:
                owners = [layer.owner for layer in self._layers] * 2
            bases = self.mode.bases_from_owners(factors, owners, rank, self.bucket_mb)
        if bases is None:  # every rank makes what it needs itself
            wanted = [i for i in range(count) if needed[i]]
            made = self.mode.bases([factors[i] for i in wanted], [factors[count + i] for i in wanted])
            bases = [None] * count
            for i, basis in zip(wanted, made, strict=True):
                bases[i] = basis
        self._use_bases([basis if want else None for basis, want in zip(bases, needed, strict=True)])

    def _use_bases(self, bases: list[tuple | None]) -> None:
        """Use these bases (None for layers another rank owns), dropping what was made from the old ones."""
        for layer, basis in zip(self._layers, bases, strict=True):
            layer.basis, layer.damped = basis, None

    def eigendecomposition(self) -> list[EigenBasis | None]:
        """Per layer ``(Q_A, λ_A, Q_G, λ_G)`` in use (None for a layer owned by another rank in "gradient" mode).

        Raises:
            RuntimeError: in "factored" mode, which keeps no eigendecomposition (see :meth:`damped_inverses`).
        """
        if self.damping_mode == "factored":
            raise RuntimeError(f"damping_mode={self.damping_mode!r} keeps no eigendecomposition; see damped_inverses()")
        return [layer.basis for layer in self._layers]

    def damped_inverses(self) -> list[DampedInverses | None]:
        """In "factored" mode, per layer ``((A + π√δ I)⁻¹, (G + √δ/π I)⁻¹)`` for the current damping.

        ``π² = (tr A / d_A) / (tr G / d_G)`` (1 when a factor is zero), from the factors as
        averaged at the last update; None for a layer owned by another rank in "gradient" mode.

        Raises:
            RuntimeError: in "eigen" mode (see :meth:`eigendecomposition`), or before any update.
        """
        if self.damping_mode != "factored":
            raise RuntimeError(
                f"damping_mode={self.damping_mode!r} keeps eigenpairs, not damped inverses; see eigendecomposition()"
            )
        if not self.curvature.names:
            raise RuntimeError("no factors yet: call step() after a forward and backward first")
        held = [layer for layer in self._layers if layer.basis is not None]
        self._damp(held, self._checked_damping())
        return [layer.damped for layer in self._layers]

    def _checked_damping(self) -> float:
        """δ, read now (a callable is called)."""
        delta = _value(self.damping, "damping")
        if not delta > 0 or not math.isfinite(delta):
            raise ValueError(f"damping must be positive and finite, got {delta}")
        return delta

    def _checked_kl_clip(self) -> float:
        """The KL clip, read now (a callable is called)."""
        clip = _value(self.kl_clip, "kl_clip")
        if not clip > 0 or not math.isfinite(clip):
            raise ValueError(f"kl_clip must be positive and finite, got {clip}")
        return clip

    def _damp(self, layers: list[PreconditionedLayer], delta: float) -> None:
        """Make the layers' damped data for δ; a new δ drops what was made with the previous one."""
        if delta != self._damped_with:
            for layer in self._layers:
                layer.damped = None
            self._damped_with = delta
        self.mode.damp(layers, delta, self.conventions.relative_damping)

    def _precondition(self, delta: float, kl: tuple[float, list[float]] | None) -> None:
        """Precondition the gradients with damping δ and ``kl`` = (the KL clip, the layers' lr), or no clip."""
        rank, size = distributed.rank_and_size()
        with_grad = [layer for layer in self._layers if layer.weight.grad is not None]
        if not with_grad:
            return
        if self.broadcast == "gradient" and size > 1:
            self._precondition_distributed(with_grad, rank, delta, kl)
            return
        # One fused call for all layers: (F + δ)⁻¹ vec V scaled by the KL clip, written into the gradients,
        # with the damped spectra (or inverses) kept from step to step.
        gradients = [block for layer in with_grad for block in layer.gradient_blocks()]
        blocks = [1 + (layer.bias is not None) for layer in with_grad]
        self._damp(with_grad, delta)
        kl_weights = None if kl is None else self._kl_weights(with_grad, *kl)
        self.mode.solve_(gradients, blocks, with_grad, kl_weights)

    def _precondition_distributed(
        self, with_grad: list[PreconditionedLayer], rank: int, delta: float, kl: tuple[float, list[float]] | None
    ) -> None:
        """``broadcast="gradient"``: each layer's owner solves and broadcasts its natural gradient."""
        compute = [layer for layer in with_grad if layer.owner == rank]
        dtype = self._dtype()
        gradients = [layer.gradient_matrix(dtype) for layer in with_grad]
        natural = [
            g.clone() if layer.owner == rank else torch.empty_like(g)
            for layer, g in zip(with_grad, gradients, strict=True)
        ]
        if compute:
            self._damp(compute, delta)
            self.mode.solve_(
                [n for layer, n in zip(with_grad, natural, strict=True) if layer.owner == rank],
                [1] * len(compute),
                compute,
                None,
            )
        distributed.broadcast_from_owners_(natural, [layer.owner for layer in with_grad], self.bucket_mb)
        if kl is not None:  # the same sums on every rank, from the broadcast natural gradients
            dots = torch.stack([torch.vdot(g.view(-1), n.view(-1)) for g, n in zip(gradients, natural, strict=True)])
            ratio = dots @ self._kl_weights(with_grad, *kl)  # Σ_l lr_l² ⟨∇_l, ñ_l⟩ / kl_clip
            # ν = min(1, 1 / √ratio): 1 / √0 = ∞ (and rounding below 0) give ν = 1, as in kron_precondition_
            torch._foreach_mul_(natural, ratio.clamp_min_(0.0).rsqrt_().clamp_(max=1.0))
        for layer, update in zip(with_grad, natural, strict=True):
            layer.write_gradient(update)

    def _dtype(self) -> torch.dtype:
        return self.curvature.input_factors[0].dtype

    def _kl_weights(self, layers: list[PreconditionedLayer], clip: float, rates: list[float]) -> Tensor:
        """``(len(layers),)`` weights ``lr_l² / kl_clip`` of the KL clip, remade when a setting changes.

        With them ``ν = min(1, 1 / √(Σ_l w_l ⟨∇_l, ñ_l⟩))``; ``⟨∇_l, ñ_l⟩ ≥ 0`` (a positive
        definite solve), and a zero sum gives ν = 1. ``rates``: every layer's lr.
        """
        positions = [self._layers.index(layer) for layer in layers]
        key = (clip, *((p, rates[p] ** 2) for p in positions))
        if self._kl_weights_key != key:
            weights = [rates[p] ** 2 / clip for p in positions]
            device = self._layers[0].weight.device
            self._kl_weights_tensor = torch.tensor(weights, dtype=self._dtype(), device=device)
            self._kl_weights_key = key
        return self._kl_weights_tensor

    def _learning_rates(self) -> list[float]:
        """The lr of each layer: from the optimiser's parameter group holding its weight (0 if none), or lr.

        With the conventions' ``momentum_kl_clip`` a group's lr is taken as ``lr / (1 − μ)``
        for its momentum μ (SGD's, RMSprop's; none for Adam's β₁, an average): momentum sums
        past clipped steps ``u_k`` into ``Σ_k μᵏ u_k``, whose F-norm is at most ``1 / (1 − μ)``
        times their largest, so that clipping each one to ``kl_clip (1 − μ)² / lr²`` keeps the
        step that is taken within ``kl_clip``.
        """
        if not isinstance(self.lr, torch.optim.Optimizer):
            return [_value(self.lr, "lr")] * len(self._layers)
        groups = self.lr.param_groups
        if self._groups is None or self._groups[0] != len(groups):  # which group holds each weight, cached
            where = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
            self._groups = (len(groups), [where.get(id(layer.weight)) for layer in self._layers])
        rates = []
        for g in self._groups[1]:
            if g is None:
                rates.append(0.0)
                continue
            momentum = float(groups[g].get("momentum", 0.0)) if self.conventions.momentum_kl_clip else 0.0
            if momentum >= 1.0:
                raise ValueError(f"the optimiser's momentum must be below 1 for the KL clip, got {momentum}")
            rates.append(float(groups[g]["lr"]) / (1.0 - momentum))
        return rates

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
            "layers": [layer.name for layer in self._layers],
            "damping_mode": self.damping_mode,
            "conventions": self.conventions.name,
            "input_factors": [f.clone() for f in self.curvature.input_factors],
            "output_factors": [f.clone() for f in self.curvature.output_factors],
            "locations": list(self.curvature.locations),
            "num_data": self.curvature.num_data,
            "eigendecomposition": (
                [None if layer.basis is None else tuple(t.clone() for t in layer.basis) for layer in self._layers]
                if include_eigendecomposition
                else None
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` saved for the same layers (no communication: every rank loads the same).

        Everything is checked before anything changes: on an error the preconditioner is as it was.

        Raises:
            ValueError: if the state misses an entry, was saved for other layers or another
                damping_mode, or holds factors or eigenpairs of other sizes, non-finite ones or
                a negative step count (each named).
        """
        missing_keys = [
            k for k in ("steps", "layers", "input_factors", "output_factors", "locations", "num_data") if k not in state
        ]
        if missing_keys:
            raise ValueError(f"the state misses {missing_keys}; it is not a KFACPreconditioner.state_dict()")
        names = [layer.name for layer in self._layers]
        if list(state["layers"]) != names:
            raise ValueError(f"the state was saved for layers {list(state['layers'])}, this preconditioner has {names}")
        saved_mode = state.get("damping_mode", "eigen")  # states saved before it was recorded hold eigenpairs
        if saved_mode != self.damping_mode:
            raise ValueError(
                f"the state was saved with damping_mode={saved_mode!r}, this preconditioner has {self.damping_mode!r}"
            )
        # the conventions set the factors' scale (kfac-pytorch's G is N² smaller); older states did not record them
        saved_conventions = state.get("conventions", self.conventions.name)
        if saved_conventions != self.conventions.name:
            raise ValueError(
                f"the state was saved with conventions={saved_conventions!r}, this preconditioner has "
                f"{self.conventions.name!r} (its factors are on another scale)"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"the state's steps must be a non-negative integer, got {steps!r}")
        device = self._layers[0].weight.device
        input_factors = [f.to(device, copy=True) for f in state["input_factors"]]
        output_factors = [f.to(device, copy=True) for f in state["output_factors"]]
        fitted = bool(input_factors)
        if fitted:
            self._check_saved_factors(input_factors, output_factors, list(state["locations"]))
        saved = state.get("eigendecomposition") or [None] * len(names)
        if len(saved) != len(names):
            raise ValueError(f"the state's eigendecomposition has {len(saved)} entries for {len(names)} layers")
        needed = self._needed()
        bases = [
            self._checked_basis(layer, [t.to(device, copy=True) for t in e]) if e is not None and want else None
            for layer, e, want in zip(self._layers, saved, needed, strict=True)
        ]
        missing = [i for i, want in enumerate(needed) if want and bases[i] is None]
        if missing and fitted:  # recomputed locally, the same on every rank
            made = self.mode.bases([input_factors[i] for i in missing], [output_factors[i] for i in missing])
            for i, basis in zip(missing, made, strict=True):
                bases[i] = basis
        self.steps = steps
        for layer in self._layers:
            layer.captures = []
        self._arm_hooks()
        self.curvature.names = names if fitted else []
        self.curvature.input_factors = input_factors
        self.curvature.output_factors = output_factors
        self.curvature.locations = list(state["locations"])
        self.curvature.num_data = int(state["num_data"])
        self._use_bases(bases)

    def _check_saved_factors(self, input_factors: list[Tensor], output_factors: list[Tensor], locations: list) -> None:
        """Refuse saved factors of another count, size or dtype than this preconditioner's, or non-finite ones."""
        count = len(self._layers)
        if len(input_factors) != count or len(output_factors) != count or len(locations) != count:
            raise ValueError(
                f"the state holds {len(input_factors)} input and {len(output_factors)} output factors "
                f"for {count} layers"
            )
        for layer, a, g in zip(self._layers, input_factors, output_factors, strict=True):
            d_a, d_g = layer.factor_sizes
            for side, factor, size in (("input", a, d_a), ("output", g, d_g)):
                if factor.shape != (size, size) or not factor.is_floating_point():
                    raise ValueError(
                        f"layer {layer.name!r}: the saved {side} factor is {tuple(factor.shape)} {factor.dtype}, "
                        f"this layer's is ({size}, {size}): the state is from another model"
                    )
                if not all_finite(factor):
                    raise ValueError(f"layer {layer.name!r}: the saved {side} factor contains NaN or Inf")

    def _checked_basis(self, layer: PreconditionedLayer, tensors: list[Tensor]) -> tuple:
        """A saved basis of the mode's type, refused when its sizes are not the layer's or it is not finite."""
        fields = self.mode.basis_type._fields
        if len(tensors) != len(fields):
            raise ValueError(f"layer {layer.name!r}: the saved basis has {len(tensors)} tensors, {fields} expected")
        basis = self.mode.basis_type(*tensors)
        shapes = self.mode.basis_shapes(*layer.factor_sizes)
        for name, t, shape in zip(fields, tensors, shapes, strict=True):
            if tuple(t.shape) != shape or not all_finite(t):
                raise ValueError(
                    f"layer {layer.name!r}: the saved {name} is {tuple(t.shape)} (it must be {shape}) or not finite"
                )
        return basis
