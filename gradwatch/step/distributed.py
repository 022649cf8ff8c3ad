"""The few collectives gradwatch needs under DDP / FSDP, and nothing else.

Under DDP every rank holds the same all-reduced ``.grad`` at the optimizer boundary, so gradient
numbers need no communication. What differs between ranks is (a) each rank's shard of an FSDP
(DTensor) parameter and (b) the activation and backward-signal counts of each rank's part of the
batch. Both are sums, so one SUM all-reduce of one flat fp64 vector covers them.

A collective with different shapes on different ranks hangs or crashes, and a rank can see a
different set of layers than another (data-dependent branches, a functional call on one rank
only). So every rank first shares a small header (payload length and a checksum of its layout);
only when all agree is the payload reduced, otherwise every rank keeps its own numbers. Every rank
takes the same decision from the same gathered headers, so none is left waiting.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def local_shard(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rank-local part of a (DTensor) tensor and how many ranks hold a copy of that part.

    Summing ``norm(local) ** 2 / copies`` over all ranks gives the full tensor's squared norm.
    A plain tensor is returned as is with ``copies=0``: it is not a shard and needs no reduction.
    A ``Partial`` tensor (a parameter's gradient under sequence parallelism: each rank's addend)
    gets ``-copies``: the tensor is the sum of the locals over all ranks divided by ``copies``,
    and its norm can only be taken after that sum.
    """
    if type(t) in _PLAIN:  # the common case, without three attribute lookups
        return t, 0
    to_local = getattr(t, "to_local", None)
    placements = getattr(t, "placements", None)
    mesh = getattr(t, "device_mesh", None)
    if to_local is None or placements is None or mesh is None:
        return t, 0
    # Ranks outside the tensor's mesh hold its pieces again: a parameter of a tensor-parallel
    # mesh is the same on every data-parallel rank, one of an FSDP mesh on every rank of the
    # tensor-parallel mesh.
    copies = max(rank_and_world()[1] // mesh.size(), 1)
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
    if any(placement.is_partial() for placement in placements):
        return to_local(), -copies
    return to_local(), copies


def sum_across_ranks(
    payload: torch.Tensor,
    layout: str,
    absmax: torch.Tensor | None,
    largest: torch.Tensor | None = None,
):
    """All-reduce ``payload`` (SUM) and ``absmax`` (MAX) over the default group, and ``largest``
    (MAX, in place), if every rank has the same ``layout``.

    Returns:
        (payload or None, absmax): the summed payload, or None when the layouts differ (every rank
        then keeps its own numbers); the largest ``absmax`` of all ranks (or None).
    """
    _, world = rank_and_world()
    device = payload.device
    mx = (
        absmax.reshape(1).double().to(device)
        if absmax is not None
        else torch.full((1,), -math.inf, dtype=torch.float64, device=device)
    )
    header = torch.cat(
        [
            torch.tensor(
                [payload.numel(), zlib.crc32(layout.encode())], dtype=torch.float64, device=device
            ),
            mx,
        ]
    )
    gathered = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(gathered, header)
    rows = torch.stack(gathered).cpu()
    top = rows[:, 2].max().item()
    # -inf: no rank saw an input; NaN (an input had NaN) is kept, the diagnosis names it.
    absmax_out = torch.tensor(top, device=device) if top != -math.inf else None
    if not bool((rows[:, :2] == rows[0, :2]).all()):
        return None, absmax_out
    if payload.numel():
        dist.all_reduce(payload, op=dist.ReduceOp.SUM)
    if largest is not None and largest.numel():
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return payload, absmax_out
