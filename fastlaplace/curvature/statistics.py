"""One batch through the model: each supported layer's inputs and output gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlaplace.curvature import memory
from fastlaplace.curvature.attention import in_projection, through_projections
from fastlaplace.curvature.column_backward import (
    PLAIN_BACKWARD_ROWS,
    Target,
    backpropagate,
    batches_backward,
    each_column,
    falls_back,
)
from fastlaplace.curvature.layout import is_transposed_linear, weight_block
from fastlaplace.curvature.loss import output_gradient_columns
from fastlaplace.curvature.memory import check_allocation
from fastlaplace.curvature.model_io import call_model
from fastlaplace.curvature.norms import (
    RMS_NORM_LIKE_NAME,
    check_layer_norm_2d_output,
    check_rms_norm_output,
    is_layer_norm_2d,
    is_rms_norm_like,
    layer_norm_2d,
    normalised,
)
from fastlaplace.curvature.pointwise import collapsed_pointwise_modules
from fastlaplace.curvature.relu_max_pool import relu_max_pool_folded

#: layers with Kronecker factors (a weight applied to input vectors); transformers' Conv1D too
#: (see :func:`has_kron_factors`), recognised without importing transformers
KRON_LAYERS = (nn.Linear, nn.Conv2d)
#: layers that scale (and shift) each feature of a normalised input
AFFINE_LAYERS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
SUPPORTED_LAYERS = (*KRON_LAYERS, nn.Embedding, *AFFINE_LAYERS)
#: the input dimensions each layer type accepts
INPUT_DIMS = {
    nn.Linear: (2, 3, 4),
    nn.Conv2d: (4,),
    nn.Embedding: (1, 2),
    nn.LayerNorm: (2, 3, 4),
    nn.RMSNorm: (2, 3, 4),
    nn.BatchNorm1d: (2,),
    nn.BatchNorm2d: (4,),
    nn.GroupNorm: (4,),
}
#: the name the error messages give transformers' Conv1D among the supported layers
TRANSPOSED_LINEAR_NAME = "transformers Conv1D"


def is_affine(module: nn.Module) -> bool:
    """Whether the layer scales (and shifts) each feature of a normalised input: unit-wise curvature blocks."""
    return isinstance(module, AFFINE_LAYERS) or is_rms_norm_like(module)


def has_kron_factors(module: nn.Module) -> bool:
    """Whether the layer is a Linear, Conv2d (one group) or transformers Conv1D (Kronecker-factored curvature)."""
    return (isinstance(module, KRON_LAYERS) and not is_grouped_conv(module)) or is_transposed_linear(module)


def is_grouped_conv(module: nn.Module) -> bool:
    """Whether the layer is a Conv2d with ``groups > 1`` (a depthwise convolution among them)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1


def has_unitwise_blocks(module: nn.Module) -> bool:
    """Whether the Kron posterior gives the layer one exact block per output unit: norm layers, grouped Conv2d.

    A grouped convolution's output channel sees only its group's ``C_in / groups`` input
    channels: its ``(C_in / groups · kh · kw [+ 1])`` weights are one small block (10 for a
    3 x 3 depthwise filter with a bias), kept exactly instead of Kronecker-factored.
    """
    return is_affine(module) or is_grouped_conv(module)


def conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """The Conv2d's zero padding as numbers: ``"valid"`` is 0, ``"same"`` half the dilated kernel.

    ``"same"`` with an even dilated kernel, which torch pads unevenly, is refused by
    :func:`supported_layers`.
    """
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size, strict=True))
    return tuple(module.padding)


def is_supported(module: nn.Module) -> bool:
    """Whether the layer is of a supported type (or a subclass of one)."""
    return isinstance(module, SUPPORTED_LAYERS) or is_transposed_linear(module) or is_rms_norm_like(module)


Layers = list[tuple[str, nn.Module]]


