"""Small activation outputs, counted together at the end of the forward.

On a step whose kernels are tiny (a deep, narrow model, or any model on a launch-bound GPU), the
two kernels per activation (the flat mask and its per-unit sum) and the Python around them cost
more than the counting itself. Outputs of up to :data:`SMALL` elements are kept until the forward
ends, then stacked by shape and counted in a few kernels: one stack, one mask and one sum per
group, the sum written straight into the count slots.

Only where waiting cannot change the answer: ReLU, sigmoid and tanh, whose backward reads their
output, and GELU and SiLU, judged by their input, which their backward reads: a step that trains
cannot change that tensor in place before the forward ends (autograd would refuse the backward),
and holding it costs no memory (autograd holds it already). Only outputs that need a gradient.
A changed version counter still leaves the layer out of the step rather than counting other
values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..measure import stats

if TYPE_CHECKING:
    from .buffers import Entry
    from .recorder import Recorder

DEFERRED_KINDS = frozenset({"relu", "sigmoid", "tanh", "gelu", "silu"})
SMALL = 4096  # elements


def deferred_tensor(
    entry: Entry, y: torch.Tensor, inp: torch.Tensor | None, busy: bool
) -> torch.Tensor | None:
    """The tensor this activation is judged by (its output, or for GELU and SiLU its input) when
    it can wait for the end of the forward, else None (``busy``: the call adds other statistics
    now, see :mod:`.rows`, and is measured at once with them)."""
    if (
        entry.kind not in DEFERRED_KINDS
        or not 0 < y.dim()
        or y.numel() > SMALL
        or not y.requires_grad
        or busy
    ):
        return None
    if entry.kind not in stats.NEEDS_INPUT:
        return y
    if inp is None or inp.shape != y.shape or inp.data_ptr() == y.data_ptr():
        return None  # an in-place call: the input is gone
    return inp


class Deferred:
    """The activation tensors (outputs, or GELU and SiLU inputs) waiting for the forward's end."""

    def __init__(self) -> None:
        # (entry, the tensor it is judged by, that tensor's version, unit axis)
        self.items: list[tuple[Entry, torch.Tensor, int, int]] = []

    def add(self, entry: Entry, t: torch.Tensor, axis: int) -> None:
        self.items.append((entry, t.detach(), t._version, axis))

    def clear(self) -> None:
        self.items = []

    def count(self, probes: Recorder) -> None:
        """Count every waiting output into the probes' slots, a group of like outputs at a time."""
        items, self.items = self.items, []
        groups: dict[tuple, list[tuple[Entry, torch.Tensor]]] = {}
        for entry, y, version, axis in items:
            if y._version != version:
                probes.fail(
                    RuntimeError("its tensor was changed in place in the forward"), entry.name
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


def _count_group(probes: Recorder, kind: str, axis: int, group: list) -> None:
    stacked = torch.stack([t for _, t in group])
    # GELU and SiLU waited with their input: it stands in for the output too (only its dtype is read)
    flat = stats.flat_mask(kind, stacked, stacked, probes.saturation_eps)
    units, numel = stacked.shape[axis + 1], group[0][1].numel()
    dims = tuple(d for d in range(1, stacked.dim()) if d != axis + 1)
    counted = probes.unit_counts
    claims = [counted.segment(entry, units, numel, stacked.device) for entry, _ in group]
    first = claims[0][0]
    slots = counted.slots
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
