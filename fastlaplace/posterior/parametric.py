"""Weight-space Laplace posteriors: a Gaussian N(θ*, P⁻¹) over the ``[W | b]`` of the covered layers."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastlaplace import distributed
from fastlaplace.curvature import LayerStatistics, layer_statistics, memory, split_heteroscedastic, trainable_bias
from fastlaplace.curvature.column_backward import batches_backward
from fastlaplace.curvature.layout import block_to_parameter, parameter_to_block, weight_shape
from fastlaplace.curvature.model_io import call_model
from fastlaplace.curvature.statistics import layer_statistic_parts
from fastlaplace.posterior.base import BaseLaplace, _own_parameters


class ParametricLaplace(BaseLaplace):
    """A Gaussian posterior N(θ*, P⁻¹) over the weights: samples, ``pred_type="nn"``, a prior per parameter.

    Subclasses define the structure of P (diagonal, Kronecker-factored, full, low rank)
    through ``_sample_deviations`` and :class:`BaseLaplace`'s structure-specific methods.
    """

    supports_prior_per_parameter = True
    pred_types = ("glm", "nn")

    # ------------------------------------------------------------------ parameters

    def _prior_per_layer(self, delta: Tensor) -> list[Tensor]:
        """Each layer's prior precision, broadcastable to its ``(d_out, d_A)`` ``[W | b]`` matrix."""
        if self._is_per_layer(delta):
            return list(delta.unbind())
        return self._from_parameter_order(delta)

    def _prior_diagonal(self, delta: Tensor) -> Tensor:
        """``(P,)`` the prior precision of every parameter, in the layers' ``[W | b]`` row-major order."""
        deltas = self._prior_per_layer(delta)
        return torch.cat([d.expand_as(w).flatten() for d, w in zip(deltas, self.layer_weights(), strict=True)])

    def _layer_parameters(self) -> list[Tensor]:
        """The posterior's parameters in ``named_parameters()`` order (weight, then bias, per layer)."""
        return [p for _, module in self.layers for p in _own_parameters(module)]

    def _to_parameter_order(self, augmented: list[Tensor]) -> Tensor:
        """``(*, P)``: per layer ``(*, d_out, d_A)`` matrices ``[W | b]`` flattened as W, then b."""
        parts = []
        for (_, module), matrix in zip(self.layers, augmented, strict=True):
            d_in = weight_shape(module)[1]
            parts.append(block_to_parameter(module, matrix[..., :d_in]))
            if matrix.shape[-1] > d_in:
                parts.append(matrix[..., d_in])
        return torch.cat(parts, dim=-1)

    def _from_parameter_order(self, vector: Tensor) -> list[Tensor]:
        """Inverse of :meth:`_to_parameter_order` for one ``(P,)`` vector."""
        matrices = []
        offset = 0
        for _, module in self.layers:
            d_out, d_in = weight_shape(module)
            matrix = parameter_to_block(module, vector[offset : offset + d_out * d_in])
            offset += d_out * d_in
            if trainable_bias(module) is not None:
                matrix = torch.cat([matrix, vector[offset : offset + d_out].unsqueeze(1)], dim=1)
                offset += d_out
            matrices.append(matrix)
        return matrices

    @abstractmethod
    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        """Per layer ``(n, d_out, d_A)`` draws from N(0, P_l⁻¹)."""

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """``(n_samples, P)`` draws of the posterior's parameters, in ``named_parameters()`` order."""
        self._require_fit()
        self._check_sampling(n_samples, generator)
        deviations = self._sample_deviations(n_samples, generator)
        return self._to_parameter_order([w + d for w, d in zip(self.layer_weights(), deviations, strict=True)])

    # ------------------------------------------------------------------ fitting

    def fit(self, loader: Iterable, override: bool = True, progress_bar: bool | None = None) -> None:
        """Accumulate the curvature over a loader of ``(x, y)`` batches, all-or-nothing.

        Args:
            loader: iterable of ``(x, y)`` pairs; under ``torch.distributed`` (more than one
                rank) each rank's shard, and every rank ends with the fit of all shards.
            override: start afresh (True) or add the data to what was fitted before.
            progress_bar: show a tqdm bar; by default when the loader has 50 batches or more.

        Raises:
            ValueError: for a loader with no batch, or a batch that is not a valid ``(x, y)``
                pair (see ``_split_batch``); the posterior is then as it was before the call.
        """
        earlier = None if override or not self._fitted else (self._curvature_tensors(), self.loss, self.num_data)
        with self._unchanged_on_failure():
            self._reset_curvature()
            self.loss, self.num_data = 0.0, 0
            self._fit_pass(loader, progress_bar)
            self._sum_over_ranks()
            if earlier is not None:
                self._add_earlier_fit(*earlier)
            self._mean = self._current_weights()
            self._fitted = True

    def _checked_batches(
        self, loader: Iterable, progress_bar: bool | None, description: str, in_parts: bool = False
    ) -> Iterator[tuple]:
        """The loader's batches as checked ``(x, y)``, under a progress bar (by default for 50 batches or more).

        A batch whose curvature pass would hold more than
        :data:`~fastlaplace.curvature.memory.CURVATURE_PASS_BYTES` goes in parts (see
        :meth:`_samples_per_pass`; ``in_parts``: for :meth:`_batch_statistic_parts`).
        """
        if progress_bar is None:
            progress_bar = hasattr(loader, "__len__") and len(loader) >= 50
        samples_per_pass = None
        for batch in tqdm(loader, desc=description, disable=not progress_bar):
            x, y = self._split_batch(batch)
            self._check_targets(y, self._batch_size(x))
            if samples_per_pass is None:
                samples_per_pass = self._samples_per_pass(x, in_parts)
            if not isinstance(x, Tensor) or x.shape[0] <= samples_per_pass:
                yield x, y
            else:
                yield from zip(x.split(samples_per_pass), y.split(samples_per_pass), strict=True)

    def _samples_per_pass(self, x: Tensor, in_parts: bool) -> int:
        """Samples per curvature pass, so that it holds about ``CURVATURE_PASS_BYTES`` (unbounded: inf).

        A pass holds the forward's graph and the backpropagated columns of every layer: all
        of them at once, or one at a time for a model whose columns go back in plain
        backwards taken ``in_parts``. A ResNet-18 on CIFAR images holds about 54 MB per sample
        with all its columns (3.4 GiB for a batch of 64), 10 MB with one. Parts of a batch give the same
        factors (sums over the data). Not split: a last-layer posterior (no backward).
        """
        if self.last_layer_only:
            return math.inf
        one_at_a_time = in_parts and not batches_backward(self.model)
        modules = [m for _, m in self.layers]
        per_sample = memory.pass_bytes_per_sample(self.model, x, modules, 1 if one_at_a_time else None)
        return max(1, memory.CURVATURE_PASS_BYTES // per_sample) if per_sample else math.inf

    def _fit_pass(self, loader: Iterable, progress_bar: bool | None, generator: torch.Generator | None = None) -> None:
        """One pass over the loader: each batch's statistics go to ``_update_curvature``, its loss is added."""
        batches = 0
        for x, y in self._checked_batches(loader, progress_bar, "fitting the Laplace curvature", in_parts=True):
            output, parts = self._batch_statistic_parts(x, y, generator)
            self._check_outputs(output, y)
            self.loss += float(self._summed_loss(output, y))
            for j, stats in enumerate(parts):
                self._update_curvature(stats, new_batch=j == 0)
            self.num_data += y.shape[0]
            self.num_outputs = output.shape[1]
            batches += 1
        if batches == 0:
            raise ValueError("the loader yielded no batch: nothing to fit (an exhausted iterator?)")

    def _batch_statistics(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[LayerStatistics]]:
        """One batch's ``(N, C)`` output and per-layer statistics (structures with closed forms override it)."""
        return layer_statistics(self.model, x, y, **self._statistics_options(generator))

    def _batch_statistic_parts(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Iterator[list[LayerStatistics]]]:
        """:meth:`_batch_statistics` in parts of the columns (see ``layer_statistic_parts``), for the fit."""
        return layer_statistic_parts(self.model, x, y, **self._statistics_options(generator))

    def _statistics_options(self, generator: torch.Generator | None) -> dict:
        """The keyword arguments of ``layer_statistics`` and ``layer_statistic_parts`` after the batch."""
        return {
            "likelihood": self._likelihood(True),
            "mode": self.curvature_mode,
            "generator": generator,
            "layers": self.layers,
            "compute_dtype": self.curvature_dtype,
            "output_noise": self.sigma_noise if self.noise_per_output else None,
            "output_layer": self.last_layer_only,
        }

    def _sum_over_ranks(self) -> None:
        """After each rank's pass over its shard: sum the curvature, the loss and ``num_data`` over the ranks.

        A no-op on one rank. Every rank must call it (each with at least one batch), as for
        any collective; afterwards every rank holds the fit of all the data.
        """
        if not distributed.is_distributed():
            return
        tensors = self._curvature_tensors()
        floating = [t for t in tensors if t.is_floating_point()]  # integer entries are layout (e.g. locations)
        totals = torch.tensor([self.loss, self.num_data], dtype=torch.float64, device=floating[0].device)
        distributed.all_reduce_([*floating, totals])
        self.loss, self.num_data = float(totals[0]), round(float(totals[1]))
        self._restore_curvature(tensors, self.num_data)

    def _add_earlier_fit(self, tensors: list[Tensor], loss: float, num_data: int) -> None:
        """``fit(override=False)``: add an earlier fit (its curvature tensors, loss, count) to the one just made.

        Added once after the ranks' sum, as it is the same on every rank.
        """
        total = [t + e if t.is_floating_point() else t for t, e in zip(self._curvature_tensors(), tensors, strict=True)]
        self._restore_curvature(total, self.num_data + num_data)
        self.loss, self.num_data = self.loss + loss, self.num_data + num_data

    # ------------------------------------------------------------------ predictive

    def __call__(
        self,
        x: Tensor,
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
    ):
        """:meth:`BaseLaplace.__call__`, and ``pred_type="nn"``: the network with sampled weights, averaged.

        Returns:
            For ``"nn"``: classification ``(N, C)`` mean probabilities, regression the
            ``(N, C)`` mean and variance of the sampled outputs; otherwise as
            :meth:`BaseLaplace.__call__`.
        """
        if pred_type == "nn":
            self._check_link_approx(link_approx)
            return self._sampled_network_predictive(x, n_samples, generator, self._likelihood(fitting))
        return super().__call__(x, pred_type, joint, link_approx, n_samples, diagonal_output, generator, fitting)

    def _sampled_outputs(self, x: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """``(n_samples, N, C)`` outputs of the network with weights drawn from the posterior."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        keys = [names[id(p)] for p in self._layer_parameters()]
        x = self._prediction_inputs(x)
        outputs = []
        with torch.no_grad():
            for draw in self.sample(n_samples, generator):
                values = torch.split(draw, [p.numel() for p in self._layer_parameters()])
                params = {k: v.view_as(p) for k, v, p in zip(keys, values, self._layer_parameters(), strict=True)}
                outputs.append(call_model(self.model, x, params))
        return torch.stack(outputs)

    def _sampled_network_predictive(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None, likelihood: str
    ):
        outputs = self._sampled_outputs(x, n_samples, generator)
        if likelihood == "classification":
            return outputs.softmax(-1).mean(0)
        return outputs.mean(0), outputs.var(0)

    def _target_moments(
        self, x: Tensor, pred_type: str = "glm", n_samples: int = 100, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`BaseLaplace._target_moments`; heteroscedastic ``"nn"``: E[μ], and Var[μ] + E[e^s] over samples."""
        if pred_type == "nn" and self._likelihood(fitting=False) == "heteroscedastic_regression":
            mean, log_var = split_heteroscedastic(self._sampled_outputs(x, n_samples, generator))
            return mean.mean(0), mean.var(0) + log_var.exp().mean(0)
        return super()._target_moments(x, pred_type, n_samples, generator)