def trainable_bias(module: nn.Module) -> Tensor | None:
    """The module's bias if it has one that requires grad (it then belongs to the posterior)."""
    bias = getattr(module, "bias", None)
    return bias if bias is not None and bias.requires_grad else None


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's parameters as one ``(d_out, d_A)`` matrix ``[W | b]`` (detached copy).

    Linear: ``(d_out, d_in + 1)``; Conv2d: the kernel as ``(C_out, C_in kh kw)`` (+ bias);
    transformers Conv1D: its ``(d_in, d_out)`` weight transposed (+ bias), as a Linear's;
    Embedding: the table ``(V, d)``; LayerNorm / BatchNorm: ``(d, 2)`` rows ``[γ_o, β_o]``.
    """
    w = weight_block(module).detach()
    bias = trainable_bias(module)
    if bias is not None:
        w = torch.cat([w, bias.detach().unsqueeze(-1)], dim=-1)
    return w.clone()


@dataclass
class LayerStatistics:
    """What one layer contributes for one batch.

    A Conv2d is a Linear layer applied at every output location to the patch that
    location sees (``weight.flatten(1)`` order), and a Linear layer on a sequence is
    applied at every token: all expose the same per-location view through
    :meth:`patches` and :meth:`location_grads` (one location for a plain Linear).
    Embedding, LayerNorm and BatchNorm layers have no Kronecker view; they expose their
    per-sample gradients (:meth:`weight_gradients`) in the layout of :func:`weight_matrix`.

    Attributes:
        name: the layer's name in ``model.named_modules()``.
        module: the layer.
        inputs: its inputs (detached): ``(N, d_in)`` or ``(N, T, d_in)`` for Linear and
            LayerNorm, ``(N, C, H, W)`` for Conv2d and BatchNorm2d, ``(N, C)`` for
            BatchNorm1d, ``(N,)`` or ``(N, T)`` token ids for Embedding.
        output_grads: the curvature columns backpropagated to its output (detached):
            ``(N, K, d_out)`` or ``(N, K, T, d_out)``, ``(N, K, C_out, H', W')`` for
            Conv2d and BatchNorm2d.
    """

    name: str
    module: nn.Module
    inputs: Tensor
    output_grads: Tensor
    #: where :meth:`patches` and :meth:`normalised_inputs` keep what they computed, shared by the parts of a
    #: batch (:func:`layer_statistic_parts`); None: computed at each call
    derived: dict[str, Tensor] | None = None

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a trainable bias (the factor gets a ones column)."""
        return trainable_bias(self.module) is not None

    @property
    def is_conv(self) -> bool:
        """Whether the layer is a Conv2d."""
        return isinstance(self.module, nn.Conv2d)

    @property
    def has_kron_factors(self) -> bool:
        """Whether the layer is a Linear, Conv2d or Conv1D (Kronecker-factored curvature)."""
        return has_kron_factors(self.module)

    @property
    def channels_first(self) -> bool:
        """Whether outputs are ``(N, C, H, W)`` (Conv2d, BatchNorm2d, GroupNorm, LayerNorm2d)."""
        return is_channels_first(self.module)

    @property
    def shares_weights(self) -> bool:
        """Whether the weights are applied at several locations (images, tokens)."""
        if self.channels_first:
            return True
        return self.inputs.dim() == (2 if isinstance(self.module, nn.Embedding) else 3)

    @property
    def is_plain_linear(self) -> bool:
        """A Linear layer applied once per sample: the closed forms of the fused operators apply."""
        return self.has_kron_factors and not self.shares_weights

    @property
    def locations(self) -> int:
        """Output locations (or tokens) per sample; 1 for a layer applied once per sample."""
        if self.channels_first:
            return self.output_grads[0, 0, 0].numel()
        return self.inputs.shape[1] if self.shares_weights else 1

    def patches(self) -> Tensor:
        """``(N, L, d_A)`` the input each output location sees, with the ones column of a bias."""
        return self._derived("patches", self._patches)

    def _patches(self) -> Tensor:
        if self.is_conv:
            m = self.module
            u = nn.functional.unfold(self.inputs, m.kernel_size, m.dilation, conv_padding(m), m.stride).transpose(1, 2)
        else:
            u = self.inputs if self.inputs.dim() == 3 else self.inputs.unsqueeze(1)
        if self.has_bias:
            u = torch.cat([u, u.new_ones(*u.shape[:2], 1)], dim=-1)
        return u

    def location_grads(self) -> Tensor:
        """``(N, K, L, d_out)`` the backpropagated columns at every output location.

        An Embedding's ``padding_idx`` tokens get zeros (see :meth:`kept_tokens`).
        """
        if self.channels_first:
            return self.output_grads.flatten(3).transpose(2, 3)
        grads = self.output_grads if self.output_grads.dim() == 4 else self.output_grads.unsqueeze(2)
        kept = self.kept_tokens()
        return grads if kept is None else grads * kept.to(grads.dtype)[:, None, :, None]

    def token_ids(self) -> Tensor:
        """An Embedding's ``(N, L)`` token ids."""
        return (self.inputs if self.inputs.dim() == 2 else self.inputs.unsqueeze(1)).long()

    def kept_tokens(self) -> Tensor | None:
        """An Embedding's ``(N, L)`` tokens that are not its ``padding_idx`` (None: every token, or no Embedding).

        torch never updates the ``padding_idx`` row (its gradient is 0 by definition): those
        tokens reach no weight of the posterior.
        """
        if not isinstance(self.module, nn.Embedding) or self.module.padding_idx is None:
            return None
        return self.token_ids() != self.module.padding_idx

    def normalised_inputs(self) -> Tensor:
        """``(N, L, d)`` what a norm layer scales by γ: its input, normalised as the layer did."""
        return self._derived("normalised_inputs", self._normalised_inputs)

    def _derived(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, kept in :attr:`derived` (if any) for the other parts of the batch."""
        if self.derived is None:
            return compute()
        if name not in self.derived:
            self.derived[name] = compute()
        return self.derived[name]

    def _normalised_inputs(self) -> Tensor:
        m, x = self.module, self.inputs
        if isinstance(m, nn.GroupNorm):  # each sample's groups of channels by their own statistics
            x = nn.functional.group_norm(x, m.num_groups, eps=m.eps)
        elif is_layer_norm_2d(m):  # each pixel's channels
            return layer_norm_2d(m, x, affine=False).flatten(1, 2)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Running statistics: a BatchNorm normalising by the batch's own is refused (model_io.check_deterministic).
            x = nn.functional.batch_norm(x, m.running_mean, m.running_var, training=False, eps=m.eps)
        else:
            x = normalised(m, x)
            return x if x.dim() == 3 else x.unsqueeze(1)
        return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x.unsqueeze(1)

    def token_pairs(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """An Embedding's columns summed over the tokens of each distinct (sample, token) pair.

        A sample's gradient w.r.t. table row v is the sum of its columns at the tokens equal
        to v; this gives those sums without a ``(N, K, V, d)`` gradient.

        Args:
            dtype: the dtype the columns are summed in (theirs by default).

        Returns:
            ``(samples, tokens, sums)``: the ``(P,)`` sample and token of each pair present in
            the batch, and ``(P, K, d)`` the columns summed over the pair's tokens.
        """
        vocabulary = self.module.num_embeddings
        ids = self.token_ids()
        pair = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) * vocabulary + ids
        pairs, which = torch.unique(pair.flatten(), return_inverse=True)
        grads = self.location_grads().transpose(1, 2).flatten(0, 1)  # (N L, K, d)
        grads = grads if dtype is None else grads.to(dtype)
        sums = grads.new_zeros(pairs.numel(), *grads.shape[1:]).index_add_(0, which, grads)
        return pairs // vocabulary, pairs % vocabulary, sums

    def weight_gradients(self) -> Tensor:
        """``(N, K, d_out * d_A)``: each column as a gradient w.r.t. :func:`weight_matrix`, row-major."""
        grads = self.location_grads()
        if isinstance(self.module, nn.Embedding):
            one_hot = nn.functional.one_hot(self.token_ids(), self.module.num_embeddings).to(grads.dtype)
            return torch.einsum("nklo,nlv->nkvo", grads, one_hot).flatten(2)
        if is_affine(self.module):
            parts = [torch.einsum("nklo,nlo->nko", grads, self.normalised_inputs().to(grads.dtype))]
            if self.has_bias:
                parts.append(grads.sum(2))
            return torch.stack(parts, dim=-1).flatten(2)
        patches = self.patches().to(self.output_grads.dtype)
        if not is_grouped_conv(self.module):
            return torch.einsum("nklo,nla->nkoa", grads, patches).flatten(2)
        # Output channel o of group j sees input features [j a, (j + 1) a) of the patch, a = C_in / groups · kh · kw.
        groups, a = self.module.groups, self.module.weight[0].numel()
        per_group = patches[..., : groups * a].unflatten(-1, (groups, a))  # (N, L, groups, a)
        weights = torch.einsum("nklgo,nlga->nkgoa", grads.unflatten(-1, (groups, -1)), per_group).flatten(2, 3)
        if self.has_bias:
            weights = torch.cat([weights, grads.sum(2).unsqueeze(-1)], dim=-1)
        return weights.flatten(2)


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with trainable parameters, all of a supported type, in model order.

    Raises:
        ValueError: if a module with trainable parameters is not supported, or if the
            model has no trainable supported layer.
    """
    layers = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.MultiheadAttention):  # its raw input projection, as a Linear layer
            name, module = f"{name}.in_proj", in_projection(name, module)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"layer {name!r} (Conv2d) needs padding_mode='zeros'; got padding_mode={module.padding_mode!r}"
                )
            if module.padding == "same" and any(
                d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)
            ):
                raise ValueError(
                    f"layer {name!r} (Conv2d) has padding='same' with an even kernel {tuple(module.kernel_size)} "
                    f"(dilation {tuple(module.dilation)}), which torch pads unevenly: not supported; pad the input "
                    "explicitly"
                )
        if not is_supported(module):
            kinds = _supported_kinds()
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) has trainable parameters {own} but is not "
                f"supported; supported layers: {kinds} (set requires_grad=False on them to leave them out)"
            )
        if isinstance(module, nn.LayerNorm | nn.RMSNorm) and len(module.normalized_shape) != 1:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) must normalise the last dimension only, got "
                f"normalized_shape={tuple(module.normalized_shape)}"
            )
        if not module.weight.requires_grad:
            raise ValueError(f"layer {name!r}: a trainable bias with a frozen weight is not supported")
        check_plain_forward(name, module)
        layers.append((name, module))
    if not layers:
        kinds = _supported_kinds()
        raise ValueError(f"the model has no trainable layer of a supported type ({kinds})")
    _check_unshared(model, layers)
    return layers


