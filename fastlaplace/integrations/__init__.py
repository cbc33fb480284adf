"""Adapters that let other libraries use fastlaplace's curvature.

:mod:`fastlaplace.integrations.laplace_torch` holds curvature backends for laplace-torch
(``laplace.Laplace(..., backend=FastGGN)``). laplace-torch is an optional dependency: it is
imported only when that module (or one of the names below) is first used, never by
``import fastlaplace``.
"""

from __future__ import annotations

from typing import Any

_LAPLACE_TORCH_NAMES = ("FastCurvatureInterface", "FastEF", "FastGGN")

__all__ = list(_LAPLACE_TORCH_NAMES)


def __getattr__(name: str) -> Any:
    """Import the laplace-torch backends on first use (PEP 562), so laplace-torch stays optional."""
    if name in _LAPLACE_TORCH_NAMES:
        from fastlaplace.integrations import laplace_torch

        return getattr(laplace_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
