"""Eigenvalue-corrected Kronecker-factored (EKFAC) Laplace posterior (George et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from fastlaplace import distributed, ops
from fastlaplace.curvature.closed_form import SoftmaxStatistics
from fastlaplace.posterior.kron import KronLaplace


class EKFACLaplace(KronLaplace):
    """K-FAC's eigenbasis with the exact curvature diagonal in it: ``P_l = Q diag(S_l / (σ² T) + δ_l) Qᵀ``.

    ``Q = Q_G ⊗ Q_A`` are the eigenvectors of the layer's Kronecker factors (fitted as by
    :class:`KronLaplace`, same ``kfac_approx``), and ``S_l`` ``(d_G, d_A)`` is the diagonal of
    the layer's summed curvature (GGN, MC or empirical Fisher, as ``curvature_mode``) in that
    basis::

        S_l = Σ_n Σ_k (Q_Gᵀ G[n, k]ᵀ A[n] Q_A)²   (elementwise),

    with ``A[n]`` ``(L, d_A)`` the inputs datum n's locations see (with a bias's ones
    column) and ``G[n, k]`` ``(L, d_G)`` the k-th backpropagated column there: the squared
    per-datum gradients in the eigenbasis. Where K-FAC is exact (one datum at one location)
    ``S = λ_G λ_Aᵀ``, and Kron's scale ``1 / (σ² T N L)`` is EKFAC's ``1 / (σ² T)``: the two
    agree. Elsewhere S is the diagonal of ``Qᵀ H Q``, the best diagonal in that basis, so
    ``‖H − Q diag(S) Qᵀ‖_F ≤ ‖H − kron(G, A) / (N L)‖_F`` (George et al.) for the GGN and the
    empirical Fisher. Everything else (evidence, GLM and joint predictives, samples, prior optimisation,
    state_dict) is :class:`KronLaplace`'s with these eigenvalues (see
    :meth:`KronLaplace._eigenvalues`).

    ``fit`` makes two passes over the loader: the factors (then their eigendecomposition),
    then ``S`` in their eigenbasis; the loader must give the same data twice (a
    ``DataLoader``, a list; not a one-shot iterator), and ``fit(override=False)`` is refused
    (an earlier ``S`` lies in another eigenbasis). With ``curvature_mode="mc"`` the second
    pass draws its own labels. Under ``torch.distributed`` each rank passes over its shard and
    ``S`` is summed over the ranks like the factors.

    Layers Kron handles by other means keep Kron's handling and spectrum: Embedding,
    LayerNorm / BatchNorm (unit-wise blocks) and layers with a sketched (truncated) factor.
    ``damping=True`` has no EKFAC form and is refused.
    """

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("damping"):
            raise ValueError("damping=True (the prior added to each Kronecker factor) has no EKFAC form; use kron")
        super().__init__(*args, **kwargs)

    def _reset_curvature(self) -> None:
        super()._reset_curvature()
        #: per Kron layer its ``(d_G, d_A)`` S, or an empty tensor where Kron's eigenvalues stay (none fitted yet)
        self.eigenvalue_corrections: list[Tensor] = []

    def fit(self, loader: Iterable, override: bool = True, progress_bar: bool | None = None) -> None:
        """:meth:`ParametricLaplace.fit`, then a second pass over the loader for ``S``; all-or-nothing.

        Raises:
            ValueError: for ``override=False``, or a loader that does not give the same number
                of data on its second pass; and as :meth:`ParametricLaplace.fit`.
        """
        if not override:
            raise ValueError(
                "fit(override=False) is not available for EKFAC: the earlier fit's eigenvalue corrections lie in "
                "another eigenbasis; refit on all the data"
            )
        with self._unchanged_on_failure():
            super().fit(loader, override, progress_bar)
            self._fit_corrections(loader, progress_bar)

    def _fit_corrections(self, loader: Iterable, progress_bar: bool | None) -> None:
        """The second pass: ``S`` of every Kron layer with dense factors, in the fitted eigenbasis."""
        qa, _, qg, _ = self.eigendecomposition()
        corrected = [i for i in range(len(self._kron)) if not self._truncated(i)]
        corrections = [qa[i].new_zeros(0) for i in range(len(self._kron))]
        if not corrected:  # every layer keeps Kron's eigenvalues: no second pass
            self.eigenvalue_corrections = corrections
            return
        scales = [qg[i].new_zeros(qg[i].shape[0], qa[i].shape[0]) for i in corrected]
        seen = 0
        for x, y in self._checked_batches(loader, progress_bar, "fitting the EKFAC eigenvalues"):
            _, stats = self._batch_statistics(x, y, None)
            layers = [stats[self._kron[i]] for i in corrected]
            if isinstance(layers[0], SoftmaxStatistics):  # a softmax last layer, alone: no columns
                _add_softmax_corrections_(scales[0], layers[0], qa[corrected[0]], qg[corrected[0]])
            else:
                ops.ekfac_scales_(
                    scales,
                    [s.patches() for s in layers],
                    [s.location_grads() for s in layers],
                    [qa[i] for i in corrected],
                    [qg[i] for i in corrected],
                    1.0,
                    1.0,
                )
            seen += y.shape[0]
        count = torch.tensor([seen], dtype=torch.float64, device=self.device)
        distributed.all_reduce_([*scales, count])
        if round(float(count)) != self.num_data:
            raise ValueError(
                f"the loader gave {round(float(count))} data on its second pass and {self.num_data} on its first: "
                "EKFAC passes twice over the same data (a DataLoader or a list, not a one-shot iterator)"
            )
        for i, s in zip(corrected, scales, strict=True):
            corrections[i] = s
        self.eigenvalue_corrections = corrections

    def _corrections(self) -> list[Tensor]:
        """``eigenvalue_corrections``, with an empty tensor per Kron layer before any is fitted."""
        if self.eigenvalue_corrections:
            return self.eigenvalue_corrections
        return [torch.zeros(0, dtype=self.dtype, device=self.device) for _ in self._kron]

    def _factored(self, index: int) -> bool:
        return self._corrections()[index].numel() == 0

    def _eigenvalues(
        self, prior_precision: Tensor, sigma_noise: Tensor, layers: Sequence[int] | None = None
    ) -> list[Tensor]:
        """``s S_l + δ_l`` (s = 1 / (σ² T)) for the corrected layers, Kron's for the others."""
        corrections = self._corrections()
        layers = range(len(corrections)) if layers is None else layers
        factored = [i for i in layers if corrections[i].numel() == 0]
        kron = dict(zip(factored, super()._eigenvalues(prior_precision, sigma_noise, factored), strict=True))
        scale, delta = self._curvature_scale(sigma_noise), prior_precision[self._kron]
        return [kron[i] if i in kron else scale * corrections[i] + delta[i] for i in layers]

    def _curvature_tensors(self) -> list[Tensor]:
        """One ``S`` (or an empty tensor) per Kron layer, then :meth:`KronLaplace._curvature_tensors`."""
        return [*self._corrections(), *super()._curvature_tensors()]

    def _check_curvature_values(self, tensors: list[Tensor]) -> None:
        if any(bool((t < 0).any()) for t in tensors[: len(self._kron)] if t.is_floating_point()):
            raise ValueError("the state's EKFAC eigenvalue corrections must be non-negative")
        super()._check_curvature_values(tensors)

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        count = len(self._kron)
        corrections = tensors[:count]
        super()._restore_curvature(tensors[count:], num_data)
        for i, c in enumerate(corrections):
            if not c.numel():
                continue
            name = self.layers[self._kron[i]][0]
            if self._truncated(i):
                raise ValueError(f"layer {name!r} has truncated factors and so no eigenvalue corrections")
            expected = (self.curvature.output_factors[i].shape[0], self.curvature.input_factors[i].shape[0])
            if tuple(c.shape) != expected:
                raise ValueError(
                    f"the eigenvalue corrections of layer {name!r} have shape {tuple(c.shape)}; expected {expected}"
                )
        self.eigenvalue_corrections = list(corrections)


def _add_softmax_corrections_(scale: Tensor, s: SoftmaxStatistics, qa: Tensor, qg: Tensor) -> None:
    """``S += Σ_n diag(Q_Gᵀ H_n Q_G) (Q_Aᵀ a_n)²ᵀ`` for a softmax last layer, ``H_n = diag(p_n) − p_n p_nᵀ``.

    The exact GGN's S from the probabilities alone (``diag(Q_Gᵀ H Q_G) = p Q_G² − (p Q_G)²``),
    as Kron's closed-form output factor, instead of ``C − 1`` Hessian-root columns per datum.

    Args:
        scale: ``(C, d_A)`` S, updated in place.
        s: the batch's :class:`SoftmaxStatistics` (``(N, C)`` probabilities, ``(N, d_in)`` inputs).
        qa: ``(d_A, d_A)`` eigenvectors of A.
        qg: ``(C, C)`` eigenvectors of G.
    """
    p = s.probabilities.to(scale.dtype)
    hessian_diagonals = p @ qg.square() - (p @ qg).square()  # (N, C)
    rotated = s.patches()[:, 0].to(scale.dtype) @ qa  # (N, d_A)
    scale.addmm_(hessian_diagonals.T, rotated.square())