def _supported_kinds() -> str:
    return ", ".join([*(t.__name__ for t in SUPPORTED_LAYERS), TRANSPOSED_LINEAR_NAME, RMS_NORM_LIKE_NAME])


def is_channels_first(module: nn.Module) -> bool:
    """Whether the layer works on ``(N, C, H, W)`` images: Conv2d, BatchNorm2d, GroupNorm, LayerNorm2d."""
    return isinstance(module, nn.Conv2d | nn.BatchNorm2d | nn.GroupNorm) or is_layer_norm_2d(module)


def as_tokens(module: nn.Module, tensor: Tensor, first: int = 1) -> Tensor:
    """A token layer's ``(..., H, W, d)`` grid of tokens from dimension ``first`` on as ``(..., H W, d)``.

    A Linear or a norm applied to channels-last images (ConvNeXt's and Swin's blocks) sees
    each of the ``H W`` positions as a token; channels-first layers keep their layout.
    """
    if tensor.dim() <= first + 2 or is_channels_first(module):
        return tensor
    return tensor.flatten(first, -2)


def check_plain_forward(name: str, module: nn.Module) -> None:
    """Refuse a subclass of a supported layer with a forward of its own: its curvature is not the base's.

    A ``LayerNorm2d`` is the exception: its output is checked on every batch instead.

    Raises:
        ValueError: naming the layer and its class.
    """
    base = next((t for t in INPUT_DIMS if isinstance(module, t)), None)
    if base is not None and type(module).forward is not base.forward and not is_layer_norm_2d(module):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) subclasses {base.__name__} with a forward of its own, whose "
            f"curvature is not a {base.__name__}'s; freeze it (requires_grad=False) or use a plain {base.__name__}"
        )


