"""Where the hooks' results wait for the step boundary: device buffers (:class:`Slots`), one
:class:`Entry` per report row, and what a step gathered, flattened (:class:`Taken`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..measure import stats
from ..measure.statistics import Statistic

_MAX_VIEWS = 1 << 14  # views a Slots keeps for reuse


class Slots:
    """A growing fp32 buffer on the device that hooks write their reductions into (``out=``).

    Results stay on the device until the boundary's single copy, and no Python object per result
    outlives its hook: thousands of small tensors alive until the logging step ends made the
    garbage collector's full passes a fifth of a 1,000-layer model's logging step. The views
    handed out are kept: the same offsets come back step after step, and slicing a tensor costs
    more in Python than the reduction written into it.
    """

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.used = 0
        self._views: dict[tuple[int, int], torch.Tensor] = {}  # (start, size or 0) -> view

    def claim(
        self, size: int, device: torch.device, scalar: bool = False
    ) -> tuple[int, torch.Tensor | None]:
        """Reserve ``size`` slots: their offset into :attr:`buf`, and the slots themselves to
        write into with ``out=`` (a 0-dim view for one ``scalar`` slot), or None when the buffer
        is on another device (then :meth:`write` the value)."""
        start, end = self.used, self.used + size
        buf = self.buf
        if buf is None or buf.device != device and start == 0:
            self._resize(max(64, 2 * end), device)
        elif end > buf.numel():
            self._resize(2 * end, buf.device)
            self.buf[:start].copy_(buf[:start])
        self.used = end
        if self.buf.device != device:
            return start, None
        key = (start, 0 if scalar else size)
        out = self._views.get(key)
        if out is None:
            if len(self._views) >= _MAX_VIEWS:  # offsets that keep moving: start again
                self._views.clear()
            out = self._views[key] = self.buf[start] if scalar else self.buf[start:end]
        return start, out

    def _resize(self, capacity: int, device: torch.device) -> None:
        self.buf = torch.empty(capacity, dtype=torch.float32, device=device)
        self._views = {}  # views of the old buffer

    def write(self, start: int, value: torch.Tensor) -> None:
        """Copy ``value`` into slots reserved on another device than the buffer's."""
        self.buf[start : start + value.numel()].copy_(value.reshape(-1))

    def take(self) -> torch.Tensor | None:
        """What was written since the last take (valid until the next write), then start over."""
        if not self.used:
            return None
        used, self.used = self.used, 0
        return self.buf[:used]


# Output gradients this small are kept and reduced together, in one fused kernel per this many:
# on a launch-bound step, one norm kernel per layer costs more in launching than in reading, and
# holding a few dozen small gradients a little longer costs at most PENDING x SMALL x 4 bytes.
SMALL = 4096
PENDING = 64


class SignalNorms:
    """The norm of every output gradient the eager backward hooks see, in :class:`Slots`, with
    the entry each belongs to: small ones in batches (``_foreach_norm``), larger ones at once.
    Autograd runs one thread per device, hence the lock."""

    def __init__(self, fail: Callable[[Exception, str], None]) -> None:
        self.slots = Slots()
        self.entries: list[Entry] = []  # the entry of each slot
        self.lock = threading.Lock()
        self._pending: list[tuple[Entry, torch.Tensor, int]] = []  # (entry, grad, its version)
        self.shared: list[Entry] = []  # the entries whose shared_grad is set, in order
        self._fail = fail  # a layer whose measurement is lost, and why

    def add(self, entry: Entry, grad: torch.Tensor) -> None:
        with self.lock:
            entry.signals += 1
            if entry.shared:  # one output for every sample: its gradients add up, as a weight's
                if entry.shared_grad is None:
                    self.shared.append(entry)
                entry.shared_grad = add_padded(entry.shared_grad, grad.detach())
                return
            entry.signal_count += grad.numel()
            pending = self._pending
            if pending and pending[0][1].device != grad.device:
                self._flush()
            if grad.numel() <= SMALL and grad.dtype != torch.float64 and not grad.is_sparse:
                pending.append((entry, grad.detach(), grad._version))
                if len(pending) >= PENDING:
                    self._flush()
                return
            # the slot is the entry's before the norm is written: if that fails, the slots of
            # the other entries stay where take() expects them
            start, out = self.slots.claim(1, grad.device, scalar=True)
            self.entries.append(entry)
            value = stats.norm(grad, out=out)
            if out is None:
                self.slots.write(start, value)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        for e, g, version in pending:
            if g._version != version:  # a later backward function wrote into it
                self._fail(RuntimeError("its output gradient was changed in place"), e.name)
        try:
            norms = torch._foreach_norm([g for _, g, _ in pending], 2, dtype=torch.float32)
        except Exception as error:  # those layers' signal alone is lost
            for e, _, _ in pending:
                self._fail(error, e.name)
            return
        start, out = self.slots.claim(len(pending), pending[0][1].device)
        self.entries.extend(e for e, _, _ in pending)
        if out is not None:
            torch.stack(norms, out=out)
        else:
            self.slots.write(start, torch.stack(norms))

    def take(self) -> tuple[torch.Tensor | None, list[Entry]]:
        """Every norm since the last take, with their entries; then start over."""
        with self.lock:
            self._flush()
            entries, self.entries = self.entries, []
            return self.slots.take(), entries

    def take_shared(self) -> list[Entry]:
        """The entries with a shared output's gradient since the last call; then start over."""
        with self.lock:
            shared, self.shared = self.shared, []
            return shared

    def clear(self) -> None:
        with self.lock:
            self._pending.clear()
            self.entries.clear()
            self.shared.clear()
            self.slots.take()


