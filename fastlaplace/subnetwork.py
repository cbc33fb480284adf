"""Choosing the parameters of ``subset_of_weights="subnetwork"``: ``subnetwork_indices`` helpers.

Indices count the parameters a posterior over all supported layers covers, in
``model.named_parameters()`` order (for a model made of supported layers only, the order
of ``parameters_to_vector(model.parameters())``, as laplace-torch's subnetwork masks).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from fastlaplace.curvature import supported_layers, trainable_bias
from fastlaplace.laplace import Laplace


def covered_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The ``(name, parameter)`` pairs the indices count, in ``named_parameters()`` order."""
    names = {id(p): name for name, p in model.named_parameters()}
    covered = []
    for _, module in supported_layers(model):
        bias = trainable_bias(module)
        covered += [(names[id(p)], p) for p in ([module.weight] if bias is None else [module.weight, bias])]
    return covered


def _top(scores: Tensor, n_params: int) -> Tensor:
    """``(n_params,)`` sorted indices of the largest scores."""
    if isinstance(n_params, bool) or not isinstance(n_params, int) or not 0 < n_params <= scores.numel():
        raise ValueError(f"n_params must be an integer in [1, {scores.numel()}], got {n_params!r}")
    return torch.topk(scores, n_params).indices.sort().values


def largest_magnitude(model: nn.Module, n_params: int) -> Tensor:
    """``(n_params,)`` indices of the parameters of largest absolute value."""
    values = torch.cat([p.detach().flatten() for _, p in covered_parameters(model)])
    return _top(values.abs(), n_params)


def largest_variance(
    model: nn.Module,
    likelihood: str,
    loader: Iterable,
    n_params: int,
    prior_precision: float = 1.0,
    **options,
) -> Tensor:
    """``(n_params,)`` indices of the largest marginal variances of a diagonal Laplace posterior.

    Args:
        model: the trained network.
        likelihood: ``"classification"`` or ``"regression"``.
        loader: the ``(x, y)`` batches the diagonal posterior is fitted on.
        n_params: how many parameters to choose.
        prior_precision: of the diagonal posterior.
        **options: further ``Laplace(...)`` options for it (``sigma_noise``, ...).
    """
    la = Laplace(
        model, likelihood, subset_of_weights="all", hessian_structure="diag", prior_precision=prior_precision, **options
    )
    la.fit(loader)
    variances = la._to_parameter_order([p.reciprocal() for p in la.posterior_precision()])
    return _top(variances, n_params)


def by_name(model: nn.Module, names: Sequence[str]) -> Tensor:
    """Indices of every covered parameter named in ``names``, or inside a module named there.

    Raises:
        ValueError: for a name that is neither a covered parameter nor a module holding one.
    """
    covered = covered_parameters(model)
    for name in names:
        if not any(p == name or p.startswith(name + ".") for p, _ in covered):
            known = [p for p, _ in covered] + [p.rsplit(".", 1)[0] for p, _ in covered]
            match = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise ValueError(f"{name!r} is not a covered parameter or a module with one{hint}")
    chosen, offset = [], 0
    for name, p in covered:
        if any(name == n or name.startswith(n + ".") for n in names):
            chosen.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(chosen)