def _check_unshared(model: nn.Module, layers: Layers) -> None:
    """Refuse trainable parameters that a layer shares with another module (tied weights).

    Each layer's block would count only its own use of the shared tensor: the curvature of
    the sum of both uses has cross terms that no per-layer structure holds.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if p.requires_grad and name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    for name, module in layers:
        for p in module.parameters(recurse=False):
            if len(owners[id(p)]) > 1:
                raise ValueError(
                    f"layer {name!r} shares a trainable parameter with {[n for n in owners[id(p)] if n != name]} "
                    "(tied weights); the curvature of a shared parameter is not supported: untie them, or freeze "
                    "the shared parameter (requires_grad=False)"
                )


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, by one reduction where it can."""
    # One reduction instead of isfinite's several elementwise passes; NaN and Inf survive a
    # sum, and a sum that overflows falls back to the exact test.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _batch_size(x: Tensor | Mapping) -> int:
    """N of a model's inputs: a tensor's first dimension, or the largest first dimension in a dict of them."""
    if isinstance(x, Tensor):
        return x.shape[0]
    return max((v.shape[0] for v in x.values() if isinstance(v, Tensor) and v.dim() > 0), default=0)


def _input_dims(module: nn.Module) -> tuple[int, ...]:
    """The input dimensions the (possibly subclassed) supported module accepts; a Conv1D's are a Linear's."""
    if is_rms_norm_like(module):
        return INPUT_DIMS[nn.RMSNorm]
    if is_layer_norm_2d(module):
        return (4,)
    return next((dims for t, dims in INPUT_DIMS.items() if isinstance(module, t)), INPUT_DIMS[nn.Linear])


