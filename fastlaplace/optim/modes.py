"""K-FAC damping modes: how ``(F + δ)⁻¹`` is made from the factors and applied, one class each.

A mode turns a layer's averaged factors ``(A, G)`` into a *basis* at each update (what the
preconditioning is made from), turns a basis into *damped* data for the current damping δ
(kept until the basis or δ changes), and applies ``ν (F + δ)⁻¹`` to the gradients of all
layers in one fused operator call per step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

from fastlaplace import distributed, ops
from fastlaplace.curvature import LayerStatistics
from fastlaplace.curvature.eigen import factor_eigh
from fastlaplace.optim.layers import PreconditionedLayer


class EigenBasis(NamedTuple):
    """A layer's factors as eigenpairs: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ``."""

    q_a: Tensor
    l_a: Tensor
    q_g: Tensor
    l_g: Tensor


class Factors(NamedTuple):
    """A layer's averaged factors ``(A, G)`` as of the last update."""

    a: Tensor
    g: Tensor


class DampedInverses(NamedTuple):
    """``((A + π√δ I)⁻¹, (G + √δ/π I)⁻¹)`` of a layer."""

    a: Tensor
    g: Tensor


class DampingMode(ABC):
    """How a K-FAC preconditioner makes and applies ``(F + δ)⁻¹``."""

    #: the mode's name, as ``damping_mode`` takes it
    name: str
    #: the type of a layer's basis (its fields are what a state_dict saves)
    basis_type: type[tuple]

    @abstractmethod
    def bases(self, input_factors: list[Tensor], output_factors: list[Tensor]) -> list[tuple]:
        """Per layer the basis made from its factors ``(d_A, d_A)`` and ``(d_G, d_G)``, on this rank."""

    def bases_from_owners(
        self, factors: list[Tensor], owners: list[int], rank: int, bucket_mb: float
    ) -> list[tuple] | None:
        """Per layer the basis when each of the ``2L`` factors (inputs, then outputs) is decomposed by its owner.

        None for a mode whose bases are cheaper made on every rank than sent (the caller
        then makes them with :meth:`bases`).
        """
        return None

    @abstractmethod
    def damp(self, layers: list[PreconditionedLayer], delta: float, relative: bool) -> None:
        """Make ``layer.damped`` for δ where it is None, from ``layer.basis``.

        With ``relative`` each layer's damping is δ times the mean eigenvalue of its ``A ⊗ G``
        (δ itself where that is zero), see :func:`relative_damping`.
        """

    @abstractmethod
    def solve_(
        self, gradients: list[Tensor], blocks: list[int], layers: list[PreconditionedLayer], kl_weights: Tensor | None
    ) -> None:
        """``ν (F + δ)⁻¹`` in place on the gradient blocks of the layers (``blocks[l]`` of them per layer)."""

    @abstractmethod
    def basis_shapes(self, d_a: int, d_g: int) -> tuple[tuple[int, ...], ...]:
        """The shapes of a basis's fields for a layer with factors ``(d_A, d_A)`` and ``(d_G, d_G)``."""

    def update_scales(
        self, layers: list[PreconditionedLayer], statistics: list[LayerStatistics], weights: list[float], decay: float
    ) -> None:
        """Between two basis refreshes, blend one factor-update batch into the bases (a no-op but for EKFAC).

        ``weights[l]`` scales the batch's sums of layer l: ``(1 − β) / N`` times the conventions'
        scales of its gradients and inputs, as its factors get. Layers without a basis yet
        (None) are left as they are.
        """
        return None  # the other modes' bases depend on the factors only


def relative_damping(a_means: Tensor, g_means: Tensor, delta: float) -> Tensor:
    """``(L,)`` dampings ``δ m_A m_G`` from the factors' mean eigenvalues ``(L,)``; δ where a mean is not positive.

    The mean eigenvalue of ``A ⊗ G`` is ``m_A m_G``, so that δ is a fraction of the layer's
    average curvature whatever the scale of its factors (one datum's G or a batch's).
    """
    product = a_means.clamp_min(0) * g_means.clamp_min(0)
    return torch.where(product > 0, product, 1.0) * delta


