"""The one collective gradwatch makes on a logging step, and what it needs to know of shards.

Under DDP every rank holds the same all-reduced ``.grad`` at the optimizer boundary, so gradient
numbers need no communication. What differs between ranks is (a) each rank's shard of an FSDP or
tensor-parallel (DTensor) parameter and (b) the activation and backward-signal counts of each
rank's part of the batch. Both are sums; the few largest values (attention logits, the input's
largest value) ride along in the same all-reduce (:class:`Exchange`).
"""

from __future__ import annotations

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


class Exchange:
    """Combines a logging step's numbers over the ranks of the default group in one all-reduce.

    A collective with different sizes on different ranks hangs or crashes, and ranks can see
    different layers on a step (a branch taken on one rank only). So every rank sends the same
    number of values: a block of one row per rank (its payload length, its layout's checksum,
    whether its numbers fit, and its MAX values; zeros in the other ranks' rows, so the sum
    hands every rank every row exactly) and its SUM payload, padded to a capacity every rank
    holds alike. Every rank takes the same decision from the same rows: the layouts agree, and
    the sum is used; or they differ, and every rank keeps its own numbers. A payload too long
    for the capacity (the first logging step, or a model that grew) leaves the sum unused, and
    every rank, having seen every length, sends again at the new capacity: two all-reduces on
    such a step, one on every other logging step, none between them.
    """

    HEAD = 5  # payload length, MAX values, two halves of the layout's checksum, fits

    def __init__(self) -> None:
        self.capacity = 0  # SUM values every rank sends
        self.slots = 0  # MAX values every rank sends in its row

    def __call__(
        self, payload: torch.Tensor, maxes: torch.Tensor, layout: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sum ``payload`` and take the largest of each of ``maxes`` (fp64 vectors) over the
        ranks, if every rank has the same ``layout``.

        Returns:
            (payload, maxes): the summed payload and the largest values, or (None, the largest
            first value) when the layouts differ: every rank then keeps its own numbers, and the
            first MAX value (every rank sends one: the model's input's) alone is combined.
        """
        rank, world = rank_and_world()
        n, k, checksum = payload.numel(), maxes.numel(), zlib.crc32(layout.encode())
        while True:
            width = self.HEAD + self.slots
            fits = n <= self.capacity and k <= self.slots
            rows = torch.zeros(world, width, dtype=torch.float64, device=payload.device)
            head = [n, k, checksum & 0xFFFF, checksum >> 16, float(fits)]
            rows[rank, : self.HEAD] = torch.tensor(head, dtype=torch.float64)
            body = torch.zeros(self.capacity, dtype=torch.float64, device=payload.device)
            if fits:
                rows[rank, self.HEAD : self.HEAD + k] = maxes
                body[:n] = payload
            flat = torch.cat([rows.reshape(-1), body])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            rows = flat[: world * width].reshape(world, width)
            heads = rows[:, : self.HEAD].cpu()
            self.capacity = max(self.capacity, int(heads[:, 0].max()))
            self.slots = max(self.slots, int(heads[:, 1].max()))
            if bool(heads[:, 4].all()):
                break
        values = rows[:, self.HEAD : self.HEAD + k]
        if not bool((heads[:, :4] == heads[0, :4]).all()):
            return None, values[:, :1].amax(dim=0)
        return flat[world * width : world * width + n], values.amax(dim=0)
