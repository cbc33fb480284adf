"""Kronecker-factored (K-FAC) Laplace posterior."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastlaplace import ops
from fastlaplace.curvature.accumulate import EmbeddingCurvature, KronCurvature, UnitwiseCurvature
from fastlaplace.curvature.big_factors import SketchedFactor, restored_factor, stored_factor
from fastlaplace.curvature.closed_form import layer_forward, softmax_statistics
from fastlaplace.curvature.eigen import factor_eigh
from fastlaplace.curvature.layout import weight_shape
from fastlaplace.curvature.memory import check_allocation
from fastlaplace.curvature.statistics import has_kron_factors, has_unitwise_blocks, trainable_bias
from fastlaplace.posterior import blocks, truncated_kron
from fastlaplace.posterior.parametric import ParametricLaplace
from fastlaplace.posterior.shared_weights import shared_weight_covariance
from fastlaplace.posterior.truncated_kron import damped_inverse as _damped_inverse
from fastlaplace.reference import accumulation_dtype, damped_eigenvalues

Spectrum = tuple[list[Tensor], list[Tensor], Tensor, Tensor]
#: Inputs per chunk of the GLM predictive (:meth:`KronLaplace.functional_variance`).
PREDICTIVE_CHUNK = 8


class KronLaplace(ParametricLaplace):
    """``P_l = kron(G_l, A_l) / (N L_l σ² T) + δ_l I`` per layer, used exactly in its eigenbasis.

    ``kfac_approx`` (``"expand"`` or ``"reduce"``) says how layers applied at several
    locations (Conv2d, Linear on sequences) are factored; see :class:`KronCurvature`.

    The layers without a weight applied to input vectors get blocks of their own
    (ASDL-style), all used by the evidence, both GLM predictives, the samples and the
    state_dict:

    - Embedding (table ``(V, d)``, rows = tokens): K-FAC with ``A_l = diag(c_l)`` (token
      counts) and ``G_l`` (see :class:`EmbeddingCurvature`): ``P_l = kron(diag(c_l), G_l) /
      (N L_l σ² T) + δ_l``, eigenbasis ``I ⊗ Q_G``; every token is a sample whatever
      ``kfac_approx``. Exact for one datum of one token.
    - LayerNorm, RMSNorm, BatchNorm1d/2d, GroupNorm: the exact unit-wise blocks ``P_li = H_li / (σ² T) + δ_l I``
      of each feature's ``(γ_i, β_i)`` (``(2, 2)``, or ``(1, 1)`` without a bias; see
      :class:`UnitwiseCurvature`), inverted and factored in closed form.

    With ``damping=True`` (laplace-torch's option, asked for by name) the prior is added to
    each factor instead: ``P_l = (√s G_l + √δ_l I) ⊗ (√s A_l + √δ_l I)``, s the factor
    scale (an Embedding's ``A_l = diag(c_l)`` included). It is used consistently by the
    evidence, the predictive and the samples. The unit-wise blocks have no factors to damp:
    they keep ``s H_li + δ_l I`` with either setting.

    Big factors (LM heads): a Kronecker factor of side above ``max_dense_factor`` is never
    formed; it is sketched during the fit and kept as its top ``factor_rank`` eigenpairs,
    the rest of its spectrum taken as zero (P is δ on the complement; see
    :mod:`~fastlaplace.posterior.truncated_kron`), by the evidence, the last layer's GLM
    predictive, the samples and the state_dict. The last layer of a softmax classifier
    (``last_layer_only``, exact GGN) gets its output factor in closed form from the
    probabilities, never from ``(N, C, C − 1)`` Hessian-root columns.
    """

    variances_without_covariance = True

    supports_prior_per_parameter = False  # δ must be constant within a layer's eigenbasis

    def __init__(
        self,
        *args,
        kfac_approx: str = "expand",
        damping: bool = False,
        max_dense_factor: int = 8192,
        factor_rank: int = 256,
        **kwargs,
    ) -> None:
        self.kfac_approx = kfac_approx
        self.damping = bool(damping)
        self.max_dense_factor, self.factor_rank = max_dense_factor, factor_rank
        super().__init__(*args, **kwargs)
        modules = [m for _, m in self.layers]
        self._kron = [i for i, m in enumerate(modules) if has_kron_factors(m)]
        self._embedding = [i for i, m in enumerate(modules) if isinstance(m, nn.Embedding)]
        self._unitwise = [i for i, m in enumerate(modules) if has_unitwise_blocks(m)]
        for i in self._unitwise:  # a grouped Conv2d's blocks grow with its group's width
            name, module = self.layers[i]
            width = weight_shape(module)[1] + (trainable_bias(module) is not None)
            check_allocation(
                f"layer {name!r}'s unit-wise curvature blocks", (module.weight.shape[0], width, width),
                accumulation_dtype(module.weight.dtype), "use hessian_structure='diag' (or freeze the layer)",
            )  # fmt: skip

    def _reset_curvature(self) -> None:
        self.curvature = KronCurvature(
            self.kfac_approx,
            low_precision_products=self.curvature_dtype is not None,
            max_dense_factor=self.max_dense_factor,
            factor_rank=self.factor_rank,
        )
        self.embedding_curvature = EmbeddingCurvature()
        self.unitwise_curvature = UnitwiseCurvature()
        self._eigen = None

    def _update_curvature(self, stats, new_batch: bool = True) -> None:
        for curvature, layers in (
            (self.curvature, self._kron),
            (self.embedding_curvature, self._embedding),
            (self.unitwise_curvature, self._unitwise),
        ):
            if layers:
                curvature.update([stats[i] for i in layers], new_batch=new_batch)
        self._eigen = None

    def _softmax_closed_form(self, x):
        """A softmax last layer's batch for the closed-form output factor (see ``softmax_statistics``), or None."""
        if self.last_layer_only and self._likelihood(True) == "classification" and self.curvature_mode == "ggn":
            return softmax_statistics(self.model, x, *self.layers[0])
        return None

    def _batch_statistics(self, x, y, generator):
        closed_form = self._softmax_closed_form(x)
        return super()._batch_statistics(x, y, generator) if closed_form is None else closed_form

    def _batch_statistic_parts(self, x, y, generator):
        closed_form = self._softmax_closed_form(x)
        if closed_form is None:
            return super()._batch_statistic_parts(x, y, generator)
        output, stats = closed_form
        return output, iter([stats])

    def eigendecomposition(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(Q_A, λ_A, Q_G, λ_G)`` per Kronecker-factored layer, computed once per fit (one batched call).

        A sketched factor gives its top ``k`` eigenpairs: ``Q`` ``(d, k)``, λ ``(k,)``.
        """
        return self._eigenpairs()[0]

    def embedding_eigendecomposition(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(Q_G, μ)`` of each Embedding's ``G`` (its ``A = diag(c)`` needs none); same batched call."""
        return self._eigenpairs()[1]

    def _eigenpairs(self):
        self._require_fit()
        if self._eigen is None:
            factors = [
                *self.curvature.input_factors,
                *self.curvature.output_factors,
                *self.embedding_curvature.output_factors,
            ]
            dense = [f for f in factors if not isinstance(f, SketchedFactor)]
            values, vectors = factor_eigh(dense) if dense else ([], [])
            values, vectors = self._with_truncated_factors(factors, values, vectors)
            count = len(self._kron)
            kron = (vectors[:count], values[:count], vectors[count : 2 * count], values[count : 2 * count])
            self._eigen = (kron, (vectors[2 * count :], values[2 * count :]))
        return self._eigen

    def _with_truncated_factors(
        self, factors: list, values: list[Tensor], vectors: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The dense factors' eigenpairs with the sketched factors' top ones put in their places."""
        sketched = [i for i, f in enumerate(factors) if isinstance(f, SketchedFactor)]
        if not sketched:
            return values, vectors
        if self.damping:
            raise ValueError(
                "damping=True is not available with truncated factors (a side above max_dense_factor="
                f"{self.max_dense_factor}); use damping=False or raise max_dense_factor"
            )
        values, vectors = list(values), list(vectors)
        for i in sketched:
            value, vector = factors[i].eigenpairs(self.factor_rank, accumulation_dtype(self.dtype))
            values.insert(i, value)
            vectors.insert(i, vector)
        return values, vectors

    def _truncated(self, index: int) -> bool:
        """Whether Kron layer ``index`` (position in ``_kron``) has a sketched factor."""
        factors = (self.curvature.input_factors[index], self.curvature.output_factors[index])
        return any(isinstance(f, SketchedFactor) for f in factors)

    def _scale(self, sigma_noise: Tensor) -> Tensor:
        """``(L_kron,)`` factor scales ``1 / (σ² T N L_l)`` of the Kronecker-factored layers."""
        return self._factor_scale(self.curvature, sigma_noise)

    def _factor_scale(self, curvature: KronCurvature | EmbeddingCurvature, sigma_noise: Tensor) -> Tensor:
        locations = torch.tensor(curvature.locations, dtype=self.dtype, device=self.device)
        return self._curvature_scale(sigma_noise) / (curvature.num_data * locations)

    def _damped(self, la: list[Tensor], lg: list[Tensor], scale: Tensor, delta: Tensor) -> Spectrum:
        """``(λ_A, λ_G, s, δ)`` such that the eigenvalues of P_l are ``s λ_i μ_j + δ``.

        Damped factors become ``√s λ + √δ`` with ``s = 1, δ = 0``, so that the operators serve both forms.
        """
        if not self.damping:
            return la, lg, scale, delta
        root_s, root_delta = scale.sqrt(), delta.sqrt()
        la = [r * v.clamp_min(0) + d for r, d, v in zip(root_s, root_delta, la, strict=True)]
        lg = [r * v.clamp_min(0) + d for r, d, v in zip(root_s, root_delta, lg, strict=True)]
        return la, lg, torch.ones_like(scale), torch.zeros_like(delta)

    def _spectrum(self, prior_precision: Tensor, sigma_noise: Tensor) -> Spectrum:
        """``(λ_A, λ_G, s, δ)`` per Kron layer (see :meth:`_damped`)."""
        _, la, _, lg = self.eigendecomposition()
        return self._damped(la, lg, self._scale(sigma_noise), prior_precision[self._kron])

    def _factored(self, index: int) -> bool:
        """Whether Kron layer ``index``'s eigenvalues are the products ``s λ_i μ_j + δ`` of :meth:`_spectrum`.

        Those layers go through the fused operators (``kron_logdet``, ``kron_solve``,
        ``kron_predictive_variance``); the others (EKFAC's) through :meth:`_eigenvalues`.
        """
        return True

    def _eigenvalues(
        self, prior_precision: Tensor, sigma_noise: Tensor, layers: Sequence[int] | None = None
    ) -> list[Tensor]:
        """``(k_G, k_A)`` per Kron layer (of ``layers``, positions in ``_kron``; all by default): P_l's eigenvalues.

        In the eigenbasis ``Q_G ⊗ Q_A``; here ``s μ_j λ_i + δ`` from :meth:`_spectrum` (damped
        or not): the one place a subclass swaps the spectrum
        (:class:`~fastlaplace.posterior.EKFACLaplace`). Differentiable in δ and σ.
        """
        la, lg, scale, delta = self._spectrum(prior_precision, sigma_noise)
        layers = range(len(la)) if layers is None else layers
        return [damped_eigenvalues(la[i], lg[i], scale[i], delta[i]) for i in layers]

    def _inverse_eigenvalues(self, layers: Sequence[int] | None = None) -> list[Tensor]:
        """The reciprocal :meth:`_eigenvalues` of the current posterior, ``(k_G, k_A)`` per layer of ``layers``."""
        return [e.reciprocal() for e in self._eigenvalues(self.prior_precision, self.sigma_noise, layers)]

    def _embedding_spectrum(self, prior_precision: Tensor, sigma_noise: Tensor) -> Spectrum:
        """``(c, μ, s, δ)`` per Embedding: the eigenvalues of P_l are ``s c_v μ_j + δ`` (see :meth:`_damped`)."""
        _, mu = self.embedding_eigendecomposition()
        scale = self._factor_scale(self.embedding_curvature, sigma_noise)
        return self._damped(self.embedding_curvature.counts, mu, scale, prior_precision[self._embedding])

    def _embedding_inverses(self) -> list[Tensor]:
        """``(V, d)`` per Embedding: ``1 / (s c_v μ_j + δ)``."""
        counts, mu, scale, delta = self._embedding_spectrum(self.prior_precision, self.sigma_noise)
        return [_damped_inverse(*spectrum).T for spectrum in zip(counts, mu, scale, delta, strict=True)]

    def _unitwise_precisions(self, prior_precision: Tensor, sigma_noise: Tensor) -> list[Tensor]:
        """``(d, k, k)`` per layer with unit-wise blocks: ``s H_li + δ_l I``."""
        if not self._unitwise:
            return []
        scale = self._curvature_scale(sigma_noise)
        return [
            scale * h + prior_precision[i] * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
            for i, h in zip(self._unitwise, self.unitwise_curvature.blocks, strict=True)
        ]

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """Σ_l Σ_ij log(s μ_j λ_i + δ_l) (+ the unit-wise blocks' log dets), differentiable in δ and σ."""
        total = sum(blocks.unitwise_logdet(p) for p in self._unitwise_precisions(prior_precision, sigma_noise))
        factored = [i for i in range(len(self._kron)) if self._factored(i)]
        others = [i for i in range(len(self._kron)) if i not in factored]
        total = total + sum(e.log().sum() for e in self._eigenvalues(prior_precision, sigma_noise, others))
        spectra = [
            self._embedding_spectrum(prior_precision, sigma_noise) if self._embedding else None,
        ]
        if factored:
            la, lg, scale, delta = self._spectrum(prior_precision, sigma_noise)
            spectra.append(([la[i] for i in factored], [lg[i] for i in factored], scale[factored], delta[factored]))
        for la, lg, scale, delta in (s for s in spectra if s is not None):
            if self.damping:  # a product of two factors: log det = d_G Σ log λ' + d_A Σ log μ'
                total = total + sum(
                    g.numel() * a.log().sum() + a.numel() * g.log().sum() for a, g in zip(la, lg, strict=True)
                )
            else:
                total = total + ops.kron_logdet(la, lg, scale, delta).sum()
        return total + self._complement_logdet(prior_precision)

    def _complement_logdet(self, prior_precision: Tensor) -> Tensor | int:
        """``Σ_l (d_G d_A − k_G k_A) log δ_l`` over the layers with truncated factors (P is δ there)."""
        truncated = [i for i in range(len(self._kron)) if self._truncated(i)]
        if not truncated:
            return 0
        qa, _, qg, _ = self.eigendecomposition()
        dims = [truncated_kron.complement_dimension(qa[i], qg[i]) for i in truncated]
        delta = prior_precision[[self._kron[i] for i in truncated]]
        return (torch.tensor(dims, dtype=delta.dtype, device=delta.device) * delta.log()).sum()

    def _special_covariance(self, stats, joint: bool):
        """The Embedding and unit-wise layers' share of ``J P⁻¹ Jᵀ`` (0 without such layers)."""
        total = 0
        if self._embedding:
            q_g, _ = self.embedding_eigendecomposition()
            for i, q, inverse in zip(self._embedding, q_g, self._embedding_inverses(), strict=True):
                total = total + blocks.embedding_jacobian_covariance(stats[i], q, inverse, joint)
        precisions = self._unitwise_precisions(self.prior_precision, self.sigma_noise)
        for i, p in zip(self._unitwise, precisions, strict=True):
            total = total + blocks.unitwise_jacobian_covariance(stats[i], blocks.unitwise_inverse(p), joint)
        return total

    def functional_variance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x; θ*), J P⁻¹ Jᵀ)``, ``(N, C)`` and ``(N, C, C)``, for :data:`PREDICTIVE_CHUNK` inputs at a time.

        The output Jacobians at every layer of a convnet take about ``C`` times its
        activations: chunks bound that memory (a dict batch goes whole).
        """
        return self._in_chunks(x, super().functional_variance)

    def _in_chunks(self, x: Tensor, moments) -> tuple[Tensor, Tensor]:
        """``moments(x)`` (mean and variances) over chunks of :data:`PREDICTIVE_CHUNK` inputs, concatenated."""
        if not isinstance(x, Tensor) or x.shape[0] <= PREDICTIVE_CHUNK:
            return moments(x)
        means, variances = zip(*(moments(part) for part in x.split(PREDICTIVE_CHUNK)), strict=True)
        return torch.cat(means), torch.cat(variances)

    def _variances(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C)`` mean and the diagonal of ``J P⁻¹ Jᵀ``, without its off-diagonal products."""
        self._require_fit()
        output, stats = self._output_jacobians(x)
        return output, self._jacobian_covariance(stats, diagonal=True)

    def _jacobian_covariance(self, stats, diagonal: bool = False) -> Tensor:
        """``(N, C, C)`` ``Σ_l J_l P_l⁻¹ J_lᵀ``, or its ``(N, C)`` diagonal alone with ``diagonal``."""
        total = self._special_covariance(stats, joint=False)
        if diagonal and isinstance(total, Tensor):
            total = total.diagonal(dim1=1, dim2=2)
        if not self._kron:
            return total
        qa, _, qg, _ = self.eigendecomposition()
        la, lg, scale, delta = self._spectrum(self.prior_precision, self.sigma_noise)
        kron_stats = [stats[i] for i in self._kron]
        truncated = [i for i in range(len(kron_stats)) if self._truncated(i)]
        fused = [i for i, s in enumerate(kron_stats) if s.is_plain_linear and self._factored(i) and i not in truncated]
        others = [i for i in range(len(kron_stats)) if i not in fused]
        inverses = dict(zip(others, self._inverse_eigenvalues(others), strict=True))
        # A last layer outside the fused operator (truncated, or eigenvalues that are not products): a closed form.
        closed_form = [i for i in others if i in truncated or (self.last_layer_only and kron_stats[i].is_plain_linear)]
        for i in closed_form:
            features = self._truncated_last_layer_features(kron_stats[i]).to(qa[i].dtype)
            if diagonal:
                total = total + truncated_kron.last_layer_variances(features, qa[i], qg[i], inverses[i], delta[i])
            else:
                total = total + truncated_kron.last_layer_covariance(features, qa[i], qg[i], inverses[i], delta[i])
        if fused:
            total = total + ops.kron_predictive_variance(
                [kron_stats[i].inputs for i in fused],
                # The last layer's output Jacobian is the identity: the operator's closed form.
                [None if self.last_layer_only else kron_stats[i].output_grads for i in fused],
                [qa[i] for i in fused],
                [la[i] for i in fused],
                [qg[i] for i in fused],
                [lg[i] for i in fused],
                scale[fused],
                delta[fused],
                [kron_stats[i].has_bias for i in fused],
                full_covariance=not diagonal,
            )
        for i in (i for i in others if i not in closed_form):
            s = kron_stats[i]
            if s.is_plain_linear:
                total = total + self._linear_covariance(s, qa[i], qg[i], inverses[i], diagonal)
            else:
                total = total + shared_weight_covariance(
                    s.location_grads(), s.patches(), qa[i], qg[i], inverses[i], diagonal
                )
        return total

    @staticmethod
    def _linear_covariance(s, qa: Tensor, qg: Tensor, inverse: Tensor, diagonal: bool = False) -> Tensor:
        """``(N, C, C)`` ``Σ_j w_nj (B Q_G)_{:,j} (B Q_G)_{:,j}ᵀ`` with ``w_nj = Σ_i (Q_Aᵀ a_n)_i² inverse_ji``.

        ``J P⁻¹ Jᵀ`` of a Linear layer applied once per sample, P⁻¹'s eigenvalues any
        ``(d_G, d_A)`` matrix: what ``kron_predictive_variance`` fuses for products. Its
        ``(N, C)`` diagonal alone with ``diagonal``.
        """
        inputs, grads = KronLaplace._rotated_linear(s, qa, qg)
        weights = inputs.square() @ inverse.T  # (N, d_G)
        if diagonal:
            return torch.einsum("ncj,nj,ncj->nc", grads, weights, grads)
        return torch.einsum("ncj,nj,ndj->ncd", grads, weights, grads)

    def _truncated_last_layer_features(self, s) -> Tensor:
        """``(N, d_A)`` a last layer's inputs (with the ones column), for the closed form; truncated layers are last."""
        if not (self.last_layer_only and s.is_plain_linear):
            raise ValueError(
                f"layer {s.name!r} has a truncated factor (a side above max_dense_factor={self.max_dense_factor}): "
                "its GLM predictive is available for a last-layer posterior only; raise max_dense_factor"
            )
        return s.patches()[:, 0]

    def functional_variance_diagonal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C)`` mean and GLM variances, no ``(N, C, C)`` tensor; for a last layer one GEMM with the factors."""
        if not self.last_layer_only:
            return self._in_chunks(x, self._variances)
        self._require_fit()
        name, module = self.layers[0]
        output, features, is_output = layer_forward(
            self.model, self._prediction_inputs(x), module, self.enable_backprop
        )
        if not is_output or features.dim() != 2:  # logits transformed after the layer: the Jacobian path
            return super().functional_variance_diagonal(x)
        if trainable_bias(module) is not None:
            features = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)
        qa, _, qg, _ = self.eigendecomposition()
        delta = self.prior_precision[self._kron]
        variances = truncated_kron.last_layer_variances(
            features.to(qa[0].dtype), qa[0], qg[0], self._inverse_eigenvalues([0])[0], delta[0]
        )
        return (output if self.enable_backprop else output.detach()), variances.to(output.dtype)

    def _jacobian_cross_covariance(self, stats) -> Tensor:
        """Between samples n, m: ``Σ_ij ã_ni ã_mi B̃_ncj B̃_mdj / (s λ_i μ_j + δ)`` in the eigenbasis."""
        for i in range(len(self._kron)):
            if self._truncated(i):
                raise ValueError(
                    f"the joint predictive is not available with the truncated factors of layer "
                    f"{self.layers[self._kron[i]][0]!r}; raise max_dense_factor above {self.max_dense_factor}"
                )
        qa, _, qg, _ = self.eigendecomposition()
        total = 0
        for i, (s, inverse) in enumerate(zip((stats[k] for k in self._kron), self._inverse_eigenvalues(), strict=True)):
            if s.is_plain_linear:
                inputs, grads = self._rotated_linear(s, qa[i], qg[i])
                pairs = torch.einsum("ni,mi,ji->nmj", inputs, inputs, inverse)
                total = total + torch.einsum("ncj,nmj,mdj->ncmd", grads, pairs, grads)
            else:
                rotated = self._rotated_jacobian(s, qa[i], qg[i])
                total = total + torch.einsum("ncji,ji,mdji->ncmd", rotated, inverse, rotated)
        return total + self._special_covariance(stats, joint=True)

    @staticmethod
    def _rotated_linear(s, qa: Tensor, qg: Tensor) -> tuple[Tensor, Tensor]:
        """A once-per-sample Linear layer's rotated inputs ``(N, d_A)`` and output Jacobians ``(N, C, d_G)``."""
        return s.patches()[:, 0].to(qa.dtype) @ qa, s.output_grads.to(qa.dtype) @ qg

    @staticmethod
    def _rotated_jacobian(s, qa, qg) -> Tensor:
        """``(N, C, d_G, d_A)``: ``J̃[c, j, i] = Σ_p (B_p Q_G)[c, j] (Q_Aᵀ u_p)[i]`` of a layer at several locations."""
        b_rot = s.location_grads().to(qa.dtype) @ qg  # (N, C, L, d_G)
        u_rot = s.patches().to(qa.dtype) @ qa  # (N, L, d_A)
        return torch.einsum("nclj,nli->ncji", b_rot, u_rot)

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        deviations: list[Tensor | None] = [None] * len(self.layers)
        if self._kron:
            qa, _, qg, _ = self.eigendecomposition()
            la, lg, scale, delta = self._spectrum(self.prior_precision, self.sigma_noise)
            noise = [
                torch.randn((n_samples, g.shape[0], a.shape[0]), dtype=a.dtype, device=a.device, generator=generator)
                for a, g in zip(qa, qg, strict=True)
            ]
            fused = [i for i in range(len(self._kron)) if self._factored(i) and not self._truncated(i)]
            if fused:
                solved = ops.kron_solve(
                    *([v[i] for i in fused] for v in (qa, la, qg, lg, noise)), scale[fused], delta[fused], -0.5
                )
                for i, d in zip(fused, solved, strict=True):
                    deviations[self._kron[i]] = d
            rest = [i for i in range(len(self._kron)) if i not in fused]
            for i, inverse in zip(rest, self._inverse_eigenvalues(rest), strict=True):
                deviations[self._kron[i]] = truncated_kron.inverse_root_samples(
                    noise[i], qa[i], qg[i], inverse, delta[i]
                )
        if self._embedding:
            q_g, _ = self.embedding_eigendecomposition()
            for i, q, inverse in zip(self._embedding, q_g, self._embedding_inverses(), strict=True):
                noise = torch.randn((n_samples, *inverse.shape), dtype=q.dtype, device=q.device, generator=generator)
                deviations[i] = blocks.embedding_inverse_root(noise, q, inverse)
        precisions = self._unitwise_precisions(self.prior_precision, self.sigma_noise)
        for i, p in zip(self._unitwise, precisions, strict=True):
            noise = torch.randn((n_samples, *p.shape[:2]), dtype=p.dtype, device=p.device, generator=generator)
            deviations[i] = blocks.unitwise_inverse_root(p, noise)
        return deviations

    def _curvature_tensors(self) -> list[Tensor]:
        """Kron ``A``, ``G``, locations; Embedding counts, ``G``, locations; unit-wise blocks (integers: layout)."""
        embedding = self.embedding_curvature
        return [
            *map(stored_factor, self.curvature.input_factors),
            *map(stored_factor, self.curvature.output_factors),
            torch.tensor(self.curvature.locations, dtype=torch.long),
            *embedding.counts,
            *embedding.output_factors,
            torch.tensor(embedding.locations, dtype=torch.long),
            *self.unitwise_curvature.blocks,
        ]

    def _check_curvature_values(self, tensors: list[Tensor]) -> None:
        """Factors and unit-wise blocks (PSD) need a non-negative diagonal; token counts are non-negative."""
        super()._check_curvature_values(tensors)
        for t in tensors:
            if not t.is_floating_point():
                continue
            square = t.dim() >= 2 and t.shape[-1] == t.shape[-2]
            diagonal = t.diagonal(dim1=-2, dim2=-1) if square else t if t.dim() == 1 else None
            if diagonal is not None and bool((diagonal < 0).any()):
                raise ValueError("the state's Kronecker factors and token counts must be non-negative")

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        names = [[self.layers[i][0] for i in layers] for layers in (self._kron, self._embedding, self._unitwise)]
        kron, embedding, unitwise = self.curvature, self.embedding_curvature, self.unitwise_curvature
        kron.names, embedding.names, unitwise.names = names
        count, rest = len(self._kron), iter(tensors)
        kron.input_factors = [restored_factor(next(rest)) for _ in range(count)]
        kron.output_factors = [restored_factor(next(rest)) for _ in range(count)]
        kron.locations = next(rest).tolist()
        count = len(self._embedding)
        embedding.counts = [next(rest) for _ in range(count)]
        embedding.output_factors = [next(rest) for _ in range(count)]
        embedding.locations = next(rest, torch.zeros(0, dtype=torch.long)).tolist()  # absent from a Kron-only state
        unitwise.blocks = list(rest)
        kron.num_data = embedding.num_data = unitwise.num_data = num_data
        self._eigen = None