class EigenDamping(DampingMode):
    """Exactly ``(λ_A μ_G + δ)⁻¹`` in the factors' eigenbasis."""

    name = "eigen"
    basis_type = EigenBasis

    def bases(self, input_factors: list[Tensor], output_factors: list[Tensor]) -> list[EigenBasis]:
        """Eigenpairs of all the factors in one batched call."""
        count = len(input_factors)
        values, vectors = factor_eigh(input_factors + output_factors)
        return [EigenBasis(vectors[k], values[k], vectors[count + k], values[count + k]) for k in range(count)]

    def bases_from_owners(
        self, factors: list[Tensor], owners: list[int], rank: int, bucket_mb: float
    ) -> list[EigenBasis]:
        """Each factor eigendecomposed on its owner rank, then broadcast to all."""
        mine = [j for j, owner in enumerate(owners) if owner == rank]
        values, vectors = factor_eigh([factors[j] for j in mine])
        all_values = [f.new_empty(f.shape[0]) for f in factors]
        all_vectors = [torch.empty_like(f) for f in factors]
        for j, v, q in zip(mine, values, vectors, strict=True):
            all_values[j], all_vectors[j] = v, q
        distributed.broadcast_from_owners_(all_values + all_vectors, owners * 2, bucket_mb)
        count = len(factors) // 2
        return [
            EigenBasis(all_vectors[i], all_values[i], all_vectors[count + i], all_values[count + i])
            for i in range(count)
        ]

    def basis_shapes(self, d_a: int, d_g: int) -> tuple[tuple[int, ...], ...]:
        """``Q_A, λ_A, Q_G, λ_G``."""
        return (d_a, d_a), (d_a,), (d_g, d_g), (d_g,)

    def damp(self, layers: list[PreconditionedLayer], delta: float, relative: bool) -> None:
        """``1 / (μ λᵀ + δ)`` of the clamped spectra, ``(d_G, d_A)``."""
        missing = [layer for layer in layers if layer.damped is None]
        if not missing:
            return
        deltas: list[float | Tensor] = [delta] * len(missing)
        if relative:
            a_means = torch.stack([layer.basis.l_a.clamp_min(0).mean() for layer in missing])
            g_means = torch.stack([layer.basis.l_g.clamp_min(0).mean() for layer in missing])
            deltas = list(relative_damping(a_means, g_means, delta))
        for layer, damping in zip(missing, deltas, strict=True):
            basis = layer.basis
            layer.damped = torch.outer(basis.l_g.clamp_min(0), basis.l_a.clamp_min(0)).add_(damping).reciprocal_()

    def solve_(
        self, gradients: list[Tensor], blocks: list[int], layers: list[PreconditionedLayer], kl_weights: Tensor | None
    ) -> None:
        """One ``kron_precondition_`` call over the layers."""
        ops.kron_precondition_(
            gradients,
            blocks,
            [layer.basis.q_a for layer in layers],
            [layer.basis.q_g for layer in layers],
            [layer.damped for layer in layers],
            kl_weights,
            validate=False,  # built here from the layers' own tensors, at every step
        )


class FactoredDamping(DampingMode):
    """``(A + π√δ I)⁻¹ ⊗ (G + √δ/π I)⁻¹``, ``π² = (tr A / d_A) / (tr G / d_G)`` (Martens & Grosse 2015).

    Nothing is eigendecomposed: the averaged factors are kept, inverted by Cholesky for
    each damping, and a step is two GEMMs per layer. π is 1 when either trace is zero.
    """

    name = "factored"
    basis_type = Factors

    def bases(self, input_factors: list[Tensor], output_factors: list[Tensor]) -> list[Factors]:
        """Copies of the factors (the averaged ones change at the next update)."""
        return [Factors(a.clone(), g.clone()) for a, g in zip(input_factors, output_factors, strict=True)]

    def basis_shapes(self, d_a: int, d_g: int) -> tuple[tuple[int, ...], ...]:
        """``A, G``."""
        return (d_a, d_a), (d_g, d_g)

    def damp(self, layers: list[PreconditionedLayer], delta: float, relative: bool) -> None:
        """Both damped inverses of every layer in one ``damped_inverses`` call."""
        missing = [layer for layer in layers if layer.damped is None]
        if not missing:
            return
        factors = [layer.basis.a for layer in missing] + [layer.basis.g for layer in missing]
        means = torch.stack([f.diagonal().mean() for f in factors]).clamp_min(0).view(2, -1)
        root = relative_damping(means[0], means[1], delta).sqrt() if relative else math.sqrt(delta)
        both = (means > 0).all(0)
        pi = torch.where(both, means[0] / torch.where(both, means[1], 1), 1).sqrt()
        inverses = ops.damped_inverses(factors, torch.cat([pi * root, root / pi]))
        for k, layer in enumerate(missing):
            layer.damped = DampedInverses(inverses[k], inverses[k + len(missing)])

    def solve_(
        self, gradients: list[Tensor], blocks: list[int], layers: list[PreconditionedLayer], kl_weights: Tensor | None
    ) -> None:
        """One ``kron_inverse_precondition_`` call over the layers."""
        ops.kron_inverse_precondition_(
            gradients,
            blocks,
            [layer.damped.a for layer in layers],
            [layer.damped.g for layer in layers],
            kl_weights,
            validate=False,  # built here from the layers' own tensors, at every step
        )


