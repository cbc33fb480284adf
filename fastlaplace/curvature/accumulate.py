"""Curvature accumulated over batches, per layer: Kronecker factors, the diagonal, embedding and unit-wise blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastlaplace import ops
from fastlaplace.curvature.big_factors import SketchedFactor
from fastlaplace.curvature.closed_form import SoftmaxStatistics, softmax_hessian_sum
from fastlaplace.curvature.eigen import MAX_EIGH_SIDE
from fastlaplace.curvature.layout import weight_shape
from fastlaplace.curvature.memory import check_allocation
from fastlaplace.curvature.statistics import LayerStatistics, conv_padding
from fastlaplace.reference import accumulation_dtype

#: Summed factors (no ``decay``) gather the rows of their Gram matrices over batches, up to
#: this many per factor, and multiply them in one call: a Gram of 2,048 rows runs about 1.6x
#: faster per row than eight of 256 on 2 AVX2 cores (the GEMMs' depth is the row count).
GATHERED_ROWS = 2048
#: The gathering buffers of all the factors of one curvature hold at most this many bytes.
GATHER_BYTES = 16 << 20
#: Summed factors gather each Conv2d's inputs over batches, up to this many bytes per layer,
#: for one call of the input-factor operator: a fit split into parts of a few images would
#: otherwise pay that operator's fixed cost (a pass over the whole factor) once per part.
GATHERED_CONV_BYTES = 8 << 20
#: The batched Gram of channels-first output gradients holds at most this many bytes of
#: per-block ``(d, d)`` products at a time.
CHANNEL_GRAM_BYTES = 16 << 20


class KronCurvature:
    """K-FAC factors ``A_l = Σ_n â_n â_nᵀ`` and ``G_l = Σ_n Σ_k g_nk g_nkᵀ`` per layer.

    With N data seen, layer l's GGN block (row-major ``[W | b]`` order) is approximated
    by ``kron(G_l, A_l) / (N L_l)``: exact for a single datum of a Linear layer. A layer
    applied at L_l locations (Conv2d output positions, sequence tokens) follows
    ``kfac_approx``: ``"expand"`` counts every location as a sample for both factors (KFC,
    Grosse & Martens 2016); ``"reduce"`` first averages the inputs and sums the output
    gradients over the locations, and then ``L_l = 1``.

    With ``low_precision_products`` the output gradients, when they arrive in bf16 / fp16
    (a ``compute_dtype`` pass), are multiplied in that precision and each batch's Gram
    matrix is rounded to it before being added in fp32: about 4x faster GEMMs on CPUs
    with bf16 units, for a relative error of about 2⁻⁹ per batch.

    With ``decay`` β the factors are instead exponential moving averages of each batch's
    per-datum factors, ``A ← β A + (1 − β) Σ â âᵀ / (N L)`` and ``G ← β G + (1 − β) Σ g gᵀ / N``
    (the first batch replaces them), so that ``kron(G, A)`` approximates the curvature of
    one datum with no further scale (the K-FAC optimiser's running factors).

    Summed factors (no ``decay``, no ``output_scales``) of inputs given as rows (not the
    Conv2d input factor) copy each batch's rows into a buffer of up to
    :data:`GATHERED_ROWS` rows (:data:`GATHER_BYTES` for all of them) and multiply the
    buffer when it is full, or when ``input_factors`` / ``output_factors`` are read: the
    same sums, fewer and deeper GEMMs. Batches with more rows than the buffer skip it.
    The ``G`` of a Conv2d with at least half as many output locations as channels is summed
    over its gradients' ``(d, L)`` blocks instead (:func:`channel_gram`): no rows at all.

    A factor of side above ``max_dense_factor`` is a :class:`SketchedFactor` (for
    ``factor_rank`` eigenpairs) instead of a dense tensor; a dense one larger than
    :data:`~fastlaplace.curvature.memory.MEMORY_LIMIT_GIB` is refused. The output factor of a
    :class:`SoftmaxStatistics` layer is added in closed form from its probabilities.
    """

    def __init__(
        self,
        kfac_approx: str = "expand",
        low_precision_products: bool = False,
        decay: float | None = None,
        max_dense_factor: int | None = None,
        factor_rank: int = 256,
    ) -> None:
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        if max_dense_factor is not None and max_dense_factor < 1:
            raise ValueError(f"max_dense_factor must be a positive side or None, got {max_dense_factor!r}")
        if factor_rank < 1:
            raise ValueError(f"factor_rank must be a positive number of eigenpairs, got {factor_rank!r}")
        self.max_dense_factor, self.factor_rank = max_dense_factor, factor_rank
        self.kfac_approx = kfac_approx
        self.low_precision_products = low_precision_products
        self.decay = decay
        self.names: list[str] = []
        self._input_factors: list[Tensor] = []
        self._output_factors: list[Tensor] = []
        self.locations: list[int] = []
        self.num_data = 0
        self._drop_buffers()

    @property
    def input_factors(self) -> list[Tensor | SketchedFactor]:
        """Per layer ``A_l``, ``(d_in + bias, d_in + bias)`` (or sketched), with every gathered row added."""
        self._flush()
        return self._input_factors

    @input_factors.setter
    def input_factors(self, factors: list[Tensor | SketchedFactor]) -> None:
        self._drop_buffers()
        self._input_factors = factors

    @property
    def output_factors(self) -> list[Tensor | SketchedFactor]:
        """Per layer ``G_l``, ``(d_out, d_out)`` (or sketched), with every gathered row added."""
        self._flush()
        return self._output_factors

    @output_factors.setter
    def output_factors(self, factors: list[Tensor | SketchedFactor]) -> None:
        self._drop_buffers()
        self._output_factors = factors

    def update(
        self,
        statistics: Sequence[LayerStatistics],
        output_scales: Sequence[float] | None = None,
        input_scales: Sequence[float] | None = None,
        new_batch: bool = True,
    ) -> None:
        """Add one batch: all layers' factors in one call of the fused operator.

        Args:
            statistics: one entry per layer, the same layers in every batch.
            output_scales: per layer a factor s on its output gradients (G gets s²), applied
                in the operator's scale instead of in a scaled copy (the K-FAC optimiser's
                batch size for a mean loss); 1 by default.
            input_scales: per layer a factor on the batch's A (kfac-pytorch's ``1 / L²`` of a
                Conv2d in the K-FAC optimiser); 1 by default.
            new_batch: False for a later part of the columns of the batch added last
                (:func:`~fastlaplace.curvature.statistics.layer_statistic_parts`): only its
                ``G`` is added, the inputs' ``A`` and the data count came with the first part.
        """
        if not new_batch and self.decay is not None:
            raise ValueError("a batch in parts of its columns needs summed factors (decay=None)")
        if not self.names:
            self._allocate(statistics)
        _check_same_layers(self.names, statistics)
        rows_a, rows_g, ones, conv = [], [], [], []
        for i, s in enumerate(statistics):
            reduced = self.kfac_approx == "reduce" and s.shares_weights
            grads = s.location_grads()  # (N, K, L, d_out)
            # None: the G of this layer is the batched Gram of its channels-first blocks (no rows).
            rows_g.append(
                None if self._gram_by_blocks(i, s) else _nonzero_rows(_as_rows(grads.sum(2) if reduced else grads))
            )
            if not new_batch:
                continue
            if reduced:
                rows_a.append(s.patches().mean(1))
                ones.append(False)  # the averaged patches carry the ones column already
            elif s.is_conv and not isinstance(self._input_factors[i], SketchedFactor):
                conv.append(i)  # input factor from the implicit-im2col operator
            elif s.is_conv:  # a sketched input factor takes the patches as rows
                rows_a.append(s.patches().reshape(-1, s.patches().shape[-1]))
                ones.append(False)
            else:
                rows_a.append(s.inputs.reshape(-1, s.inputs.shape[-1]))
                ones.append(s.has_bias)
        n = statistics[0].inputs.shape[0]
        count = len(statistics)
        # F <- beta F + alpha (batch Gram): sums (beta = alpha = 1), or the EMA of per-datum averages.
        if self.decay is None:
            beta, row_alphas, output_alpha = 1.0, [1.0] * count, 1.0
        else:
            beta = self.decay if self.num_data else 0.0
            row_alphas = [(1.0 - beta) / (n * locations) for locations in self.locations]
            output_alpha = (1.0 - beta) / n
        if input_scales is not None:
            row_alphas = [alpha * float(v) for alpha, v in zip(row_alphas, input_scales, strict=True)]
        scales = [1.0] * count if output_scales is None else [float(v) for v in output_scales]
        # Factors multiplied from rows, keyed i for A_i and count + i for G_i.
        keys = [i for i in range(count) if new_batch and i not in conv] + [count + i for i in range(count)]
        rows = rows_a + rows_g
        flags = ones + [False] * count
        alphas = [row_alphas[i] for i in keys[: len(rows_a)]] + [output_alpha * v * v for v in scales]
        fused = [
            j
            for j, key in enumerate(keys)
            if not self._add_outside_operator(key, rows[j], flags[j], alphas[j], beta, statistics)
        ]
        keys, rows, flags, alphas = ([v[j] for j in fused] for v in (keys, rows, flags, alphas))
        if self.low_precision_products and statistics[0].output_grads.dtype in (torch.bfloat16, torch.float16):
            for key, g_rows, alpha in zip(keys, rows, alphas, strict=True):
                if key >= count:
                    factor = self._factor(key)
                    if beta != 1.0:
                        factor.mul_(beta)
                    factor.add_((g_rows.T @ g_rows).to(factor.dtype), alpha=alpha)
            fused = [j for j, key in enumerate(keys) if key < count]
            keys, rows, flags, alphas = ([v[j] for j in fused] for v in (keys, rows, flags, alphas))
        if self.decay is None and output_scales is None and input_scales is None:
            keys, rows, flags, alphas = self._gather(keys, rows, flags)
        for alpha in dict.fromkeys(alphas):  # one fused call per distinct scale (a single one for sums)
            chosen = [j for j, a in enumerate(alphas) if a == alpha]
            ops.factor_accumulate_(
                [self._factor(keys[j]) for j in chosen],
                [rows[j] for j in chosen],
                [flags[j] for j in chosen],
                alpha,
                beta,
            )
        for i in conv:
            s = statistics[i]
            if self.decay is None and input_scales is None:  # plain sums: gathered
                gathered = self._conv_inputs.setdefault(i, (s.module, s.has_bias, []))[2]
                gathered.append(s.inputs)
                if sum(x.nbytes for x in gathered) >= GATHERED_CONV_BYTES:
                    self._multiply_conv_inputs([i])
            else:
                self._conv_input_factor(i, s.module, s.has_bias, s.inputs, row_alphas[i], beta)
        self.num_data += n if new_batch else 0

    def _conv_input_factor(
        self, i: int, m: nn.Conv2d, has_bias: bool, inputs: Tensor, alpha: float = 1.0, beta: float = 1.0
    ) -> None:
        """Add the patch Gram matrix of Conv2d layer i's ``(N, C, H, W)`` inputs to its input factor."""
        ops.conv_input_factor_(
            self._input_factors[i], inputs, m.kernel_size, m.stride, conv_padding(m), m.dilation, has_bias, alpha, beta
        )

    def _multiply_conv_inputs(self, layers: list[int]) -> None:
        """Add the gathered inputs of these Conv2d layers to their input factors and forget them."""
        for i in layers:
            m, has_bias, gathered = self._conv_inputs.pop(i)
            self._conv_input_factor(i, m, has_bias, gathered[0] if len(gathered) == 1 else torch.cat(gathered))

    def _allocate(self, statistics: Sequence[LayerStatistics]) -> None:
        self.names = [s.name for s in statistics]
        self.locations = [1 if self.kfac_approx == "reduce" else s.locations for s in statistics]
        for s in statistics:
            d_g, d_in = weight_shape(s.module)
            self._input_factors.append(self._new_factor(s, "input", d_in + s.has_bias))
            self._output_factors.append(self._new_factor(s, "output", d_g))

    def _new_factor(self, s: LayerStatistics, side_name: str, side: int) -> Tensor | SketchedFactor:
        """A zero factor of this side for layer s: sketched above ``max_dense_factor``, else dense (size-checked)."""
        if self.max_dense_factor is not None and side > self.max_dense_factor:
            return SketchedFactor.zeros(side, self.factor_rank, s.inputs.device)
        if side > MAX_EIGH_SIDE:
            raise ValueError(
                f"the {side_name} factor of layer {s.name!r} is {side} x {side}: LAPACK's eigensolver takes sides up "
                f"to {MAX_EIGH_SIDE}; keep it sketched with max_dense_factor (a Laplace option) at most that, or "
                "leave the layer out (skip_layers of the K-FAC preconditioner)"
            )
        dtype = accumulation_dtype(s.inputs.dtype)
        check_allocation(
            f"the dense {side_name} factor of layer {s.name!r}",
            (side, side),
            dtype,
            "keep it as a truncated eigen-factor with max_dense_factor (a side above it is sketched)",
        )
        return torch.zeros(side, side, dtype=dtype, device=s.inputs.device)

    def _add_outside_operator(
        self,
        key: int,
        rows: Tensor,
        append_ones: bool,
        alpha: float,
        beta: float,
        statistics: Sequence[LayerStatistics],
    ) -> bool:
        """Add a sketched, closed-form or block-Gram factor's share of the batch; False for a fused one."""
        count, factor = len(self.names), self._factor(key)
        if rows is None:
            if beta != 1.0:
                factor.mul_(beta)
            factor.add_(channel_gram(statistics[key - count].output_grads, factor.dtype), alpha=alpha)
            return True
        if key >= count and isinstance(statistics[key - count], SoftmaxStatistics):
            probabilities = statistics[key - count].probabilities
            if isinstance(factor, SketchedFactor):
                factor.add_softmax_hessian(probabilities, alpha, beta)
            else:
                if beta != 1.0:
                    factor.mul_(beta)
                factor.add_(softmax_hessian_sum(probabilities).to(factor.dtype), alpha=alpha)
            return True
        if isinstance(factor, SketchedFactor):
            factor.add_gram(rows, append_ones, alpha, beta)
            return True
        return False

    def _gram_by_blocks(self, i: int, s: LayerStatistics) -> bool:
        """Whether layer s's G is summed from its ``(d, L)`` gradient blocks (:func:`channel_gram`).

        Channels-first gradients would otherwise be copied into rows first; the blocks' batched
        products run 1.5-4x faster than copy and GEMM while they are not much thinner than
        deep (``L >= d / 2``; measured on 2 AVX2 cores, d from 16 to 512).
        """
        if not s.channels_first or self.kfac_approx == "reduce" or self.low_precision_products:
            return False
        return not isinstance(self._output_factors[i], SketchedFactor) and 2 * s.locations >= s.output_grads.shape[2]

    def _factor(self, key: int) -> Tensor:
        count = len(self.names)
        return self._input_factors[key] if key < count else self._output_factors[key - count]

    def _gather(
        self, keys: list[int], rows: list[Tensor], flags: list[bool]
    ) -> tuple[list[int], list[Tensor], list[bool], list[float]]:
        """Copy the batch's rows into the factors' buffers; the entries too large for a buffer are returned.

        A buffer that cannot take its new rows is multiplied first (all such in one fused call).
        """
        if self._capacity is None:  # sized once, from the first batch's row widths
            row_bytes = sum(r.shape[1] * r.element_size() for r in rows)
            self._capacity = min(GATHERED_ROWS, GATHER_BYTES // max(1, row_bytes))
        gathered = [j for j, r in enumerate(rows) if 2 * r.shape[0] <= self._capacity]
        full = [keys[j] for j in gathered if self._filled.get(keys[j], 0) + rows[j].shape[0] > self._capacity]
        self._multiply_buffers(full)
        for j in gathered:
            key, r = keys[j], rows[j]
            if key not in self._buffers:
                self._buffers[key] = r.new_empty(self._capacity, r.shape[1])
                self._ones[key], self._filled[key] = flags[j], 0
            filled = self._filled[key]
            self._buffers[key][filled : filled + r.shape[0]].copy_(r)
            self._filled[key] = filled + r.shape[0]
        direct = [j for j in range(len(rows)) if j not in gathered]
        return [keys[j] for j in direct], [rows[j] for j in direct], [flags[j] for j in direct], [1.0] * len(direct)

    def _flush(self) -> None:
        self._multiply_buffers([k for k, filled in self._filled.items() if filled])
        self._multiply_conv_inputs(list(self._conv_inputs))

    def _multiply_buffers(self, keys: list[int]) -> None:
        """Add the filled rows of these buffers to their factors (one fused call) and empty them."""
        if not keys:
            return
        ops.factor_accumulate_(
            [self._factor(k) for k in keys],
            [self._buffers[k][: self._filled[k]] for k in keys],
            [self._ones[k] for k in keys],
        )
        for k in keys:
            self._filled[k] = 0

    def _drop_buffers(self) -> None:
        """Forget the gathered rows (the factors are being replaced)."""
        # Per factor key (i: A_i, len(names) + i: G_i): its buffer, rows filled, and ones-column flag.
        self._buffers: dict[int, Tensor] = {}
        self._filled: dict[int, int] = {}
        self._ones: dict[int, bool] = {}
        self._capacity: int | None = None
        # Per Conv2d layer index: its module, bias flag and the inputs gathered for its input factor.
        self._conv_inputs: dict[int, tuple[nn.Conv2d, bool, list[Tensor]]] = {}


def channel_gram(grads: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_{n,k} X_nk X_nkᵀ`` over the ``(d, L)`` blocks of channels-first gradients, with no transposing copy.

    Args:
        grads: ``(N, K, d, *spatial)`` the output gradients of a channels-first layer.
        dtype: the accumulation dtype (each chunk is converted before its products).

    Returns:
        ``(d, d)`` in ``dtype``.
    """
    d = grads.shape[2]
    if grads.transpose(0, 1).is_contiguous():  # a column-major batch of columns: its blocks, no copy
        grads = grads.transpose(0, 1)
    blocks = grads.reshape(-1, d, grads[0, 0, 0].numel())
    chunk = max(1, CHANNEL_GRAM_BYTES // (d * d * torch.finfo(dtype).bits // 8))
    gram = torch.zeros(d, d, dtype=dtype, device=grads.device)
    for start in range(0, blocks.shape[0], chunk):
        part = blocks[start : start + chunk].to(dtype)
        gram += torch.bmm(part, part.mT).sum(0)
    return gram


def _as_rows(t: Tensor) -> Tensor:
    """``(..., d)`` as ``(rows, d)``, in any row order (a Gram matrix does not depend on it), copying little.

    A batched backward stores the columns first: that swap is undone by a view. Channels-first
    gradients (a Conv2d's, d = channels not the fastest dimension) are copied as
    ``(d, rows)`` in their own order, whole runs of locations at a time, and returned
    transposed: a transposing copy into ``(rows, d)`` order costs several times more.
    """
    if not t.is_contiguous() and t.transpose(0, 1).is_contiguous():
        t = t.transpose(0, 1)
    if t.dim() > 2 and t.stride(-1) != 1:
        return t.movedim(-1, 0).reshape(t.shape[-1], -1).T
    return t.reshape(-1, t.shape[-1])


def _nonzero_rows(rows: Tensor) -> Tensor:
    """``(R, d)`` rows less those that are all zero, when they are row-major on the CPU (else as they are).

    A zero row adds nothing to a Gram matrix but its share of the GEMM. Token-wise output
    gradients have many: the right padding of sequences that a causal or masked model
    never reads back (a third of a GPT-2 batch's tokens), the tokens a classifier head does
    not pool. Finding them costs a pass over the rows, against ``d`` multiply-adds per
    element for the GEMM; a convolution's channels-first gradients (a location is rarely
    zero in every channel) would pay a strided pass for nothing, and on a GPU the count
    would cost a host synchronisation.
    """
    if rows.device.type != "cpu" or not rows.is_contiguous():
        return rows
    nonzero = rows.ne(0).any(1)
    return rows if bool(nonzero.all()) else rows[nonzero]


class DiagCurvature:
    """Diagonal of the GGN (or Fisher) per layer, ``(d_out, d_in + bias)`` each (bias last)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.diagonals: list[Tensor] = []
        self.num_data = 0

    def update(self, statistics: Sequence[LayerStatistics], new_batch: bool = True) -> None:
        """Add one batch: the fused diagonal-GGN operator for Linear layers, per-sample gradients for Conv2d.

        ``new_batch=False``: a later part of the last batch's columns, as in :meth:`KronCurvature.update`.
        """
        batch = [self._layer_diagonal(s) for s in statistics]
        self.names, self.diagonals = _add_batch(self.names, self.diagonals, statistics, batch)
        self.num_data += statistics[0].inputs.shape[0] if new_batch else 0

    @staticmethod
    def _layer_diagonal(s: LayerStatistics) -> Tensor:
        if s.is_plain_linear:
            return ops.diag_ggn([s.inputs], [s.output_grads], [s.has_bias])[0]
        if isinstance(s.module, nn.Embedding):
            return _embedding_diagonal(s)
        # Weights shared across locations: square the summed gradient.
        squares = s.weight_gradients().to(accumulation_dtype(s.output_grads.dtype)).square().sum((0, 1))
        return squares.view(weight_shape(s.module)[0], -1)


def _embedding_diagonal(s: LayerStatistics) -> Tensor:
    """``(V, d)`` GGN diagonal of an embedding table: squared per-(sample, token) sums added into their rows."""
    _, tokens, sums = s.token_pairs(accumulation_dtype(s.output_grads.dtype))
    diagonal = sums.new_zeros(s.module.weight.shape)
    return diagonal.index_add_(0, tokens, sums.square().sum(1))


class EmbeddingCurvature:
    """K-FAC of embedding tables: ``A_l = diag(c_l)`` (token counts) and ``G_l = Σ_n Σ_k Σ_t g_nkt g_nktᵀ``.

    Every token is a sample (K-FAC "expand", whatever ``kfac_approx``: averaging one-hot
    inputs would make A a dense V × V matrix). With N data of L_l tokens each, layer l's
    block of the GGN (row-major ``(V, d)`` order, rows = tokens) is approximated by
    ``kron(diag(c_l), G_l) / (N L_l)``, as a Linear layer on sequences: exact for one datum
    of one token. ``c_l`` is kept as a ``(V,)`` vector, never a V × V matrix.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.counts: list[Tensor] = []
        self.output_factors: list[Tensor] = []
        self.locations: list[int] = []
        self.num_data = 0

    def update(self, statistics: Sequence[LayerStatistics], new_batch: bool = True) -> None:
        """Add one batch: token counts, and all layers' G in one call of the fused operator.

        Args:
            statistics: one entry per layer, the same layers in every batch.
            new_batch: False for a later part of the columns of the batch added last
                (:func:`~fastlaplace.curvature.statistics.layer_statistic_parts`): only its
                ``G`` is added, the token counts and the data count came with the first part.
        """
        if not self.names:
            self.names = [s.name for s in statistics]
            self.locations = [s.locations for s in statistics]
            for s in statistics:
                options = {"dtype": accumulation_dtype(s.output_grads.dtype), "device": s.output_grads.device}
                self.counts.append(torch.zeros(s.module.num_embeddings, **options))
                self.output_factors.append(torch.zeros(s.module.embedding_dim, s.module.embedding_dim, **options))
        _check_same_layers(self.names, statistics)
        if new_batch:
            for counts, s in zip(self.counts, statistics, strict=True):
                ids, kept = s.token_ids(), s.kept_tokens()
                ids = ids.flatten() if kept is None else ids[kept]
                counts.index_add_(0, ids, counts.new_ones(ids.shape))
        rows = [_as_rows(s.location_grads()) for s in statistics]
        ops.factor_accumulate_(self.output_factors, rows, [False] * len(rows))
        self.num_data += statistics[0].inputs.shape[0] if new_batch else 0


class UnitwiseCurvature:
    """Exact GGN blocks of each output unit's weights: norm layers' ``(γ_i, β_i)``, a grouped Conv2d's filters.

    Layer l gets ``(d, k, k)`` blocks ``H_li = Σ_n Σ_k w_nki w_nkiᵀ`` with ``w_nki`` the
    per-sample gradient of column k w.r.t. unit i's weights: ``[Σ_t g_nkti x̂_nti, Σ_t g_nkti]``
    for a norm layer (x̂ the normalised input, t over locations; k = 2, or 1 without a
    trainable bias), output channel i's filter (and bias) for a grouped convolution. The GGN
    restricted to each unit, exact for any data.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.blocks: list[Tensor] = []
        self.num_data = 0

    def update(self, statistics: Sequence[LayerStatistics], new_batch: bool = True) -> None:
        """Add one batch from the per-sample gradients (``(N, K, d, k)`` per layer).

        ``new_batch=False``: a later part of the last batch's columns, as in :meth:`KronCurvature.update`.
        """
        batch = []
        for s in statistics:
            grads = s.weight_gradients().to(accumulation_dtype(s.output_grads.dtype))
            batch.append(_feature_gram(grads.flatten(0, 1).unflatten(1, (s.module.weight.shape[0], -1))))
        self.names, self.blocks = _add_batch(self.names, self.blocks, statistics, batch)
        self.num_data += statistics[0].inputs.shape[0] if new_batch else 0


def _feature_gram(grads: Tensor) -> Tensor:
    """``(d, k, k)`` ``Σ_m w_mia w_mib`` per feature i of ``(M, d, k)`` per-sample gradients w.

    For the norm layers' k <= 2, products of the gradients' columns summed over the leading
    dimension: a batched GEMM over i would first transpose all ``M d k`` values (5x slower
    for a LayerNorm(256) with 9 columns of 512 samples). A grouped convolution's k (10 for a
    3 x 3 depthwise filter with a bias) takes the batched GEMM.
    """
    if grads.shape[-1] > 2:
        per_feature = grads.transpose(0, 1)  # (d, M, k)
        return per_feature.mT @ per_feature
    pairs = range(grads.shape[-1])
    return torch.stack([torch.stack([(grads[..., a] * grads[..., b]).sum(0) for b in pairs], -1) for a in pairs], -2)


def _add_batch(
    names: list[str], totals: list[Tensor], statistics: Sequence[LayerStatistics], batch: list[Tensor]
) -> tuple[list[str], list[Tensor]]:
    """The layer names and running sums after one more batch: the first batch's own, later ones added in place."""
    if not names:
        return [s.name for s in statistics], batch
    _check_same_layers(names, statistics)
    for total, part in zip(totals, batch, strict=True):
        total.add_(part)
    return names, totals


def _check_same_layers(names: list[str], statistics: Sequence[LayerStatistics]) -> None:
    """Raise if a batch's layers are not those of the first batch."""
    if [s.name for s in statistics] != names:
        raise ValueError(f"layers {[s.name for s in statistics]} differ from the first batch's {names}")
