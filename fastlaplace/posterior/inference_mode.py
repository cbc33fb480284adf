"""Posterior methods called under ``torch.inference_mode()`` run outside it.

Evaluation loops often run under inference mode (PyTorch Lightning's ``predict`` and ``test``,
functions decorated with ``@torch.inference_mode()``). Tensors made there can never join an
autograd graph later, and a posterior keeps what it computes: eigendecompositions and
inverses cached by a predictive, the factors of a fit, a prior set. Under inference mode the
all-weights predictive could not backpropagate its Jacobians at all, and a last-layer one left
cached inference tensors that broke the next prior optimisation. Every public method and
property of a posterior therefore leaves inference mode for its duration, with gradients off
as the caller had them (its own backward passes turn them on where they need them); what it
returns are ordinary tensors.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def outside_inference_mode(function: F) -> F:
    """``function`` run with inference mode off (and gradients off) when called under it; as is otherwise."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return function(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return function(*args, **kwargs)

    return run  # type: ignore[return-value]


def shield_public_methods(cls: type) -> None:
    """Wrap what ``cls`` defines of public methods, ``__init__``, ``__call__`` and properties (see the module)."""
    for name, value in list(vars(cls).items()):
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(value, property):
            accessors = (None if f is None else outside_inference_mode(f) for f in (value.fget, value.fset, value.fdel))
            setattr(cls, name, property(*accessors, value.__doc__))
        elif inspect.isfunction(value):
            setattr(cls, name, outside_inference_mode(value))
