"""torch's ``nn.MultiheadAttention`` in self-attention: its input projection as a Linear layer of the posterior.

``nn.MultiheadAttention`` keeps its query / key / value projection as one raw ``(3E, E)``
parameter, ``in_proj_weight`` (and ``in_proj_bias``), applied inside
``F.multi_head_attention_forward``, and calls its ``out_proj`` Linear's weights there too,
not the module: no layer hook ever sees either. In self-attention (query, key and value the
same tensor, as in ``nn.TransformerEncoderLayer`` and torchvision's ViT) the projection is
exactly a Linear layer ``x ↦ x Wᵀ + b`` from E to 3E features. Each such module gets an
:class:`InProjection`, an ``nn.Linear`` holding the module's own two parameters (not
registered in the model: ``named_parameters()`` is unchanged), and during a curvature pass
(:func:`through_projections`) the module's forward is replaced by the same attention
written with that Linear and ``out_proj`` called as modules, so that both are layers like
any other: Kron, diag, full and low-rank, the GLM predictive.

Refused by name: cross-attention (query, key, value not one tensor), ``kdim`` / ``vdim``
other than the embedding size (three separate projection weights), ``add_bias_kv`` and
``add_zero_attn``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_PROJECTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class InProjection(nn.Linear):
    """The ``E → 3E`` input projection of an ``nn.MultiheadAttention``, on the module's own parameters."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        bias = attention.in_proj_bias is not None
        super().__init__(attention.embed_dim, 3 * attention.embed_dim, bias=bias, device="meta")  # no random init
        self.weight = attention.in_proj_weight
        if attention.in_proj_bias is not None:
            self.bias = attention.in_proj_bias


def in_projection(name: str, attention: nn.MultiheadAttention) -> InProjection:
    """The module's :class:`InProjection` (one per module, kept while the module lives).

    Raises:
        ValueError: for a configuration other than self-attention's plain one (named).
    """
    unsupported = {
        "kdim / vdim other than embed_dim": not attention._qkv_same_embed_dim,
        "add_bias_kv=True": attention.bias_k is not None,
        "add_zero_attn=True": attention.add_zero_attn,
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"layer {name!r} (MultiheadAttention) has {', '.join(found)}: not supported; freeze it "
            "(requires_grad=False)"
        )
    if attention not in _PROJECTIONS:
        _PROJECTIONS[attention] = InProjection(attention)
    return _PROJECTIONS[attention]


@contextmanager
def through_projections(model: nn.Module, modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, each attention of ``model`` with a projection in ``modules`` runs through both as modules.

    Then the layers' hooks see them (either projection may be the only trainable one).
    """
    chosen = {id(m) for m in modules}
    patched = []
    for name, attention in model.named_modules():
        if not isinstance(attention, nn.MultiheadAttention):
            continue
        projection = _PROJECTIONS.get(attention)
        if id(attention.out_proj) in chosen or (projection is not None and id(projection) in chosen):
            attention.forward = _self_attention(attention, in_projection(name, attention))
            patched.append(attention)
    try:
        yield
    finally:
        for attention in patched:
            del attention.forward  # the class's forward again


def _self_attention(attention: nn.MultiheadAttention, projection: InProjection):
    """``attention``'s forward for self-attention, with the projections called as modules (same arguments)."""

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not (query is key and key is value):
            raise ValueError(
                "an nn.MultiheadAttention in the posterior is called with a different query, key or value "
                "(cross-attention): only self-attention is supported; freeze it (requires_grad=False)"
            )
        batched = query.dim() == 3
        if not batched:
            x = query.unsqueeze(0)
        else:
            x = query if attention.batch_first else query.transpose(0, 1)  # (N, L, E)
        n, length, _ = x.shape
        heads = attention.num_heads
        q, k, v = projection(x).view(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)  # each (N, h, L, E / h)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores + _additive_mask(attn_mask, key_padding_mask, is_causal, n, heads, length, scores.dtype)
        weights = scores.softmax(-1)
        if attention.training and attention.dropout > 0:
            weights = nn.functional.dropout(weights, attention.dropout)
        out = attention.out_proj((weights @ v).transpose(1, 2).reshape(n, length, -1))
        if not batched:
            out = out[0]
        elif not attention.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        returned = weights.mean(1) if average_attn_weights else weights
        return out, returned if batched else returned[0]

    return forward


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    n: int,
    heads: int,
    length: int,
    dtype: torch.dtype,
) -> Tensor:
    """``(N or 1, h or 1, L, L)`` what is added to the scores: ``-inf`` where a boolean mask is True."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
        return mask.to(dtype)

    total = torch.zeros((), dtype=dtype)
    if attn_mask is None and is_causal:
        raise ValueError("nn.MultiheadAttention needs attn_mask with is_causal=True (torch's own forward refuses it)")
    if attn_mask is not None:
        mask = additive(attn_mask)
        total = total.to(mask.device) + (mask.view(n, heads, length, length) if mask.dim() == 3 else mask)
    if key_padding_mask is not None:
        total = total + additive(key_padding_mask).view(n, 1, 1, length)
    return total
