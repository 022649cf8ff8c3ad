"""Reading what the hooks gathered, at the step boundary."""

from __future__ import annotations

import torch

from .. import stats
from .buffers import Entry, Taken


class Reading:
    """The reading half of :class:`~gradwatch.probes.core.Probes` (a mixin: one object)."""

    def ordered_entries(self) -> list[Entry]:
        """Entries in first-forward order; modules never called come last, in definition order."""
        if self.ordered is None:  # it only changes when an entry is first seen
            seen = sorted(self.entries.values(), key=lambda e: e.order)
            unseen = [e for e in self.module_entries.values() if e.order is None]
            self.ordered = seen + unseen
        return self.ordered

    def take(self) -> Taken:
        """Everything gathered since the last call, in forward order, and reset for the next."""
        entries = [e for e in self.ordered_entries() if e.seen]
        index = {e: i for i, e in enumerate(entries)}
        signal_owner = [index[e] for e in self.signal_entries]
        # (offset, entry index, units, elements per unit), in the order of the count slots
        segments = sorted(
            (start, i, units, rows)
            for i, e in enumerate(entries)
            for units, (start, rows) in e.segments.items()
            if rows
        )
        units = [0] * len(entries)
        for _, i, u, _ in segments:
            units[i] += u
        taken = Taken(
            entries=entries,
            calls=[e.calls for e in entries],
            signal=self.signal_slots.take(),
            signal_owner=signal_owner,
            signal_count=[e.signal_count for e in entries],
            elems=[e.elems for e in entries],
            units=units,
            counts=self.count_slots.take(),
            rows=None,
            owner=None,
            input=self.take_input(),
            unit_owners=tuple((i, u) for _, i, u, _ in segments),
        )
        if taken.counts is not None:
            key = tuple((i, u, r) for _, i, u, r in segments)
            taken.rows, taken.owner = self.segment_index(key, taken.counts.device)
        if self.traced_hooked:  # else the accumulators are zero: no copy for eager steps
            self.take_traced_signal(entries, taken)
        self.signal_entries.clear()
        for e in entries:
            e.reset()
        return taken

    def segment_index(self, segments: tuple, device: torch.device) -> tuple:
        """Per unit, its element count and its entry index, as device tensors; the layout is the
        same step after step, so they are built (and copied to the device) once."""
        key = (segments, device)
        if self.index_cache is None or self.index_cache[0] != key:
            owner, units, rows = (torch.tensor(col, dtype=torch.int64) for col in zip(*segments))
            # non_blocking: a blocking host-to-device copy synchronises the stream (which
            # torch.cuda.set_sync_debug_mode reports); from pageable memory CUDA has taken the
            # bytes when the call returns, so the temporaries may go at once
            self.index_cache = (
                key,
                torch.repeat_interleave(rows, units).to(device, torch.float32, non_blocking=True),
                torch.repeat_interleave(owner, units).to(device, non_blocking=True),
            )
        return self.index_cache[1], self.index_cache[2]

    def take_input(self) -> torch.Tensor | None:
        if not self.inputs:
            return None
        values = stats.sumsq_count_absmax(torch.stack(self.inputs), self.input_count)
        self.inputs.clear()
        self.input_count = 0
        return values
