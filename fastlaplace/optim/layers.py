"""The layers a K-FAC preconditioner works on, and what it keeps for each of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastlaplace.curvature import supported_layers, trainable_bias
from fastlaplace.curvature.layout import is_transposed_linear, weight_shape
from fastlaplace.curvature.model_io import in_library_call
from fastlaplace.curvature.statistics import has_kron_factors


@dataclass
class Capture:
    """One forward of a layer during a factor-update step: its input, and later its output gradient."""

    inputs: Tensor
    grad: Tensor | None = None


@dataclass(eq=False)
class PreconditionedLayer:
    """A Linear, Conv2d or transformers Conv1D layer under K-FAC, and its state.

    Attributes:
        name: the layer's name in ``model.named_modules()``.
        module: the layer.
        weight: its weight.
        bias: its trainable bias, or None.
        d_in: the columns of the weight as a ``(d_out, d_in)`` matrix.
        transposed: whether the weight is stored as ``(d_in, d_out)`` (transformers' Conv1D):
            its gradient is then read and written through a transposed view, no copy.
        owner: the rank that eigendecomposes its factors under ``broadcast="gradient"``
            (and preconditions its gradient); 0 on one process.
        captures: the forwards captured since the last factor update.
        basis: what its preconditioning is made from as of the last update, in the damping
            mode's type (:mod:`fastlaplace.optim.modes`); None where another rank owns it.
        damped: what the mode makes from ``basis`` for the current damping; None until needed.
    """

    name: str
    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    d_in: int
    transposed: bool = False
    owner: int = 0
    captures: list[Capture] = field(default_factory=list)
    basis: tuple | None = None
    damped: Any = None

    @property
    def factor_sizes(self) -> tuple[int, int]:
        """``(d_A, d_G)``: the sides of the input factor (a ones entry for the bias) and the output factor."""
        return self.d_in + (self.bias is not None), self.d_out

    def capture_hook(self, capturing: Callable[[], bool]) -> Callable:
        """A forward hook that keeps the input and, from the backward, the output gradient while ``capturing()``."""

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled() or not capturing() or not output.requires_grad or in_library_call():
                return  # a Laplace fit or predictive on the same model is not a training step
            capture = Capture(inputs[0].detach())
            self.captures.append(capture)

            def store(grad: Tensor) -> None:
                capture.grad = grad.detach()

            output.register_hook(store)

        return hook

    def gradient_blocks(self) -> list[Tensor]:
        """The weight's gradient, then the bias's (a zero column where the bias has none, whose update is dropped)."""
        blocks = [self._weight_grad()]
        if self.bias is not None:
            blocks.append(self.bias.grad if self.bias.grad is not None else self.weight.grad.new_zeros(self.d_out))
        return blocks

    @property
    def d_out(self) -> int:
        """The rows of the weight as a ``(d_out, d_in)`` matrix."""
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    def _weight_grad(self) -> Tensor:
        """The weight's gradient, ``(d_out, ...)``: a transposed view for a Conv1D."""
        return self.weight.grad.T if self.transposed else self.weight.grad

    def gradient_matrix(self, dtype: torch.dtype) -> Tensor:
        """``(d_out, d_A)`` ``[∇W | ∇b]`` in ``dtype`` (a zero bias column for a bias without a gradient)."""
        grad = self._weight_grad().reshape(self.d_out, self.d_in)
        if self.bias is None:
            return grad if grad.dtype == dtype else grad.to(dtype)
        if self.bias.grad is None:
            return torch.cat([grad.to(dtype), grad.new_zeros(self.d_out, 1, dtype=dtype)], dim=1)
        matrix = torch.cat([grad, self.bias.grad.unsqueeze(1)], dim=1)
        return matrix if matrix.dtype == dtype else matrix.to(dtype)

    def write_gradient(self, update: Tensor) -> None:
        """Copy a ``(d_out, d_A)`` ``[∇W | ∇b]`` update into the layer's gradients."""
        grad = self._weight_grad()
        grad.copy_(update[:, : self.d_in].view(grad.shape))
        if self.bias is not None and self.bias.grad is not None:
            self.bias.grad.copy_(update[:, self.d_in])


def _skipped(name: str, module: nn.Module, skip: list[str | type]) -> bool:
    """Whether skip names the module, one of its ancestors, its class, or a type it is an instance of."""
    for entry in skip:
        if isinstance(entry, type):
            if isinstance(module, entry):
                return True
        elif entry in (name, type(module).__name__) or name.startswith(entry + "."):
            return True
    return False


def preconditioned_layers(model: nn.Module, skip_layers: Iterable[str | type[nn.Module]]) -> list[PreconditionedLayer]:
    """The model's Linear, one-group Conv2d and Conv1D layers not skipped, validated by :func:`supported_layers`.

    Raises:
        ValueError: on an unsupported trainable layer that is not skipped (named), a
            ``skip_layers`` entry that names nothing in the model, or no layer left.
    """
    skip = list(skip_layers)
    names = {name for name, _ in model.named_modules()}
    classes = {type(m).__name__ for _, m in model.named_modules()}
    for entry in skip:
        if isinstance(entry, str):
            if entry not in names and entry not in classes:
                raise ValueError(
                    f"skip_layers names {entry!r}, which is neither a module nor a module class of the model"
                )
        elif not (isinstance(entry, type) and issubclass(entry, nn.Module)):
            raise ValueError(f"skip_layers entries must be module names, class names or nn.Module types, got {entry!r}")
    # supported_layers checks every trainable layer; skipped ones are frozen for the check only,
    # so that an unsupported layer can be left to the plain gradient by naming it.
    frozen = [
        p for name, m in model.named_modules() if _skipped(name, m, skip) for p in m.parameters() if p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        layers = supported_layers(model)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    # An nn.MultiheadAttention's projections run inside its functional forward, never as modules: plain gradients.
    attention = {
        f"{n}.{part}"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for part in ("in_proj", "out_proj")
    }
    kron = [
        PreconditionedLayer(name, m, m.weight, trainable_bias(m), weight_shape(m)[1], is_transposed_linear(m))
        for name, m in layers
        if has_kron_factors(m) and name not in attention
    ]
    if not kron:
        raise ValueError("the model has no trainable Linear or Conv2d layer left to precondition")
    return kron