@dataclass
class _ColumnPass:
    """One forward with every layer's input and pre-activation captured, and the columns to backpropagate."""

    output: Tensor  # what the forward returned (autocast precision), in the graph
    exact_output: Tensor  # the output the columns were computed from
    layers: Layers
    inputs: list[Tensor]
    pre_activations: list[Target]
    columns: Tensor  # (K, N, C)

    @property
    def inner(self) -> list[int]:
        """The layers a backward reaches: those whose output is not the model's output.

        A layer whose output is the model's output (a last layer) gets the columns
        themselves: no backward pass, which a last-layer posterior then does not need at all.
        """
        return [i for i, t in enumerate(self.pre_activations) if not t.is_unchanged(self.output)]

    def checked(self, grads: list[Tensor]) -> list[Tensor]:
        """Raise on NaN / Inf in a layer's backpropagated columns (the layer is named); grids of tokens flattened."""
        for (name, _), grad in zip(self.layers, grads, strict=True):
            if not all_finite(grad):
                raise ValueError(f"the output gradients of layer {name!r} contain NaN or Inf")
        return [as_tokens(m, g, first=2) for (_, m), g in zip(self.layers, grads, strict=True)]

    def all_columns(self, batched: bool, create_graph: bool) -> list[Tensor]:
        """Per layer ``(K, *pre_activation.shape)`` every column backpropagated to it."""
        grads = [self.columns] * len(self.layers)
        inner = self.inner
        if inner:
            targets = [self.pre_activations[i] for i in inner]
            backpropagated = backpropagate(self.output, targets, self.columns, batched, create_graph)
            for i, grad in zip(inner, backpropagated, strict=True):
                grads[i] = grad
        return self.checked(grads)

    def one_column_at_a_time(self, model: nn.Module) -> bool:
        """Whether the columns go back in plain backwards, one at a time.

        Always for a model whose backward torch's vmap does not batch (convolutions...);
        for one whose graph merely falls back somewhere (LayerNorm, GELU, attention), once
        its layers see :data:`~fastlaplace.curvature.column_backward.PLAIN_BACKWARD_ROWS`
        rows per column (a transformer's tokens).
        """
        if not self.inner:
            return False
        if not batches_backward(model):
            return True
        rows = max(t.numel() // t.shape[-1] for t in (self.pre_activations[i].tensor for i in self.inner))
        return rows >= PLAIN_BACKWARD_ROWS and falls_back(self.output)

    def each_column(self) -> Iterator[list[Tensor]]:
        """Per column k, per layer ``(1, *pre_activation.shape)``: column k backpropagated (plain backwards)."""
        inner = self.inner
        targets = [self.pre_activations[i] for i in inner]
        for k, backpropagated in enumerate(each_column(self.output, targets, self.columns)):
            grads = [self.columns[k : k + 1]] * len(self.layers)
            for i, grad in zip(inner, backpropagated, strict=True):
                grads[i] = grad.unsqueeze(0)
            yield self.checked(grads)


def _forward_for_columns(
    model: nn.Module,
    x: Tensor,
    make_columns: Callable[[Tensor], Tensor],
    layers: Layers | None,
    compute_dtype: torch.dtype | None,
    output_layer: bool,
    shortcuts: bool = False,
) -> _ColumnPass:
    """Forward x with every layer's input and output captured, check them, and make the ``(K, N, C)`` columns.

    With ``shortcuts`` (a pass backpropagated without ``create_graph``), activations written
    as chains of elementwise ops go back as one product per column
    (:mod:`fastlaplace.curvature.pointwise`), and max-pooling of a ReLU's output straight to
    the ReLU's input (:mod:`fastlaplace.curvature.relu_max_pool`).
    """
    layers = supported_layers(model) if layers is None else layers
    # Per layer: its input, the input's version, its output (None: not in the autograd graph)
    captured: dict[str, tuple[Tensor, int, Target | None]] = {}
    size = _batch_size(x)

    def capture(name):
        def hook(module, inputs, output):
            if name in captured:
                raise ValueError(
                    f"layer {name!r} ran more than once in one forward (a layer reused or a weight shared across "
                    "calls); its curvature is not supported: freeze it (requires_grad=False)"
                )
            ids = inputs[0]
            if isinstance(module, nn.Embedding) and ids.dim() > 1 and ids.shape[0] == 1 < size:
                # One row of ids for the whole batch (GPT-2's position ids, arange(T)[None]): its output is
                # broadcast over the batch. Broadcast it here instead (the same values downstream), so that
                # each sample's gradient reaches its own copy and the layer gets per-sample curvature.
                ids, output = ids.expand(size, *ids.shape[1:]), output.expand(size, *output.shape[1:])
            captured[name] = (ids, ids._version, Target.of(output) if output.requires_grad else None)
            return output  # the module's own output, or its broadcast

        return hook

    handles = [module.register_forward_hook(capture(name)) for name, module in layers]
    device = layers[0][1].weight.device.type
    try:
        with torch.enable_grad(), torch.autocast(device, compute_dtype, enabled=compute_dtype is not None):
            with ExitStack() as stack:
                stack.enter_context(through_projections(model, [m for _, m in layers]))
                if shortcuts:
                    stack.enter_context(collapsed_pointwise_modules(model))
                    stack.enter_context(relu_max_pool_folded(model))
                output = call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    exact_output = output
    if compute_dtype is not None:
        with torch.no_grad():
            exact_output = call_model(model, x)
    if not all_finite(exact_output):
        raise ValueError("the model's output contains NaN or Inf")
    idle = [name for name, _ in layers if name not in captured]
    if idle:
        raise ValueError(
            f"layers {idle} have trainable parameters but did not run in the model's forward; freeze them "
            "(requires_grad=False) to leave them out"
        )
    for name, _ in layers:
        ids, version, target = captured[name]
        if target is None:
            raise ValueError(
                f"layer {name!r} ran without autograd (under torch.no_grad, or inside a reentrant "
                "torch.utils.checkpoint): no gradient reaches it; run it with gradients enabled (a checkpoint "
                "with use_reentrant=False works)"
            )
        if ids._version != version:
            raise ValueError(
                f"the input of layer {name!r} was changed in place after the layer ran (an in-place op of the "
                "model's forward, such as ReLU(inplace=True) or +=, on that tensor); its curvature needs the values "
                "the layer saw: make that op out of place"
            )
    if output_layer and not captured[layers[-1][0]][2].is_unchanged(output):
        per_token = captured[layers[-1][0]][2].tensor.dim() > output.dim()
        raise ValueError(
            f"the last-layer posterior's layer {layers[-1][0]!r} does not produce the model's output (the model "
            "computes further from it, in place or not, or another module runs after it); name the layer that does "
            "with last_layer_name, or make it the model's last operation"
            + (
                "; a head applied to every token whose outputs the model then picks from (a Hugging Face sequence "
                "classifier's score) takes feature_reduction='pick_last' with last_layer_name"
                if per_token
                else ""
            )
        )
    for name, module in layers:
        a = captured[name][0]
        if is_rms_norm_like(module):
            check_rms_norm_output(name, module, a, captured[name][2].tensor)
        if is_layer_norm_2d(module) and a.dim() == 4:
            check_layer_norm_2d_output(name, module, a, captured[name][2].tensor)
        allowed = _input_dims(module)
        if a.dim() not in allowed:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) got an input of shape {tuple(a.shape)}; "
                f"it accepts inputs with {' or '.join(map(str, allowed))} dimensions (batch first)"
            )
        if a.shape[0] != exact_output.shape[0]:
            if a.dim() == 3 and a.shape[1] == exact_output.shape[0]:
                raise ValueError(
                    f"layer {name!r} got an input of shape {tuple(a.shape)}: sequence first, (T, N, d), for the "
                    f"batch of {exact_output.shape[0]}; layers take the batch first: build the model with "
                    "batch_first=True (nn.TransformerEncoderLayer, nn.MultiheadAttention)"
                )
            raise ValueError(
                f"layer {name!r} got an input of shape {tuple(a.shape)}, not one row per sample of the batch of "
                f"{exact_output.shape[0]}: a layer shared by the whole batch (such as a position embedding of "
                "arange(T)) has no per-sample curvature; give it (N, ...) inputs (a HuggingFace model: position_ids of "
                "shape (N, T) in the dict batch) or freeze it"
            )
    columns = make_columns(exact_output).to(output.dtype).permute(2, 0, 1).contiguous()  # (K, N, C)
    return _ColumnPass(
        output,
        exact_output,
        layers,
        [as_tokens(module, captured[name][0]) for name, module in layers],
        [captured[name][2] for name, _ in layers],
        columns,
    )


