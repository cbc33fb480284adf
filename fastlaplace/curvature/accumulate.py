"""Curvature accumulated over batches: Kronecker factors or the diagonal, per layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import ops
from fastlaplace.curvature.statistics import LayerStatistics
from fastlaplace.reference import accumulation_dtype


class KronCurvature:
    """K-FAC factors ``A_l = Σ_n â_n â_nᵀ`` and ``G_l = Σ_n Σ_k g_nk g_nkᵀ`` per layer.

    With N data seen, layer l's GGN block (row-major ``[W | b]`` order) is approximated
    by ``kron(G_l, A_l) / N``: exact for a single datum.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.input_factors: list[Tensor] = []
        self.output_factors: list[Tensor] = []
        self.num_data = 0

    def update(self, statistics: Sequence[LayerStatistics]) -> None:
        """Add one batch: all layers' factors in one call of the fused operator."""
        if not self.names:
            self._allocate(statistics)
        elif [s.name for s in statistics] != self.names:
            raise ValueError(f"layers {[s.name for s in statistics]} differ from the first batch's {self.names}")
        grads = [s.output_grads.reshape(-1, s.output_grads.shape[-1]) for s in statistics]
        ops.factor_accumulate_(
            self.input_factors + self.output_factors,
            [s.inputs for s in statistics] + grads,
            [s.has_bias for s in statistics] + [False] * len(statistics),
        )
        self.num_data += statistics[0].inputs.shape[0]

    def _allocate(self, statistics: Sequence[LayerStatistics]) -> None:
        self.names = [s.name for s in statistics]
        for s in statistics:
            options = {"dtype": accumulation_dtype(s.inputs.dtype), "device": s.inputs.device}
            d_a = s.inputs.shape[1] + s.has_bias
            self.input_factors.append(torch.zeros(d_a, d_a, **options))
            self.output_factors.append(torch.zeros(s.output_grads.shape[-1], s.output_grads.shape[-1], **options))


class DiagCurvature:
    """Diagonal of the GGN (or Fisher) per layer, ``(d_out, d_in + bias)`` each (bias last)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.diagonals: list[Tensor] = []
        self.num_data = 0

    def update(self, statistics: Sequence[LayerStatistics]) -> None:
        """Add one batch with the fused diagonal-GGN operator."""
        batch = ops.diag_ggn(
            [s.inputs for s in statistics], [s.output_grads for s in statistics], [s.has_bias for s in statistics]
        )
        if not self.names:
            self.names, self.diagonals = [s.name for s in statistics], batch
        elif [s.name for s in statistics] != self.names:
            raise ValueError(f"layers {[s.name for s in statistics]} differ from the first batch's {self.names}")
        else:
            for total, part in zip(self.diagonals, batch, strict=True):
                total.add_(part)
        self.num_data += statistics[0].inputs.shape[0]
