"""K-FAC conventions: how the factors are scaled and started and how damping and the KL clip are read.

Three named sets (``KFACPreconditioner(conventions=...)``):

============================  ==================  ==================  ==================
                              ``"fastlaplace"``   ``"fastlaplace-v0"``  ``"kfac-pytorch"``
============================  ==================  ==================  ==================
G                             one datum's         one datum's          the mean loss's (÷ N²)
Conv2d A, G                   as they are         as they are          ÷ L², ÷ L³
running factors start at      ``m I`` blend       the first batch      ``I`` blend
damping δ added to λ_A λ_G    δ m_A m_G           δ                    δ
default δ                     :data:`RELATIVE`    1e-3                 1e-3
KL clip's learning rate       lr / (1 − μ)        lr                   lr
============================  ==================  ==================  ==================

N is the batch size, L a Conv2d's output locations, ``m = tr F / d`` a factor's mean
eigenvalue, and μ the SGD momentum of the optimiser passed as ``lr``. A "blend" start is
the first update's ``β S + (1 − β) F_batch`` from the start S (kfac-pytorch's identity; the
batch's own ``m I``, the same in any factor scale) instead of the rank-deficient batch alone.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the "fastlaplace" default damping, relative to the mean eigenvalue of ``A ⊗ G``
RELATIVE = 0.1


@dataclass(frozen=True)
class Conventions:
    """One named set of K-FAC conventions.

    Attributes:
        name: as ``conventions`` takes it.
        datum_output_factor: G of one datum's loss (gradients of a mean loss times N); else
            G of a mean loss's gradients as they arrive (N² smaller, kfac-pytorch).
        conv_location_scaling: a Conv2d's A divided by L² and G by L³ (kfac-pytorch).
        start: the running factors' start before the first update is blended in: ``"batch"``
            (none: the first batch replaces them), ``"identity"`` or ``"mean_identity"``
            (``tr F_batch / d`` times the identity).
        relative_damping: δ multiplies the mean eigenvalue ``(tr A / d_A)(tr G / d_G)`` of each layer's ``A ⊗ G``.
        default_damping: δ when none is given.
        momentum_kl_clip: the KL clip takes each layer's lr as ``lr / (1 − μ)`` with the SGD
            momentum μ of the optimiser passed as ``lr``, the bound on the step that momentum
            makes of clipped natural gradients.
    """

    name: str
    datum_output_factor: bool
    conv_location_scaling: bool
    start: str
    relative_damping: bool
    default_damping: float
    momentum_kl_clip: bool


#: the conventions by name
CONVENTIONS: dict[str, Conventions] = {
    c.name: c
    for c in (
        Conventions("fastlaplace", True, False, "mean_identity", True, RELATIVE, True),
        Conventions("fastlaplace-v0", True, False, "batch", False, 1e-3, False),
        Conventions("kfac-pytorch", False, True, "identity", False, 1e-3, False),
    )
}