def add_padded(total: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """``total + grad`` in fp32, the smaller zero-padded to the larger's shape: micro-batches of
    other sequence lengths share the positions they have."""
    grad = grad.float()
    if total is None:
        return grad.clone()
    if total.shape == grad.shape:
        return total.add_(grad)
    shape = [max(a, b) for a, b in zip(total.shape, grad.shape)]
    grown = total.new_zeros(shape)
    for t in (total, grad):
        grown[tuple(slice(0, n) for n in t.shape)] += t.to(grown.device)
    return grown


class UnitCounts:
    """Every activation's per-unit flat counts of a step, in one :class:`Slots`; each entry
    knows where its segments lie (``Entry.segments``)."""

    def __init__(self) -> None:
        self.slots = Slots()

    def add(self, entry: Entry, flat: torch.Tensor, axis: int) -> None:
        """An activation call's flat mask, counted per unit."""
        units = flat.shape[axis] if flat.dim() else 1
        start, out, fresh = self.segment(entry, units, flat.numel(), flat.device)
        slots = self.slots
        if fresh:
            counts = stats.flat_counts(flat, axis, out=out)
            if out is None:
                slots.write(start, counts)
        else:  # a second call of the same shape: add to its counts
            slots.buf[start : start + units].add_(stats.flat_counts(flat, axis).to(slots.buf))

    def add_counts(self, entry: Entry, counts: torch.Tensor, numel: int) -> None:
        """Per-unit flat counts that traced code reduced, of ``numel`` activation elements."""
        units = counts.numel()
        start, out, fresh = self.segment(entry, units, numel, counts.device)
        slots = self.slots
        if fresh and out is not None:
            out.copy_(counts)
        elif fresh:
            slots.write(start, counts)
        else:
            slots.buf[start : start + units].add_(counts.to(slots.buf))

    def segment(
        self, entry: Entry, units: int, numel: int, device: torch.device
    ) -> tuple[int, torch.Tensor | None, bool]:
        """Count slots for a call of ``entry`` with ``units`` units and ``numel`` elements: their
        offset, the slots to write into (see :meth:`Slots.claim`), and whether they are new this
        step (write the counts) or hold an earlier call's (add to them)."""
        rows = numel // units
        entry.elems += numel
        segment = entry.segments.get(units)
        if segment is None or not segment[1]:
            start, out = self.slots.claim(units, device)
            if segment is None:
                entry.segments[units] = [start, rows]
            else:
                segment[0], segment[1] = start, rows
            return start, out, True
        segment[1] += rows
        return segment[0], None, False


@dataclass(eq=False)
class Entry:
    """One row of the report: a module with parameters, an activation module or a functional call.

    Between two logging steps it counts what its hooks saw in Python integers; the reductions
    themselves sit in the probes' :class:`Slots`.
    """

    name: str
    module_type: str
    kind: str | None = None  # activation kind
    params: tuple[nn.Parameter, ...] = ()
    module: nn.Module | None = None  # None for functional activations
    fan_in: int | None = None
    act_params: dict[str, float] = field(default_factory=dict)
    order: int | None = None  # first-forward execution position
    calls: int = 0
    signals: int = 0  # output gradients seen
    signal_count: int = 0  # elements those gradients had
    elems: int = 0  # activation elements seen
    # unit count -> [offset of its per-unit flat counts in the count slots, elements per unit]:
    # a call with another unit count (a shared activation at two widths) gets its own segment.
    # Rows 0: not seen since the last reset (the lists are reused: fewer objects for the GC).
    segments: dict[int, list[int]] = field(default_factory=dict)
    # one tensor hook object (hooks.GradHook) for all of this entry's outputs
    grad_hook: Callable[[torch.Tensor | None], None] | None = None
    # SIGNAL rows of the output gradients that traced (compiled) code saw: a traced backward
    # hook may only add in place into a tensor made before tracing
    signal_acc: torch.Tensor | None = None
    time_axis: int | None = None  # a sequence module: its input's time axis (see through_time)
    # the other per-layer statistics its hooks accumulate: name -> the summed row, as
    # measure.statistics declares it (TIME_SIGNAL, STATE_DERIVATIVE, DPHI2)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_out: int | None = None  # a Linear / ungrouped conv weight: outputs each input feeds
    one_per_unit: bool = False  # an activation: its output is pooled (stats.one_per_unit)
    logits: bool = False  # the model's output head: its log Z is measured
    shared: bool = False  # its output has batch size 1 in a batch of several: every sample's
    shared_grad: torch.Tensor | None = None  # ... and that output's gradient, added up
    # Under tensor parallelism (see placements), set by each measured call: the piece of its
    # output this rank holds (None: a replica), where its units lie among the whole's (offset,
    # units) when they are split, and (block, blocks) of an attention's heads when they are.
    piece: Any = None
    unit_block: tuple[int, int] | None = None
    head_block: tuple[int, int] | None = None

    @property
    def seen(self) -> bool:
        return bool(self.calls or self.signals)

    def add(self, statistic: Statistic, row: torch.Tensor) -> None:
        """Add one row of a declared per-layer statistic."""
        self.sums[statistic.name] = statistic.add(self.sums.get(statistic.name), row)

    def reset(self) -> None:
        self.calls = self.signals = self.signal_count = self.elems = 0
        self.shared_grad = None
        if self.sums:
            self.sums = {}
        for segment in self.segments.values():
            segment[1] = 0


@dataclass
class Taken:
    """What every entry gathered since the last logging step, flattened for one copy to the host.

    Device tensors: ``signal`` (per entry, the SIGNAL row of the output gradients it saw, from
    eager and traced hooks alike), ``counts`` (every segment's per-unit flat counts) with
    ``rows`` (each unit's element count) and ``owner`` (each unit's entry index), ``input`` and
    ``input_absmax`` (the model's inputs), and ``sums`` (the other declared per-layer
    statistics: name -> (entry index, summed row) of the entries that have one). Python lists:
    the rest, indexed like ``entries``.
    """

    entries: list[Entry]
    calls: list[int]
    signal: torch.Tensor | None
    elems: list[int]
    units: list[int]
    counts: torch.Tensor | None
    rows: torch.Tensor | None
    owner: torch.Tensor | None
    input: torch.Tensor | None
    input_absmax: torch.Tensor | None
    unit_owners: tuple[tuple[int, int], ...]  # (entry index, units) of each segment of counts
    sums: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    shared: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # entry index, gradient
    # Under tensor parallelism: the mesh's size, and per entry whether this rank's numbers are
    # added to the other ranks' (1) or another rank's copy stands for them (0); the unit and
    # head blocks of the entries whose units or heads are split (entry index -> block).
    mesh_size: int = 1
    weights: list[float] | None = None
    input_weight: float = 1.0
    unit_blocks: dict[int, tuple[int, int]] = field(default_factory=dict)
    head_blocks: dict[int, tuple[int, int]] = field(default_factory=dict)
    splits: dict[int, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)  # Piece.split
