"""fastlaplace's curvature as a laplace-torch backend: ``laplace.Laplace(..., backend=FastGGN)``.

laplace-torch (0.3) asks its backend for one batch's loss and curvature at a time:
``kron(x, y, N)`` for Kron posteriors, ``diag(x, y)`` for diagonal ones and ``full(x, y)``
for full and subnetwork ones; its GLM predictive asks for Jacobians. The classes below
compute the first three with fastlaplace's own layer statistics and fused operators
(:func:`fastlaplace.curvature.layer_statistics`' batched backward of the loss-Hessian
square-root columns, :class:`~fastlaplace.curvature.KronCurvature`,
:class:`~fastlaplace.curvature.DiagCurvature`, :func:`fastlaplace.ops.factor_accumulate_`),
never BackPACK or ASDL, and return them in laplace-torch's layout and normalisation, so
that the same posterior results as with ``BackPackGGN`` (``BackPackEF``, or ``CurvlinopsEF``
for an empirical-Fisher Kron). The Jacobians of the predictive are laplace-torch's own
(:class:`laplace.curvature.CurvatureInterface`: ``torch.func`` for all weights, the closed
form for the last layer).

Layout and scale (what laplace-torch's BackPACK and Curvlinops backends return):

- One Kron entry per trainable parameter, in ``model.parameters()`` order: a weight gets
  ``[G, A]`` with ``G`` over its ``d_out`` outputs and ``A`` over its ``d_in`` inputs
  (``C_in·kh·kw`` for a Conv2d), ``kron(G, A)`` its block in row-major order; a bias its
  own block ``[G]``. fastlaplace's factors cover ``[W | b]`` jointly (a ones column on the
  input): the weight's ``A`` leaves that column out, and the bias block is ``G`` alone,
  which is exactly the ``b``-``b`` block of the joint factorisation.
- Summed over batches, ``G = Σ_n Σ_k g gᵀ`` and ``A = Σ_n a aᵀ / N`` (N the data set size
  laplace-torch passes; divided further by the locations per sample for a Conv2d, K-FAC's
  "expand"), so ``kron(G, A)`` is the K-FAC curvature of the summed loss.
- laplace-torch works with torch's summed losses (``CrossEntropyLoss``, ``MSELoss``) and
  multiplies their curvature by ``factor`` (½ for regression), the ``Kron`` block by block
  (``√factor`` on each of a weight's two factors). The returned loss is ``factor`` times
  the summed torch loss. So for regression the GGN is that of ``½‖f − y‖²``, and the
  empirical Fisher, built from the gradients of ``‖f − y‖²``, is twice that of
  ``½‖f − y‖²`` (laplace-torch's convention, kept here).

Layers: ``kron`` covers Linear and Conv2d layers (Conv2d with ``groups=1`` and zero
padding); ``diag`` and ``full`` also Embedding, the norm layers and grouped Conv2d (as
:func:`fastlaplace.curvature.supported_layers`). A layer of another type with trainable
parameters is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    from laplace.curvature import EFInterface, GGNInterface
    from laplace.utils import Kron
except ImportError as error:  # pragma: no cover - exercised only without laplace-torch
    raise ImportError(
        "fastlaplace.integrations.laplace_torch needs laplace-torch (the backend plugs into it); "
        "install it with `pip install laplace-torch`"
    ) from error

from fastlaplace import ops
from fastlaplace.curvature import (
    DiagCurvature,
    KronCurvature,
    LayerStatistics,
    output_gradient_columns,
    supported_layers,
)
from fastlaplace.curvature.layout import block_to_parameter, weight_shape
from fastlaplace.curvature.statistics import backpropagate_columns, has_kron_factors
from fastlaplace.reference import accumulation_dtype

__all__ = ["FastCurvatureInterface", "FastEF", "FastGGN"]

Batch = Tensor | MutableMapping[str, Any]
#: per-call options laplace-torch may forward to ``kron`` / ``diag`` / ``full`` (``N`` and the
#: two Curvlinops-style options understood here); anything else is refused by name
_CALL_OPTIONS = ("N", "kfac_approx", "mc_samples")


def _check_kfac_approx(kfac_approx: str) -> None:
    if kfac_approx not in ("expand", "reduce"):
        raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")


class FastCurvatureInterface:
    """What :class:`FastGGN` and :class:`FastEF` share: ``kron``, ``diag`` and ``full`` from fastlaplace.

    A mixin for laplace-torch's :class:`~laplace.curvature.GGNInterface` /
    :class:`~laplace.curvature.EFInterface`: those provide the constructor's attributes
    (``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``lossfunc``,
    ``factor``, ``params_dict``) and the Jacobians, this class the curvature. Subclasses
    set :attr:`mode`.
    """

    model: nn.Module
    likelihood: str
    last_layer: bool
    subnetwork_indices: Tensor | None
    lossfunc: Callable[[Tensor, Tensor], Tensor]
    factor: float
    params_dict: dict[str, nn.Parameter]
    kfac_approx: str
    num_samples: int

    @property
    def mode(self) -> str:
        """The fastlaplace curvature mode: ``"ggn"``, ``"mc"`` or ``"ef"``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ laplace-torch's calls

    def kron(self, x: Batch, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """One batch's loss and K-FAC curvature, in laplace-torch's ``Kron`` layout.

        Args:
            x: ``(M, ...)`` a batch of inputs.
            y: ``(M,)`` class indices or ``(M, C)`` regression targets.
            N: the number of data in the whole data set (the input factors are divided by it).
            **kwargs: ``kfac_approx`` (``"expand"`` / ``"reduce"``) or ``mc_samples`` to
                override the constructor's choice for this call.

        Returns:
            ``(loss, kron)``: the scalar loss ``factor · Σ torch loss`` (detached) and a
            ``Kron`` with ``[G (d_out, d_out), A (d_in, d_in)]`` per weight and
            ``[G (d_out, d_out)]`` per bias, in ``model.parameters()`` order.

        Raises:
            ValueError: on a layer without Kronecker factors (Embedding, LayerNorm,
                BatchNorm) or of an unsupported type (named), or with ``subnetwork_indices``.
        """
        kfac_approx = self._options(kwargs).get("kfac_approx", self.kfac_approx)
        if self.subnetwork_indices is not None:
            raise ValueError(f"{type(self).__name__}.kron: a subnetwork posterior needs hessian_structure='full'")
        loss, stats = self._batch(x, y, kwargs, kron=True)
        curvature = KronCurvature(kfac_approx)
        curvature.update(stats)
        dtype, root = self._dtype, math.sqrt(self.factor)
        scale = self._torch_loss_scale()
        blocks: dict[int, list[Tensor]] = {}
        for i, s in enumerate(stats):
            a, g = curvature.input_factors[i], curvature.output_factors[i]
            if s.has_bias:
                a = a[:-1, :-1]  # the weight's inputs without the ones column
                blocks[id(s.module.bias)] = [(g * (self.factor * scale)).to(dtype)]
            blocks[id(s.module.weight)] = [
                (g * (root * scale)).to(dtype),
                (a * (root / (N * curvature.locations[i]))).to(dtype),
            ]
        return loss, Kron(self._in_parameter_order(blocks))

    def diag(self, x: Batch, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """One batch's loss and curvature diagonal.

        Args:
            x: ``(M, ...)`` a batch of inputs.
            y: ``(M,)`` class indices or ``(M, C)`` regression targets.
            **kwargs: ``N`` (unused) or ``mc_samples``.

        Returns:
            ``(loss, h)``: the scalar loss and the ``(P,)`` diagonal over the trainable
            parameters in ``model.parameters()`` order (each flattened row-major), or over
            ``subnetwork_indices`` when set.
        """
        self._options(kwargs)
        loss, stats = self._batch(x, y, kwargs)
        curvature = DiagCurvature()
        curvature.update(stats)
        blocks: dict[int, list[Tensor]] = {}
        for s, d in zip(stats, curvature.diagonals, strict=True):
            # (d_out, d_A) in weight_matrix's layout: the weight's columns, then the bias's.
            blocks[id(s.module.weight)] = [block_to_parameter(s.module, d[:, : d.shape[1] - s.has_bias])]
            if s.has_bias:
                blocks[id(s.module.bias)] = [d[:, -1]]
        h = torch.cat([b[0] for b in self._in_parameter_order(blocks)])
        if self.subnetwork_indices is not None:
            h = h[self.subnetwork_indices.to(h.device)]
        return loss, (h * (self.factor * self._torch_loss_scale())).to(self._dtype)

    def full(self, x: Batch, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """One batch's loss and dense curvature (fastlaplace's dense path: one Gram matrix of the columns).

        Args:
            x: ``(M, ...)`` a batch of inputs.
            y: ``(M,)`` class indices or ``(M, C)`` regression targets.
            **kwargs: ``N`` (unused) or ``mc_samples``.

        Returns:
            ``(loss, H)``: the scalar loss and the ``(P, P)`` curvature over the trainable
            parameters in ``model.parameters()`` order, or over ``subnetwork_indices``.
        """
        self._options(kwargs)
        loss, stats = self._batch(x, y, kwargs)
        blocks: dict[int, list[Tensor]] = {}
        for s in stats:
            grads = s.weight_gradients()  # (M, K, d_out * d_A), row-major [W | b]
            grads = grads.view(*grads.shape[:2], weight_shape(s.module)[0], -1)
            blocks[id(s.module.weight)] = [block_to_parameter(s.module, grads[..., : grads.shape[-1] - s.has_bias])]
            if s.has_bias:
                blocks[id(s.module.bias)] = [grads[..., -1]]
        columns = torch.cat([b[0] for b in self._in_parameter_order(blocks)], dim=-1).flatten(0, 1)  # (M K, P)
        if self.subnetwork_indices is not None:
            columns = columns[:, self.subnetwork_indices.to(columns.device)]
        h = columns.new_zeros(columns.shape[1], columns.shape[1], dtype=accumulation_dtype(columns.dtype))
        ops.factor_accumulate_([h], [columns.contiguous()], [False])
        return loss, (h * (self.factor * self._torch_loss_scale())).to(self._dtype)

    # ------------------------------------------------------------------ helpers

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(self.params_dict.values())).dtype

    def _torch_loss_scale(self) -> float:
        """The curvature of torch's summed loss over that of fastlaplace's loss (½‖f − y‖² or Σ CE).

        ``MSELoss(reduction="sum")`` is ``½‖f − y‖²`` divided by ``factor = ½``: its Hessian
        (and Fisher) is ``1 / factor`` times fastlaplace's, its gradients' outer products
        ``1 / factor²`` times.
        """
        return 1.0 / self.factor**2 if self.mode == "ef" else 1.0 / self.factor

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unsupported option(s) {unknown}; it understands {list(_CALL_OPTIONS)}"
            )
        return kwargs

    def _columns(self, output: Tensor, target: Tensor, samples: int) -> Tensor:
        """``(M, C, K)`` the output curvature's columns (:func:`output_gradient_columns`), MC samples averaged."""
        likelihood = "regression" if self.likelihood == "regression" else "classification"
        return output_gradient_columns(
            output, target, likelihood, self.mode, mc_samples=samples if self.mode == "mc" else 1
        )

    def _batch(
        self, x: Batch, y: Tensor, kwargs: dict[str, Any], kron: bool = False
    ) -> tuple[Tensor, list[LayerStatistics]]:
        """The batch's loss and every covered layer's statistics (one forward, one batched backward)."""
        name = type(self).__name__
        if self.last_layer:
            with torch.no_grad():
                _, features = self.model.forward_with_features(x)
            network, inputs = self.model.last_layer, features.detach()
        else:
            network, inputs = self.model, x
        try:
            layers = supported_layers(network)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        if kron:
            for layer_name, module in layers:
                if not has_kron_factors(module):
                    raise ValueError(
                        f"{name}.kron: layer {layer_name!r} ({type(module).__name__}) has no Kronecker factors in "
                        "laplace-torch's Kron layout (Linear and Conv2d only); use hessian_structure='diag' or "
                        "'full', or fastlaplace.Laplace, whose Kron posterior has blocks for such layers"
                    )
        target = y if self.likelihood == "regression" else y.reshape(-1)
        samples = int(kwargs.get("mc_samples", self.num_samples))
        try:
            output, layers, layer_inputs, grads = backpropagate_columns(
                network, inputs, lambda out: self._columns(out, target, samples), layers
            )
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        stats = [LayerStatistics(n, m, a, g) for (n, m), a, g in zip(layers, layer_inputs, grads, strict=True)]
        loss = self.factor * self.lossfunc(output, target)
        return loss.detach(), stats

    def _in_parameter_order(self, blocks: dict[int, list[Tensor]]) -> list[list[Tensor]]:
        """The blocks of laplace-torch's trainable parameters, in its order."""
        missing = [name for name, p in self.params_dict.items() if id(p) not in blocks]
        if missing or len(blocks) != len(self.params_dict):
            raise ValueError(
                f"{type(self).__name__}: the trainable parameters {missing or '(some)'} are not a weight or bias of a "
                "supported layer, or parameters changed requires_grad after the backend was made"
            )
        return [blocks[id(p)] for p in self.params_dict.values()]


class FastGGN(FastCurvatureInterface, GGNInterface):
    """The exact GGN (``stochastic=True``: the Monte-Carlo Fisher) computed by fastlaplace.

    A drop-in ``backend=`` for ``laplace.Laplace``: ``kron``, ``diag`` and ``full`` come from
    fastlaplace's layer statistics and operators (see the module docstring for the layout);
    ``jacobians`` / ``functorch_jacobians`` (``torch.func``) and ``last_layer_jacobians``
    (closed form), used by the GLM predictive, are laplace-torch's own
    :class:`~laplace.curvature.CurvatureInterface` methods.

    Args:
        model: the network, or laplace-torch's ``FeatureExtractor`` with ``last_layer=True``.
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: cover the last layer only (set by laplace-torch's last-layer posteriors).
        subnetwork_indices: ``(S,)`` indices of the covered parameters (``full`` only).
        dict_key_x: the key of the input in dict batches (laplace-torch's option).
        dict_key_y: the key of the target in dict batches.
        stochastic: the MC Fisher (labels sampled from the model, torch's global RNG) instead
            of the exact GGN.
        num_samples: MC samples per datum with ``stochastic=True``, averaged.
        kfac_approx: ``"expand"`` (every Conv2d location a sample, as BackPACK's KFLR /
            KFAC) or ``"reduce"``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        kfac_approx: str = "expand",
    ) -> None:
        _check_kfac_approx(kfac_approx)
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        self.kfac_approx = kfac_approx
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic, num_samples
        )

    @property
    def mode(self) -> str:
        """``"mc"`` with ``stochastic=True``, else ``"ggn"``."""
        return "mc" if self.stochastic else "ggn"


class FastEF(FastCurvatureInterface, EFInterface):
    """The empirical Fisher (gradients at the true labels) computed by fastlaplace.

    As :class:`FastGGN`, with ``kron`` also available (BackPACK has no empirical-Fisher
    K-FAC; the result is that of laplace-torch's ``CurvlinopsEF``). ``gradients``,
    ``jacobians`` and ``last_layer_jacobians`` are laplace-torch's own.

    Args:
        model: the network, or laplace-torch's ``FeatureExtractor`` with ``last_layer=True``.
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: cover the last layer only.
        subnetwork_indices: ``(S,)`` indices of the covered parameters (``full`` only).
        dict_key_x: the key of the input in dict batches.
        dict_key_y: the key of the target in dict batches.
        kfac_approx: ``"expand"`` or ``"reduce"`` for Conv2d layers.
    """

    num_samples = 1

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        kfac_approx: str = "expand",
    ) -> None:
        _check_kfac_approx(kfac_approx)
        self.kfac_approx = kfac_approx
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)

    @property
    def mode(self) -> str:
        """``"ef"``."""
        return "ef"
