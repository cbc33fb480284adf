"""Natural-gradient training with the K-FAC curvature of :mod:`fastlaplace.curvature`.

:class:`KFACPreconditioner` rewrites the gradients of a model's Linear and Conv2d layers
into K-FAC natural gradients between ``loss.backward()`` and any ``torch.optim``
optimiser's ``step()``; under ``torch.distributed`` it all-reduces the factors and
shares the eigendecompositions (:mod:`fastlaplace.distributed`).
"""

from fastlaplace.optim.kfac import DAMPING_MODES, KFACPreconditioner

__all__ = ["DAMPING_MODES", "KFACPreconditioner"]
