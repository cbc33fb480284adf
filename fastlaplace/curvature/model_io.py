"""How a model is called on a batch's inputs, and how its logits are read from what it returns.

Inputs: a tensor is the model's one argument. A dict goes to a HuggingFace model (one with
``main_input_name``, as ``transformers.PreTrainedModel`` and peft's ``PeftModel``) as keyword
arguments, ``model(**x)``; to any other model whole, as its one argument (laplace-torch's
convention for the wrappers it documents).

Outputs, read by :func:`model_logits`: a tensor is the logits; a ``ModelOutput`` (any object with
a ``logits`` attribute) gives ``.logits``, a dict its ``"logits"`` entry, a tuple or list its first
element. A model returning anything else is wrapped by the user in a module whose forward returns
the ``(N, C)`` logits tensor.

A model is called in the mode it is in, never switched: one whose dropout is in training mode
(random masks, so random curvature and predictions) or whose BatchNorm normalises by the
batch's statistics is refused by :func:`check_deterministic`, and a call that draws random
numbers (any other random module) by :func:`no_random_draws`, except in a training step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd


def model_arguments(model: nn.Module, x: Tensor | Mapping) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` to call ``model`` with on inputs ``x`` (see the module's rule)."""
    if isinstance(x, Mapping) and hasattr(model, "main_input_name"):
        return (), dict(x)
    return (x,), {}


def model_logits(output: Any) -> Tensor:
    """The logits tensor in a model's output: itself, ``.logits``, ``["logits"]`` or the first of a tuple.

    Raises:
        TypeError: for an output none of these rules reads, naming its type.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output:
        logits = output[0]
    else:
        logits = None
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"cannot read logits from the model's output of type {type(output).__name__}: fastlaplace reads a "
            "tensor, a ModelOutput's .logits, a dict's 'logits' or a tuple's first element; wrap the model in a "
            "module whose forward returns the (N, C) logits tensor"
        )
    return logits


def check_deterministic(model: nn.Module) -> None:
    """Refuse a model with dropout in training mode, or BatchNorm normalising by the batch's statistics.

    Dropout's outputs are random draws, not the network at θ. Attention modules (Hugging
    Face's among them) read their own ``training`` flag with their ``nn.Dropout``'s ``p``:
    the Dropout module is found in either case. Dropout with ``p=0`` is deterministic and
    allowed. A BatchNorm in training mode (or without running statistics) makes each
    output depend on the whole batch, so there is no per-sample curvature, and each
    forward would update its running statistics: a buffer of the user's model.

    Raises:
        ValueError: naming the first such module, its type (and a dropout's ``p``).
    """
    for name, module in model.named_modules():
        if isinstance(module, _DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"module {name or 'model'!r} ({type(module).__name__}, p={module.p}) is in training mode: its random "
                "masks would make the curvature and the predictions random; call model.eval() first "
                "(laplace-torch's fit switches the model to eval mode itself)"
            )
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            tracked = module.running_mean is not None
            raise ValueError(
                f"module {name or 'model'!r} ({type(module).__name__}) "
                + ("is in training mode" if tracked else "has no running statistics")
                + ": it normalises by each batch's statistics, so a sample's output depends on the rest of its batch "
                "(no per-sample curvature)"
                + (
                    "; every forward would also update its running statistics: call model.eval() first"
                    if tracked
                    else ""
                )
            )


_library_calls = threading.local()  # per thread: model calls the library is making (fits, predictives), not training


def in_library_call() -> bool:
    """Whether this thread's library is calling a model outside a training step (K-FAC's hooks then stand aside)."""
    return getattr(_library_calls, "depth", 0) > 0


@contextmanager
def _library_call(x: Tensor | Mapping) -> Iterator[None]:
    """A model call of the library on ``x``: marked for K-FAC's hooks, refused if it draws random numbers."""
    _library_calls.depth = getattr(_library_calls, "depth", 0) + 1
    try:
        with no_random_draws(x):
            yield
    finally:
        _library_calls.depth -= 1


@contextmanager
def no_random_draws(x: Tensor | Mapping) -> Iterator[None]:
    """Refuse a model call that draws random numbers: the model is random in its current mode.

    :func:`check_deterministic` names the modules known to be (dropout, BatchNorm); any other
    (torchvision's ``StochasticDepth`` and timm's ``DropPath`` in training mode, a random
    mask of the user's) advances the random generator (of the CPU, or of the CUDA device
    the inputs are on) during the call. Then the generator's state is put back and a
    ValueError raised. A deterministic forward draws nothing, whatever it computes.
    """
    tensors = [x] if isinstance(x, Tensor) else [v for v in x.values() if isinstance(v, Tensor)]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    before = [torch.get_rng_state(), *(torch.cuda.get_rng_state(i) for i in cuda)]
    yield
    after = [torch.get_rng_state(), *(torch.cuda.get_rng_state(i) for i in cuda)]
    if all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        return
    torch.set_rng_state(before[0])
    for i, state in zip(cuda, before[1:], strict=True):
        torch.cuda.set_rng_state(state, i)
    raise ValueError(
        "the model's forward draws random numbers: a module of it is random in its current mode (stochastic depth "
        "or drop-path in training mode, a random mask), so the curvature and the predictions would be; call "
        "model.eval() first"
    )


def call_model(
    model: nn.Module, x: Tensor | Mapping, parameters: Mapping[str, Tensor] | None = None, training: bool = False
) -> Tensor:
    """The ``(N, C)`` logits of ``model`` on ``x``, with ``parameters`` in place of some of its own if given.

    Outside a ``training`` step the model must be deterministic (:func:`check_deterministic`,
    :func:`no_random_draws`).
    """
    if not training:
        check_deterministic(model)
    args, kwargs = model_arguments(model, x)
    with nullcontext() if training else _library_call(x):
        output = (
            model(*args, **kwargs) if parameters is None else functional_call(model, dict(parameters), args, kwargs)
        )
    return model_logits(output)
