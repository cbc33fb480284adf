"""Function-space Laplace: the linearised network as a Gaussian process on a subset of the data.

The GLM predictive of a Laplace posterior with the exact GGN is the posterior of a GP whose
kernel is the network's tangent kernel ``K(x, x') = J(x) Δ⁻¹ J(x')ᵀ`` (Δ the prior
precision) and whose likelihood Hessian at the fitted outputs is Λ (Immer et al., 2021).
Restricting the data to M points (subset of data) gives an M C × M C problem whatever the
number of weights. The kernel of every supported layer comes from its inputs and output
Jacobians: for a Linear layer ``J_l(x) J_l(x')ᵀ = (a_l(x) · a_l(x')) B_l(x) B_l(x')ᵀ``
(:func:`~fastlaplace.curvature.products.jacobian_gram`), so no ``C × #params`` Jacobian is
formed for Linear layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from fastlaplace import distributed
from fastlaplace.curvature import LayerStatistics, output_gradient_columns, output_jacobians
from fastlaplace.curvature.products import jacobian_gram, jacobian_matmul
from fastlaplace.posterior.base import BaseLaplace

#: how the per-point likelihood Hessian Λ_n (C × C) of a classifier enters the GP
LIKELIHOOD_HESSIANS = ("block", "diagonal")
#: the most entries of one ``(n, C, M, C)`` cross-kernel chunk
_CHUNK_ENTRIES = 2**24


def _slice_batch(x: Tensor | Mapping, n: int, size: int) -> Tensor | Mapping:
    """The first ``n`` rows of a batch of ``size`` rows (every tensor of a dict batch with that many rows)."""
    if isinstance(x, Mapping):
        return {k: v[:n] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v for k, v in x.items()}
    return x[:n]


def _cat_statistics(parts: list[list[LayerStatistics]]) -> list[LayerStatistics]:
    """Per layer, the statistics of several batches stacked along the samples."""
    return [
        LayerStatistics(
            per_batch[0].name,
            per_batch[0].module,
            torch.cat([s.inputs for s in per_batch]),
            torch.cat([s.output_grads for s in per_batch]),
        )
        for per_batch in zip(*parts, strict=True)
    ]


def _rows(statistics: list[LayerStatistics], start: int, stop: int) -> list[LayerStatistics]:
    return [LayerStatistics(s.name, s.module, s.inputs[start:stop], s.output_grads[start:stop]) for s in statistics]


class FunctionalLaplace(BaseLaplace):
    """The GP (function-space) form of the GLM Laplace posterior, laplace-torch's ``hessian_structure="gp"``.

    With the kernel ``K = (M / N) J Δ⁻¹ Jᵀ`` over the M subset points (Δ the prior
    precision, one per layer; the ``M / N`` factor is laplace-torch's subset-of-data
    scaling, 1 when the subset is all data) and ``Λ`` the block-diagonal Hessian of the
    negative log-likelihood in f at the fitted outputs, tempered as ``Λ / (σ² T)``
    (``diag(p) − ppᵀ`` for classification, ``I / σ²`` for regression), the predictive
    covariance of f at test points is ``K_** − K_*M Λ^½ (I + Λ^½ K_MM Λ^½)⁻¹ Λ^½ K_M*``,
    computed with one Cholesky factor. ``Λ^½`` is any root ``Λ = R Rᵀ`` (the formula holds
    with ``R`` and ``Rᵀ`` in its place): for classification fastlaplace's exact GGN columns,
    the ``C × (C − 1)`` root of :func:`~fastlaplace.curvature.output_gradient_columns`,
    which needs no eigendecomposition of the rank C − 1 block. When the subset is the whole
    training set this is exactly the GLM covariance ``J (GGN + Δ)⁻¹ Jᵀ`` of the full
    Laplace posterior (Woodbury).

    The log marginal likelihood is
    ``log p(y_M | f(θ*)) − ½ log det(I + Λ^½ K_MM Λ^½) − ½ μᵀ (K_MM + εI)⁻¹ μ`` with
    ``μ = J (θ* − μ_0)`` and ``ε = 1e-5`` (laplace-torch's jitter). By the matrix
    determinant lemma the log-determinant equals ``log det P − log det Δ`` of the full
    Laplace posterior when the subset is all data, and at a MAP θ* of the same prior the
    scatter equals ``(θ* − μ_0)ᵀ Δ (θ* − μ_0)`` up to O(ε) (there θ* − μ_0 = −Δ⁻¹ Jᵀ ∇_f
    loss lies in the kernel's row space): the evidence is then the full Laplace one. Away
    from such a MAP the scatter terms differ (the function-space one is the smaller).

    Differences from laplace-torch's FunctionalLaplace (each deliberate):

    - ``likelihood_hessian="block"`` (the default) keeps each point's C × C block of Λ, the
      exact GGN; ``"diagonal"`` keeps its diagonal only, laplace-torch's choice for
      classification. Regression and ``independent_outputs`` are the same either way.
    - Regression evidence uses the same formula as classification; laplace-torch's
      regression evidence uses ``log det(K + σ² I)`` and the residual ``y − f − J(μ_0 − θ*)``
      as scatter on top of the log-likelihood, which counts the data twice.
    - The log-likelihood is that of the M subset points (laplace-torch normalises a
      regression's subset loss with N points).
    - The prior precision may be one per layer (laplace-torch: a scalar).

    Args:
        model: the trained network; its output must be ``(N, C)``.
        likelihood: ``"classification"`` or ``"regression"``.
        n_subset: M, the number of training points of the GP (subset of data).
        independent_outputs: one kernel per output, ``J_c Δ⁻¹ J_cᵀ`` (C problems of size M
            with the diagonal of Λ), as laplace-torch's.
        seed: how :meth:`fit` draws the subset from a ``torch.utils.data.DataLoader`` over
            a sized dataset: M distinct indices drawn with ``torch.randperm`` from a
            generator seeded with ``seed``. ``None``, or a loader that is any other
            iterable of batches: the first M points the loader yields (shuffle it for a
            random subset).
        likelihood_hessian: ``"block"`` or ``"diagonal"`` (see above).
        **kwargs: :class:`BaseLaplace`'s options (``sigma_noise``, ``prior_precision``,
            ``prior_mean``, ``temperature``, ``last_layer_only``, ``enable_backprop``, ...).
            ``curvature_mode`` must be ``"ggn"`` and ``curvature_dtype`` None: the GP uses
            the exact Λ.

    Memory: the subset's layer inputs and output Jacobians, and one ``(M C)²`` kernel per
    layer (``C M²`` with ``independent_outputs``), kept so that the evidence is
    differentiable in a per-layer prior precision without recomputing kernels.
    """

    #: ``"gp"`` is laplace-torch's name of the GLM predictive here; there are no weights to sample (``"nn"``)
    pred_types = ("glm", "gp")
    #: jitter ε of the scatter term's kernel, laplace-torch's value
    scatter_jitter = 1e-5

    def __init__(
        self,
        model: torch.nn.Module,
        likelihood: str,
        n_subset: int,
        independent_outputs: bool = False,
        seed: int | None = 0,
        likelihood_hessian: str = "block",
        **kwargs,
    ) -> None:
        if isinstance(n_subset, bool) or not isinstance(n_subset, int) or n_subset <= 0:
            raise ValueError(f"n_subset must be a positive integer, got {n_subset!r}")
        if likelihood_hessian not in LIKELIHOOD_HESSIANS:
            raise ValueError(f"likelihood_hessian must be one of {LIKELIHOOD_HESSIANS}, got {likelihood_hessian!r}")
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"hessian_structure='gp' supports 'classification' and 'regression', not {likelihood!r}")
        if kwargs.get("curvature_mode", "ggn") != "ggn":
            raise ValueError("hessian_structure='gp' uses the exact likelihood Hessian: curvature_mode must be 'ggn'")
        if kwargs.get("curvature_dtype") is not None:
            raise ValueError("hessian_structure='gp' does not take a curvature_dtype")
        self.n_subset = n_subset
        self.independent_outputs = bool(independent_outputs)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self.likelihood_hessian = likelihood_hessian
        super().__init__(model, likelihood, **kwargs)

    # ------------------------------------------------------------------ fitting

    def _reset_curvature(self) -> None:
        self._subset: list[LayerStatistics] | None = None  # the M points' layer inputs and output Jacobians
        self._kernels: Tensor | None = None  # (L, G, m, m) per-layer kernels J_l J_lᵀ (prior 1, no M/N)
        self._root: Tensor | None = None  # R, Λ = R Rᵀ untempered: (M, C, C) blocks, or (C, M) per output
        self._offset: Tensor | None = None  # (M, C) μ = J (θ* − μ_0)
        self._batches: list[tuple[list[LayerStatistics], Tensor, Tensor]] = []
        self.num_total = 0
        self._cholesky: tuple | None = None

    def _subset_batches(self, loader: Iterable) -> Iterator:
        """The batches of the M subset points; sets ``num_total`` (N) when known up front."""
        dataset = getattr(loader, "dataset", None)
        sized = (
            isinstance(loader, torch.utils.data.DataLoader)
            and hasattr(dataset, "__len__")
            and not isinstance(dataset, torch.utils.data.IterableDataset)
        )
        if sized:
            self.num_total = len(dataset)
            if self.n_subset > self.num_total:
                raise ValueError(f"n_subset={self.n_subset} exceeds the {self.num_total} points of the dataset")
        if sized and self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(self.num_total, generator=generator)[: self.n_subset].tolist()
            yield from torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, indices),
                batch_size=loader.batch_size or 64,
                collate_fn=loader.collate_fn,
            )
            return
        taken, total = 0, 0
        for batch in loader:
            x, y = self._split_batch(batch)
            size = self._batch_size(x)
            self._check_targets(y, size)  # every batch's, also those past the subset
            total += size
            if taken < self.n_subset:
                keep = min(size, self.n_subset - taken)
                taken += keep
                if isinstance(batch, Mapping):
                    yield _slice_batch(batch, keep, size)
                else:
                    yield tuple(_slice_batch(part, keep, size) for part in batch)
                if keep < size:  # the labels left out, against the class count the kept part gave
                    self._check_targets(y, size)
            elif sized:
                break
        if not sized:
            self.num_total = total
        if taken < self.n_subset:
            raise ValueError(f"n_subset={self.n_subset} exceeds the {taken} points the loader yielded")

    def fit(self, loader: Iterable, override: bool = True, progress_bar: bool | None = None) -> None:
        """Compute the GP on M points of a loader of ``(x, y)`` batches (or dict batches).

        The subset: see ``seed``. N (the ``M / N`` prior factor) is ``len(loader.dataset)``
        for a DataLoader over a sized dataset, otherwise the points the loader yields (it is
        then read to the end). The kernels are computed once here; changing the prior
        precision, σ or T afterwards only refactors an ``M C × M C`` matrix.

        Args:
            loader: iterable of ``(x, y)`` pairs or dicts.
            override: must be True (a GP is fitted afresh).
            progress_bar: unused (kept for the common signature).
        """
        del progress_bar
        if not override:
            raise ValueError("a function-space posterior is fitted afresh: override=False is not supported")
        if distributed.is_distributed():
            raise ValueError("hessian_structure='gp' is not supported under torch.distributed (one subset per process)")
        with self._unchanged_on_failure():
            self._reset_curvature()
            self.loss, self.num_data, self._fitted = 0.0, 0, False
            for batch in self._subset_batches(loader):
                x, y = self._split_batch(batch)
                self._check_targets(y, self._batch_size(x))
                output, stats = output_jacobians(self.model, x, self.layers, output_layer=self.last_layer_only)
                if not bool(torch.isfinite(output).all()):
                    raise ValueError("the model's output contains NaN or Inf")
                self._check_outputs(output, y)
                self.loss += float(self._summed_loss(output, y))
                self.num_data += y.shape[0]
                self.num_outputs = output.shape[1]
                self._update_curvature((output, stats))
            self._mean = self._current_weights()
            self._finish_fit()
            self._fitted = True

    def _update_curvature(self, stats, new_batch: bool = True) -> None:
        """Keep one batch's layer statistics, a root R of Λ (``Λ_n = R_n R_nᵀ``) and μ = J (θ* − μ_0)."""
        output, layer_stats = stats
        n, c = output.shape
        if self._likelihood(True) == "classification":
            if self.likelihood_hessian == "block" and not self.independent_outputs:
                # diag(p) − ppᵀ = R Rᵀ with R the (C, C − 1) GGN columns: no eigendecomposition;
                # a zero column makes R square, as the solver's layout wants (it adds 1s to I + RᵀKR)
                root = output_gradient_columns(output, None, "classification", "ggn")
                root = torch.nn.functional.pad(root, (0, c - root.shape[-1]))
            else:
                p = output.softmax(-1)
                root = torch.diag_embed((p * (1 - p)).sqrt())
        elif self.noise_per_output:
            root = torch.diag(self.sigma_noise.reciprocal()).expand(n, c, c)
        else:
            root = torch.eye(c, dtype=output.dtype, device=output.device).expand(n, c, c)
        deviations = [(w - self.prior_mean).unsqueeze(0) for w in self._current_weights()]
        offset = jacobian_matmul(layer_stats, deviations).squeeze(-1)  # (n, C)
        self._batches.append((layer_stats, root, offset.to(output.dtype)))

    def _finish_fit(self) -> None:
        """Stack the batches and compute every layer's kernel over the subset."""
        self._subset = _cat_statistics([b[0] for b in self._batches])
        self._root = torch.cat([b[1] for b in self._batches])
        self._offset = torch.cat([b[2] for b in self._batches])
        self._batches = []
        if self.independent_outputs:
            self._root = self._root.diagonal(dim1=1, dim2=2).T.contiguous()  # (C, M)
        self._kernels = torch.stack([self._layer_kernel(s) for s in self._subset])

    def _layer_kernel(self, layer: LayerStatistics) -> Tensor:
        """``(G, m, m)``: one layer's ``J_l J_lᵀ`` over the subset, in the solver's layout."""
        m, c = self.num_data, self.num_outputs
        one = torch.ones((), dtype=self.dtype, device=self.device)
        step = max(1, _CHUNK_ENTRIES // (c * m * c))
        rows = [
            jacobian_gram(_rows([layer], i, i + step), [one], others=[layer]) for i in range(0, m, step)
        ]  # (n, C, M, C) each
        kernel = torch.cat(rows)
        if self.independent_outputs:
            kernel = kernel.diagonal(dim1=1, dim2=3).permute(2, 0, 1)  # (C, M, M)
        else:
            kernel = kernel.reshape(1, m * c, m * c)
        return 0.5 * (kernel + kernel.mT)

    # ------------------------------------------------------------------ the GP's linear algebra

    def _kernel_weights(self, prior_precision: Tensor) -> Tensor:
        """``(L,)`` the prior variance of each layer's kernel: ``(M / N) / δ_l``."""
        deltas = torch.stack(self._prior_per_layer(torch.as_tensor(prior_precision, dtype=self.dtype)))
        if not torch.compiler.is_compiling() and not bool((deltas.detach() > 0).all()):
            raise ValueError(f"the GP kernel needs a positive prior precision, got {deltas.detach().tolist()}")
        return (self.num_data / self.num_total) / deltas

    def kernel(self, prior_precision: Tensor | None = None) -> Tensor:
        """The subset's prior kernel ``K_MM``: ``(1, M C, M C)`` sample-major, or ``(C, M, M)`` per output."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else self._checked_prior(prior_precision)
        return torch.einsum("l,lgij->gij", self._kernel_weights(delta), self._kernels)

    def _apply_root(self, matrix: Tensor) -> Tensor:
        """``Rᵀ X`` for ``X`` of shape ``(G, m, k)``, with ``Λ = R Rᵀ`` untempered (R block diagonal)."""
        if self.independent_outputs:
            return self._root.unsqueeze(-1) * matrix
        m, c = self._root.shape[:2]
        rows = matrix.reshape(m, c, -1)
        return torch.einsum("mab,mak->mbk", self._root, rows).reshape(matrix.shape)

    def _scaled_kernel(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """``I + Rᵀ K_MM R / (σ² T)``, ``(G, m, m)``."""
        kernel = self.kernel(prior_precision)
        inner = self._apply_root(self._apply_root(kernel).mT).mT
        eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
        return eye + self._curvature_scale(sigma_noise) * inner

    def _factor(self) -> Tensor:
        """Cholesky factor of ``I + Rᵀ K_MM R / (σ² T)`` at the current prior, noise and temperature (cached)."""
        key = (
            tuple(self.prior_precision.tolist()),
            tuple(self.sigma_noise.flatten().tolist()),
            self.temperature,
            self.num_data,
        )
        if self._cholesky is None or self._cholesky[0] != key:
            factor = torch.linalg.cholesky(self._scaled_kernel(self.prior_precision, self.sigma_noise))
            self._cholesky = (key, factor)
        return self._cholesky[1]

    def log_det_ratio(self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None) -> Tensor:
        """``log det(I + Λ^½ K_MM Λ^½)`` (Λ tempered), differentiable in δ and σ."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else self._checked_prior(prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        factor = torch.linalg.cholesky(self._scaled_kernel(delta, sigma))
        return 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum()

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """``log det Δ + log det(I + Λ^½ K Λ^½)``: ``log det P`` of the full posterior when the subset is all data."""
        return self.log_det_prior(prior_precision) + self.log_det_ratio(prior_precision, sigma_noise)

    def scatter(self, prior_precision: Tensor) -> Tensor:
        """``μᵀ (K_MM + εI)⁻¹ μ`` with ``μ = J (θ* − μ_0)`` on the subset (ε: :attr:`scatter_jitter`).

        The jitter grows tenfold (up to 10⁶ ε) while ``K_MM + εI`` is not numerically
        positive definite (a kernel of rank below M C in low precision).
        """
        self._require_fit()
        kernel = self.kernel(prior_precision)
        offset = self._offset.T.unsqueeze(-1) if self.independent_outputs else self._offset.reshape(1, -1, 1)
        eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
        jitter = self.scatter_jitter
        for _ in range(7):
            factor, info = torch.linalg.cholesky_ex(kernel + jitter * eye)
            if not bool((info != 0).any()):
                break
            jitter *= 10
        else:
            raise ValueError("the subset's kernel is not positive definite even with a jitter of 10 (NaN weights?)")
        half = torch.linalg.solve_triangular(factor, offset.to(kernel.dtype), upper=False)
        return half.square().sum()

    def _evidence(self, delta: Tensor, sigma: Tensor) -> Tensor:
        """GP Laplace evidence ``log p(y_M | f(θ*)) − ½ (log det(I + Λ^½ K Λ^½) + μᵀ (K + εI)⁻¹ μ)``.

        What :meth:`log_marginal_likelihood` returns for a scalar or ``(L,)`` prior precision
        (one per layer) and σ, differentiable in both.
        """
        return self.log_likelihood(sigma) - 0.5 * (self.log_det_ratio(delta, sigma) + self.scatter(delta))

    # ------------------------------------------------------------------ predictive

    def _posterior_reduction(self, stats: list[LayerStatistics]) -> Tensor:
        """``(G, m, k)``: ``L⁻¹ Rᵀ K_M* / (σ √T)`` for the test samples of ``stats`` (k = N C, or N per output)."""
        weights = list(self._kernel_weights(self.prior_precision).unbind())
        cross = jacobian_gram(stats, weights, others=self._subset)  # (N, C, M, C)
        if self.independent_outputs:
            cross_t = cross.diagonal(dim1=1, dim2=3).permute(2, 1, 0)  # (C, M, N)
        else:
            cross_t = cross.flatten(2).flatten(0, 1).T.unsqueeze(0)  # (1, M C, N C)
        scale = self._curvature_scale(self.sigma_noise).sqrt()
        return torch.linalg.solve_triangular(self._factor(), scale * self._apply_root(cross_t), upper=False)

    def _jacobian_covariance(self, stats) -> Tensor:
        weights = list(self._kernel_weights(self.prior_precision).unbind())
        prior = jacobian_gram(stats, weights)  # (N, C, C)
        n, c = prior.shape[:2]
        step = max(1, _CHUNK_ENTRIES // (c * self.num_data * c))
        reductions = []
        for i in range(0, n, step):
            half = self._posterior_reduction(_rows(stats, i, i + step))
            if self.independent_outputs:
                reductions.append(torch.diag_embed(half.square().sum(1).T))  # (n, C, C)
            else:
                half = half[0].unflatten(1, (-1, c))  # (M C, n, C)
                reductions.append(torch.einsum("knc,knd->ncd", half, half))
        if self.independent_outputs:
            prior = torch.diag_embed(prior.diagonal(dim1=1, dim2=2))
        return prior - torch.cat(reductions)

    def _jacobian_cross_covariance(self, stats) -> Tensor:
        weights = list(self._kernel_weights(self.prior_precision).unbind())
        prior = jacobian_gram(stats, weights, joint=True)  # (N, C, N, C)
        half = self._posterior_reduction(stats)
        n, c = prior.shape[:2]
        if self.independent_outputs:
            reduction = torch.einsum("cmn,cmk->nkc", half, half)  # (N, N, C)
            mask = torch.eye(c, dtype=prior.dtype, device=prior.device)
            prior = prior * mask[None, :, None, :]
            return prior - torch.diag_embed(reduction).permute(0, 2, 1, 3)
        return prior - (half[0].T @ half[0]).view(n, c, n, c)

    # ------------------------------------------------------------------ saving

    def _curvature_tensors(self) -> list[Tensor]:
        config = torch.tensor(
            [self.num_total, self.independent_outputs, self.likelihood_hessian == "block"], device=self.device
        )
        layers = [t for s in self._subset for t in (s.inputs, s.output_grads)]
        return [config, self._root, self._offset, self._kernels, *layers]

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        config = tensors[0].tolist()
        expected = [config[0], self.independent_outputs, self.likelihood_hessian == "block"]
        if [bool(v) for v in config[1:]] != expected[1:]:
            raise ValueError(
                f"the state was saved with independent_outputs={bool(config[1])}, "
                f"likelihood_hessian={'block' if config[2] else 'diagonal'}; this posterior has "
                f"independent_outputs={self.independent_outputs}, likelihood_hessian={self.likelihood_hessian!r}"
            )
        if num_data != self.n_subset:
            raise ValueError(f"the state was saved with n_subset={num_data}, this posterior has {self.n_subset}")
        self.num_total = int(config[0])
        self._root, self._offset, self._kernels = tensors[1], tensors[2], tensors[3]
        inputs, grads = tensors[4::2], tensors[5::2]
        self._subset = [
            LayerStatistics(name, module, a, g) for (name, module), a, g in zip(self.layers, inputs, grads, strict=True)
        ]