class EKFACBasis(NamedTuple):
    """The factors' eigenpairs and EKFAC's scales ``S (d_G, d_A)``, the gradients' second moments in ``Q_A ⊗ Q_G``."""

    q_a: Tensor
    l_a: Tensor
    q_g: Tensor
    l_g: Tensor
    scales: Tensor


class EKFACDamping(EigenDamping):
    """Eigenvalue-corrected K-FAC (George et al. 2018): ``(S + δ)⁻¹`` in the factors' eigenbasis.

    K-FAC's eigenvalues ``μ_i λ_j`` are the Kronecker model's guess of the gradients' second
    moments along each eigenvector pair; EKFAC measures them: S is a running average
    (``factor_decay``) of each datum's squared gradient coordinates ``(Q_Gᵀ ∇W_n Q_A)²``,
    the diagonal of the Fisher in that basis, which is the best diagonal in that basis (in
    Frobenius norm). At each basis refresh S starts again from ``μ λᵀ`` (the Kronecker
    factors' own diagonal in their new basis: the old S belongs to the old basis); each
    factor update until the next refresh blends the batch's measured moments in, one
    ``ekfac_scales_`` call for all layers. So EKFAC differs from ``"eigen"`` only when the
    basis is refreshed less often than the factors (``inv_update_steps >
    factor_update_steps``), its intended use: cheap corrections between eigendecompositions.
    """

    name = "ekfac"
    basis_type = EKFACBasis

    def bases(self, input_factors: list[Tensor], output_factors: list[Tensor]) -> list[EKFACBasis]:
        """Eigenpairs of all the factors in one batched call, the scales at ``μ λᵀ``."""
        return [_with_kronecker_scales(b) for b in super().bases(input_factors, output_factors)]

    def bases_from_owners(
        self, factors: list[Tensor], owners: list[int], rank: int, bucket_mb: float
    ) -> list[EKFACBasis]:
        """Each factor eigendecomposed on its owner rank and broadcast; the scales made on every rank."""
        return [_with_kronecker_scales(b) for b in super().bases_from_owners(factors, owners, rank, bucket_mb)]

    def basis_shapes(self, d_a: int, d_g: int) -> tuple[tuple[int, ...], ...]:
        """``Q_A, λ_A, Q_G, λ_G, S``."""
        return (*super().basis_shapes(d_a, d_g), (d_g, d_a))

    def damp(self, layers: list[PreconditionedLayer], delta: float, relative: bool) -> None:
        """``1 / (S + δ)``, S clamped at 0; relative δ is a fraction of S's mean."""
        for layer in layers:
            if layer.damped is None:
                scales = layer.basis.scales.clamp_min(0)
                damping = relative_damping(scales.mean(), scales.new_ones(()), delta) if relative else delta
                layer.damped = scales.add_(damping).reciprocal_()

    def update_scales(
        self, layers: list[PreconditionedLayer], statistics: list[LayerStatistics], weights: list[float], decay: float
    ) -> None:
        """``S ← β S + w S_batch``, one ``ekfac_scales_`` call per distinct weight (one in the default conventions).

        The scales are then averaged over the ranks (each rank's batch is its own).
        """
        held = [i for i, layer in enumerate(layers) if layer.basis is not None]
        for weight in dict.fromkeys(weights[i] for i in held):
            chosen = [i for i in held if weights[i] == weight]
            ops.ekfac_scales_(
                [layers[i].basis.scales for i in chosen],
                [statistics[i].patches() for i in chosen],
                [statistics[i].location_grads() for i in chosen],
                [layers[i].basis.q_a for i in chosen],
                [layers[i].basis.q_g for i in chosen],
                weight=weight,
                decay=decay,
            )
        distributed.all_reduce_([layers[i].basis.scales for i in held], average=True)
        for i in held:
            layers[i].damped = None


def _with_kronecker_scales(basis: EigenBasis) -> EKFACBasis:
    return EKFACBasis(*basis, torch.outer(basis.l_g.clamp_min(0), basis.l_a.clamp_min(0)))


#: the damping modes by name
MODES: dict[str, type[DampingMode]] = {mode.name: mode for mode in (EigenDamping, FactoredDamping, EKFACDamping)}
