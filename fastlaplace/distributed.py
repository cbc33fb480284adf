"""Curvature over several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Everything here is a no-op unless a process group is initialised with more than one
rank, so the same code runs alone and under ``torchrun``. Collectives are bucketed: the
tensors of one dtype and device are flattened into buffers of at most ``bucket_mb``
megabytes, one call each, all launched asynchronously before the first wait.

- :func:`all_reduce_` sums or averages tensors over the ranks (K-FAC factors, a fit's
  curvature).
- :func:`assign_owners` gives each of several jobs (factors to eigendecompose, layers to
  precondition) an owner rank, greedily by cost, largest first (LPT scheduling);
  :func:`broadcast_from_owners_` then sends each owner's results to every rank.

The posteriors' fits use them (:class:`~fastlaplace.posterior.ParametricLaplace`); this
module knows nothing of the posteriors.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

#: the default bucket size of the collectives, in megabytes (DDP's default)
BUCKET_MB = 25.0


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _buckets(tensors: Sequence[Tensor], bucket_mb: float) -> list[list[Tensor]]:
    """The tensors grouped by dtype and device, in order, each group cut at ``bucket_mb`` megabytes."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    limit = bucket_mb * 2**20
    for t in tensors:
        buckets = groups.setdefault((t.dtype, t.device), [[]])
        if buckets[-1] and (sum(b.numel() for b in buckets[-1]) + t.numel()) * t.element_size() > limit:
            buckets.append([])
        buckets[-1].append(t)
    return [bucket for buckets in groups.values() for bucket in buckets]


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def all_reduce_(tensors: Sequence[Tensor], average: bool = False, bucket_mb: float = BUCKET_MB) -> None:
    """In place, every tensor becomes its sum (or mean) over the ranks; a no-op on one rank.

    Args:
        tensors: tensors of any shapes, dtypes and devices (the backend's: CPU for gloo,
            CUDA for NCCL); every rank passes the same shapes in the same order.
        average: divide by the world size (floating tensors only).
        bucket_mb: the largest flattened buffer of one collective call, in megabytes.
    """
    if not is_distributed() or not tensors:
        return
    if average and not all(t.is_floating_point() for t in tensors):
        raise ValueError("all_reduce_(average=True) needs floating-point tensors")
    launched = []
    for bucket in _buckets(tensors, bucket_mb):
        flat = _flatten(bucket)
        launched.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    size = dist.get_world_size()
    for bucket, flat, handle in launched:
        handle.wait()
        if average:
            flat.div_(size)
        _unflatten_into(flat, bucket)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """An owner rank per job, balancing the summed cost: largest job first to the least loaded rank (LPT).

    The result depends only on the arguments, so every rank computes the same assignment.

    Args:
        costs: J non-negative costs (e.g. ``d³`` for the eigendecomposition of a ``d × d`` factor).
        world_size: the number of ranks R.

    Returns:
        J ranks in ``[0, R)``; ties go to the lower rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(loads)
        owners[job] = rank
        heapq.heappush(loads, (load + float(costs[job]), rank))
    return owners


def broadcast_from_owners_(tensors: Sequence[Tensor], owners: Sequence[int], bucket_mb: float = BUCKET_MB) -> None:
    """In place, each tensor takes the value it has on its owner rank; a no-op on one rank.

    Args:
        tensors: T tensors, allocated with their final shapes on every rank (values only
            matter on the owner).
        owners: T ranks, the same on every rank (see :func:`assign_owners`).
        bucket_mb: the largest flattened buffer of one collective call, in megabytes.
    """
    if len(tensors) != len(owners):
        raise ValueError(f"got {len(tensors)} tensors but {len(owners)} owners")
    if not is_distributed():
        return
    launched = []
    for owner in sorted(set(owners)):
        for bucket in _buckets([t for t, o in zip(tensors, owners, strict=True) if o == owner], bucket_mb):
            flat = _flatten(bucket)
            launched.append((bucket, flat, dist.broadcast(flat, owner, async_op=True), owner))
    rank = dist.get_rank()
    for bucket, flat, handle, owner in launched:
        handle.wait()
        if owner != rank:
            _unflatten_into(flat, bucket)