def backpropagate_columns(
    model: nn.Module,
    x: Tensor,
    make_columns: Callable[[Tensor], Tensor],
    layers: Layers | None,
    compute_dtype: torch.dtype | None = None,
    create_graph: bool = False,
    output_layer: bool = False,
) -> tuple[Tensor, Layers, list[Tensor], list[Tensor]]:
    """Forward x, then backpropagate ``make_columns(output)`` (N, C, K) to the layers.

    The building block of :func:`layer_statistics` and :func:`output_jacobians`, public for
    curvature backends with columns of their own (:mod:`fastlaplace.integrations`).

    The columns go back in one batched backward, or one plain backward each for models
    whose backward torch's vmap does not batch (:mod:`fastlaplace.curvature.column_backward`).
    Without ``create_graph`` the backward takes the shortcuts of :func:`_forward_for_columns`
    (composed activations, a ReLU's max-pooling). With ``compute_dtype`` (bf16 / fp16) the
    forward and the backward run under autocast, and one more forward without autograd
    gives the exact output the loss and the columns are computed from.

    With ``output_layer`` (a last-layer posterior) the last of the layers must produce the
    model's output itself: the closed forms of a last layer take its output Jacobian as the
    identity.

    Returns the output, the layers (all supported ones by default), their inputs
    ``(N, d_in)`` and the backpropagated columns ``(N, K, d_out)`` at their
    pre-activations: detached, or with ``create_graph`` still differentiable w.r.t. x.
    """
    forward = _forward_for_columns(model, x, make_columns, layers, compute_dtype, output_layer, not create_graph)
    grads = forward.all_columns(batches_backward(model), create_graph)

    def keep(t: Tensor) -> Tensor:
        return t if create_graph else t.detach()

    inputs = [keep(a) for a in forward.inputs]
    return keep(forward.exact_output), forward.layers, inputs, [keep(g).transpose(0, 1) for g in grads]


