"""Small activation outputs, counted together at the end of the forward.

On a step whose kernels are tiny (a deep, narrow model, or any model on a launch-bound GPU), the
two kernels per activation (the flat mask and its per-unit sum) and the Python around them cost
more than the counting itself. Outputs of up to :data:`SMALL` elements are kept until the forward
ends, then stacked by shape and counted in a few kernels: one stack, one mask and one sum per
group, the sum written straight into the count slots.

Only where waiting cannot change the answer: ReLU, sigmoid and tanh, whose backward reads their
output, so that a step that trains cannot change it in place before the forward ends (autograd
would refuse the backward); and only outputs that need a gradient. A changed version counter
still leaves the layer out of the step rather than counting other values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import stats

if TYPE_CHECKING:
    from .buffers import Entry
    from .core import Probes

DEFERRED_KINDS = frozenset({"relu", "sigmoid", "tanh"})
SMALL = 4096  # elements


def deferrable(entry: Entry, y: torch.Tensor, derivatives: bool) -> bool:
    """Whether this activation output can wait for the end of the forward (on the steps that
    measure E[phi'^2], the smooth kinds are measured at once with it)."""
    return (
        entry.kind in DEFERRED_KINDS
        and 0 < y.dim()
        and y.numel() <= SMALL
        and y.requires_grad
        and not (derivatives and entry.kind not in stats.PIECEWISE_DPHI2)
    )


class Deferred:
    """The activation outputs waiting for the end of the forward."""

    def __init__(self) -> None:
        # (entry, output, its version, unit axis)
        self.items: list[tuple[Entry, torch.Tensor, int, int]] = []

    def add(self, entry: Entry, y: torch.Tensor, axis: int) -> None:
        self.items.append((entry, y.detach(), y._version, axis))

    def clear(self) -> None:
        self.items = []

    def count(self, probes: Probes) -> None:
        """Count every waiting output into the probes' slots, a group of like outputs at a time."""
        items, self.items = self.items, []
        groups: dict[tuple, list[tuple[Entry, torch.Tensor]]] = {}
        for entry, y, version, axis in items:
            if y._version != version:
                probes.fail(
                    RuntimeError("its output was changed in place in the forward"), entry.name
                )
                continue
            key = (entry.kind, y.shape, y.dtype, y.device, axis)
            groups.setdefault(key, []).append((entry, y))
        for (kind, *_, axis), group in groups.items():
            try:
                _count_group(probes, kind, axis, group)
            except Exception as e:  # those layers alone
                for entry, _ in group:
                    probes.fail(e, entry.name)


def _count_group(probes: Probes, kind: str, axis: int, group: list) -> None:
    stacked = torch.stack([y for _, y in group])
    flat = stats.flat_mask(kind, stacked, None, probes.saturation_eps)
    units, numel = stacked.shape[axis + 1], group[0][1].numel()
    dims = tuple(d for d in range(1, stacked.dim()) if d != axis + 1)
    claims = [probes.segment(entry, units, numel, stacked.device) for entry, _ in group]
    first = claims[0][0]
    slots = probes.count_slots
    contiguous = all(
        fresh and out is not None and start == first + k * units
        for k, (start, out, fresh) in enumerate(claims)
    )
    if contiguous and dims:  # the sum goes straight into the slots
        block = slots.buf[first : first + len(group) * units].view(len(group), units)
        torch.sum(flat, dim=dims, dtype=torch.float32, out=block)
        return
    counts = flat.sum(dim=dims, dtype=torch.float32) if dims else flat.float()
    for k, (start, _, fresh) in enumerate(claims):
        if fresh:
            slots.write(start, counts[k])
        else:  # a second call of the same entry this step: add to its counts
            slots.buf[start : start + units].add_(counts[k].to(slots.buf))
