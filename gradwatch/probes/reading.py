"""Reading what the hooks gathered, at the step boundary."""

from __future__ import annotations

import operator

import torch
from torch import nn

from ..measure import stats
from ..measure.statistics import INPUT, INPUT_ABSMAX, SIGNAL
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
            signal=self.take_signal(entries, index),
            elems=[e.elems for e in entries],
            units=units,
            counts=self.unit_counts.slots.take(),
            rows=None,
            owner=None,
            input=None,
            input_absmax=None,
            unit_owners=tuple((i, u) for _, i, u, _ in segments),
        )
        if self.inputs:
            taken.input, taken.input_absmax = self.take_input()
        mesh = self.placements.mesh
        if mesh is not None:  # tensor parallel: which ranks' numbers stand for the mesh's
            taken.mesh_size = mesh.size
            # split heads: every rank holds its own; anything else as its piece says
            counted = self.placements.counted
            taken.weights = [float(bool(e.head_block) or counted(e.piece)) for e in entries]
            taken.input_weight = float(counted(self.placements.input_piece))
            taken.unit_blocks = {i: e.unit_block for i, e in enumerate(entries) if e.unit_block}
            taken.head_blocks = {i: e.head_block for i, e in enumerate(entries) if e.head_block}
            taken.splits = {
                i: e.piece.split for i, e in enumerate(entries) if e.piece and e.piece.split
            }
        for i, e in enumerate(entries):
            for name, row in e.sums.items():
                taken.sums.setdefault(name, []).append((i, row))
        if taken.counts is not None:
            key = tuple((i, u, r) for _, i, u, r in segments)
            taken.rows, taken.owner = self.segment_index(key, taken.counts.device)
        taken.shared = [(index[e], e.shared_grad) for e in self.signals.take_shared()]
        for e in entries:
            e.reset()
        return taken

    def take_error(self) -> Exception | None:
        """The error gradwatch's own bookkeeping raised this step, if any; the step's data is
        dropped with it."""
        error, self.error = self.error, None
        if error is not None:
            self.take()
            self.forwards = 0
        return error

    def take_forwards(self) -> int:
        """Measured forwards since the last call, and start over."""
        forwards, self.forwards = self.forwards, 0
        return forwards

    def take_signal(self, entries: list[Entry], index: dict[Entry, int]) -> torch.Tensor | None:
        """Per entry, the SIGNAL row of the output gradients it saw, in fp64 on the device: eager
        hooks left one norm per output in the signal slots, traced hooks one accumulator per
        entry; both end up here, in the same rows."""
        norms, owners = self.signals.take()
        out = None
        if norms is not None:
            device = norms.device
            owner = torch.tensor([index[e] for e in owners], dtype=torch.int64)
            count = torch.tensor([float(e.signal_count) for e in entries], dtype=torch.float64)
            sumsq = torch.zeros(len(entries), dtype=torch.float64, device=device)
            # squared in fp64: a norm of 1e-30 squares to 1e-60, which fp32 would flush to 0
            sumsq.index_add_(0, owner.to(device, non_blocking=True), norms.double().square())
            out = SIGNAL.pack_rows(sumsq=sumsq, count=count.to(device, non_blocking=True))
        if self.traced_hooked:  # else the accumulators are zero: no copy for eager steps
            out = self.take_traced_signal(entries, out)
        return out

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

    def take_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The INPUT and INPUT_ABSMAX rows of the inputs measured since the last take."""
        sumsq, absmax = stats.sumsq_absmax(torch.stack(self.inputs))
        count, self.input_count = self.input_count, 0
        self.inputs.clear()
        return INPUT.pack(sumsq=sumsq, count=count), INPUT_ABSMAX.pack(absmax=absmax)

    def refresh_parameters(self) -> list[nn.Parameter]:
        """Re-read each entry's own parameters from its module's parameter dict (FSDP2's
        ``fully_shard`` replaces them), and return the model's parameters as
        ``model.parameters()`` gives them (each once, in module order): one walk that costs a
        fraction of the generic one. The list is reused while no parameter changes: read it,
        don't modify it."""
        # Almost always nothing changed: one identity check over the flat list of every slot.
        now_all = [p for module, _ in self._param_modules for p in module._parameters.values()]
        cached = self._param_cache
        if (
            cached is not None
            and len(now_all) == len(cached[0])
            and all(map(operator.is_, now_all, cached[0]))
        ):
            return cached[1]
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for module, entry in self._param_modules:
            now = [p for p in module._parameters.values() if p is not None]
            # a new tuple only when one changed: fewer objects for the garbage collector
            if entry is not None and (
                len(now) != len(entry.params) or not all(map(operator.is_, now, entry.params))
            ):
                entry.params = tuple(now)
            for p in now:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        self._param_cache = (now_all, out)
        return out