def layer_statistics(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    likelihood: str,
    mode: str = "ggn",
    generator: torch.Generator | None = None,
    layers: Layers | None = None,
    compute_dtype: torch.dtype | None = None,
    output_noise: Tensor | None = None,
    output_layer: bool = False,
) -> tuple[Tensor, list[LayerStatistics]]:
    """Run one batch and collect every supported layer's inputs and output gradients.

    The K curvature columns of :func:`output_gradient_columns` are backpropagated in one
    batched backward pass (``is_grads_batched``), so a layer's GGN contribution is
    ``Σ_n Σ_k (g_nk g_nkᵀ) ⊗ (a_n a_nᵀ)`` in the row-major ``[W | b]`` order.

    Args:
        model: the network; its output must be ``(N, C)``.
        x: ``(N, ...)`` a batch of inputs.
        target: the batch's targets (see :func:`output_gradient_columns`).
        likelihood: ``"classification"`` or ``"regression"``.
        mode: ``"ggn"``, ``"mc"`` or ``"ef"``.
        generator: random source for ``mode="mc"``.
        layers: the ``(name, module)`` layers to collect; all supported ones by default.
        compute_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the pass's matrix
            products in that precision (autocast); the output stays exact.
        output_noise: ``(C,)`` per-output σ of a regression: output c's curvature columns
            are divided by σ_c, so that H includes it.
        output_layer: the last layer must produce the output (see :func:`backpropagate_columns`).

    Returns:
        ``(output, statistics)``: the detached ``(N, C)`` output and one entry per layer.

    Raises:
        ValueError: on an unsupported layer, a layer input that is not ``(N, d_in)``, or
            NaN / Inf in the output or in a layer's output gradients (the layer is named).
    """
    columns = _curvature_columns(target, likelihood, mode, generator, output_noise)
    output, layers, inputs, grads = backpropagate_columns(
        model, x, columns, layers, compute_dtype, output_layer=output_layer
    )
    stats = [LayerStatistics(n, m, a, g) for (n, m), a, g in zip(layers, inputs, grads, strict=True)]
    return output, stats


