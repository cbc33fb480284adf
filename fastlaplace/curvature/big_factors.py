"""Kronecker factors too large to hold densely, kept as a streaming Nyström sketch and used through top eigenpairs.

A factor F (d × d, PSD) of side d above the posterior's ``max_dense_factor`` (a 50k-output
LM head's G) is never formed. Each batch adds its contribution to the sketch
``Y = F Ω`` (``Ω`` a fixed Gaussian ``(d, m)`` test matrix, ``m = min(2 k, d − 1)`` for
``k = factor_rank``), in float64; the sketch is linear in the data, so batches, earlier fits
and ranks add up. :meth:`SketchedFactor.eigenpairs` returns the top k eigenpairs of the
stable Nyström approximation ``Y (Ωᵀ Y)⁺ Yᵀ`` (Tropp, Yurtsever, Udell & Cevher 2017,
Alg. 3). It reproduces F exactly when ``rank F ≤ m``; otherwise it is the best rank-m
approximation up to the sketch's error, which shrinks with the spectrum's decay.

The posterior treats the rest of the spectrum as zero: ``P`` restricted to the complement
of the kept eigenvectors is the prior precision δ (see :mod:`fastlaplace.posterior.truncated_kron`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: seed of the test matrix Ω: the same on every rank and in every fit, so that sketches add up
SKETCH_SEED = 20_240_522


def sketch_width(side: int, rank: int) -> int:
    """The sketch's columns m for a factor of ``side`` keeping ``rank`` eigenpairs: ``min(2 rank, side − 1)``."""
    return min(2 * rank, side - 1)


class SketchedFactor:
    """A PSD factor ``F`` (d × d) held as its Nyström sketch ``Y = F Ω`` (``(d, m)``, float64, m < d).

    Args:
        sketch: ``(d, m)`` the sketch ``F Ω`` (zeros before any data).
    """

    def __init__(self, sketch: Tensor) -> None:
        if sketch.dim() != 2 or not 0 < sketch.shape[1] < sketch.shape[0]:
            raise ValueError(f"a factor's sketch must be (d, m) with 0 < m < d, got {tuple(sketch.shape)}")
        self.sketch = sketch
        self._test_matrix: Tensor | None = None

    @classmethod
    def zeros(cls, side: int, rank: int, device: torch.device) -> SketchedFactor:
        """The sketch of a zero ``side × side`` factor that will keep ``rank`` eigenpairs."""
        return cls(torch.zeros(side, sketch_width(side, rank), dtype=torch.float64, device=device))

    @property
    def side(self) -> int:
        """d, the factor's side."""
        return self.sketch.shape[0]

    def test_matrix(self) -> Tensor:
        """``(d, m)`` the Gaussian Ω, regenerated from :data:`SKETCH_SEED` (not stored in a state)."""
        if self._test_matrix is None:
            generator = torch.Generator().manual_seed(SKETCH_SEED)
            omega = torch.randn(self.sketch.shape, dtype=torch.float64, generator=generator)
            self._test_matrix = omega.to(self.sketch.device)
        return self._test_matrix

    def add_gram(self, rows: Tensor, append_ones: bool = False, alpha: float = 1.0, beta: float = 1.0) -> None:
        """``F ← β F + α Rᵀ R`` for ``(r, d)`` rows R (with a ones column appended when ``append_ones``)."""
        rows = rows.to(torch.float64)
        if append_ones:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        self._add(rows.T @ (rows @ self.test_matrix()), alpha, beta)

    def add_softmax_hessian(self, probs: Tensor, alpha: float = 1.0, beta: float = 1.0) -> None:
        """``F ← β F + α Σ_n (diag(p_n) − p_n p_nᵀ)`` for ``(N, d)`` probabilities, as ``diag(Σ p) − Pᵀ P``."""
        probs = probs.to(torch.float64)
        omega = self.test_matrix()
        self._add(probs.sum(0).unsqueeze(1) * omega - probs.T @ (probs @ omega), alpha, beta)

    def _add(self, product: Tensor, alpha: float, beta: float) -> None:
        if beta != 1.0:
            self.sketch.mul_(beta)
        self.sketch.add_(product, alpha=alpha)

    def eigenpairs(self, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The top ``k = min(rank, m)`` eigenpairs of the Nyström approximation of F.

        Args:
            rank: how many eigenpairs to keep.
            dtype: the dtype of the results (computed in float64).

        Returns:
            ``(values, vectors)``: ``(k,)`` non-negative eigenvalues in ascending order and
            ``(d, k)`` orthonormal eigenvectors.
        """
        omega = self.test_matrix()
        # A shift ν keeps Ωᵀ Y positive definite when F is (numerically) singular; it is taken off after.
        shift = torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(self.sketch)) + 1e-300
        shifted = self.sketch + shift * omega
        core = omega.T @ shifted
        lower = torch.linalg.cholesky(0.5 * (core + core.T))
        factor = torch.linalg.solve_triangular(lower, shifted.T, upper=False).T  # Y_ν L⁻ᵀ, (d, m)
        vectors, singular, _ = torch.linalg.svd(factor, full_matrices=False)
        k = min(rank, singular.numel())
        values = (singular[:k].square() - shift).clamp_min(0)
        return values.flip(0).to(dtype), vectors[:, :k].flip(1).to(dtype)


def stored_factor(factor: Tensor | SketchedFactor) -> Tensor:
    """The tensor a state keeps of a factor: a dense factor itself, a sketched one's ``(d, m)`` sketch."""
    return factor.sketch if isinstance(factor, SketchedFactor) else factor


def restored_factor(tensor: Tensor) -> Tensor | SketchedFactor:
    """Inverse of :func:`stored_factor`: a ``(d, m)`` tensor with ``m < d`` is a sketch, a square one dense."""
    if tensor.dim() == 2 and tensor.shape[1] < tensor.shape[0]:
        return SketchedFactor(tensor)
    return tensor