def layer_statistic_parts(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    likelihood: str,
    mode: str = "ggn",
    generator: torch.Generator | None = None,
    layers: Layers | None = None,
    compute_dtype: torch.dtype | None = None,
    output_noise: Tensor | None = None,
    output_layer: bool = False,
) -> tuple[Tensor, Iterator[list[LayerStatistics]]]:
    """:func:`layer_statistics` in parts of the K columns, each backpropagated when its part is taken.

    For a model whose backward torch's vmap does not batch
    (:mod:`fastlaplace.curvature.column_backward`), each column is one plain backward
    pass: part k holds column k alone (``output_grads`` ``(N, 1, ...)``), a view of what
    the backward returned. Nothing stacks the K columns, and only one column of every
    layer is held at a time if each part is dropped before the next is taken. Otherwise
    (one batched backward, or no layer a backward reaches) there is one part with every
    column. Every part repeats the layers' inputs. Sums over the columns (the GGN, the
    Kronecker factor G) are the sums over the parts; what depends on the inputs alone is
    the first part's.

    Arguments as for :func:`layer_statistics`; the iterator's parts must be taken in order
    and before the next batch's forward (the graph is retained until the last part).

    Returns:
        ``(output, parts)``: the detached ``(N, C)`` output and the parts, per part one
        entry per layer.
    """
    columns = _curvature_columns(target, likelihood, mode, generator, output_noise)
    forward = _forward_for_columns(model, x, columns, layers, compute_dtype, output_layer, shortcuts=True)
    inputs = [a.detach() for a in forward.inputs]
    derived: list[dict[str, Tensor]] = [{} for _ in inputs]  # patches, normalised inputs: once per batch

    def part(grads: list[Tensor]) -> list[LayerStatistics]:
        return [
            LayerStatistics(n, m, a, g.detach().transpose(0, 1), kept)
            for (n, m), a, g, kept in zip(forward.layers, inputs, grads, derived, strict=True)
        ]

    def parts() -> Iterator[list[LayerStatistics]]:
        if forward.one_column_at_a_time(model):
            yield from map(part, forward.each_column())
        else:
            yield part(forward.all_columns(batched=True, create_graph=False))

    return forward.exact_output.detach(), parts()


def _curvature_columns(
    target: Tensor, likelihood: str, mode: str, generator: torch.Generator | None, output_noise: Tensor | None
) -> Callable[[Tensor], Tensor]:
    """The ``(N, C, K)`` columns of :func:`output_gradient_columns` of an output, divided by the per-output σ."""

    def columns(out: Tensor) -> Tensor:
        result = output_gradient_columns(out, target, likelihood, mode, generator)
        if output_noise is None:
            return result
        if output_noise.shape != (result.shape[1],):
            raise ValueError(
                f"the per-output noise has {output_noise.numel()} entries but the model has {result.shape[1]} outputs"
            )
        return result / output_noise.to(result.dtype).unsqueeze(-1)

    return columns


def output_jacobians(
    model: nn.Module, x: Tensor, layers: Layers | None = None, create_graph: bool = False, output_layer: bool = False
) -> tuple[Tensor, list[LayerStatistics]]:
    """Every layer's input and the Jacobian ``B`` of the output w.r.t. its pre-activation.

    ``layers`` and ``output_layer`` as in :func:`layer_statistics`; with ``create_graph``
    everything returned stays differentiable w.r.t. x (for gradients of the predictive).

    Returns:
        ``(output, statistics)`` with ``statistics[l].output_grads`` of shape
        ``(N, C, d_out)``: row c is the gradient of output c (one batched backward).
    """

    def identity(out):
        if out.dim() != 2:
            raise ValueError(f"the model's output must be (N, C), got shape {tuple(out.shape)}")
        n, c = out.shape
        check_allocation(
            f"the output Jacobians' identity columns, one backward per output (C = {c})",
            (c, n, c),
            out.dtype,
            "use pred_type='nn' (the sampling predictive) or a last-layer posterior (its GLM needs no columns)"
            + (", or fewer inputs per call" if memory.fits((c, c), out.dtype) else ""),
        )
        return torch.eye(c, dtype=out.dtype, device=out.device).expand(n, -1, -1)

    output, layers, inputs, grads = backpropagate_columns(
        model, x, identity, layers, create_graph=create_graph, output_layer=output_layer
    )
    return output, [LayerStatistics(n, m, a, g) for (n, m), a, g in zip(layers, inputs, grads, strict=True)]
