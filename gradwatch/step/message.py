"""One logging step as a message: a small :class:`Header` of plain Python facts and a set of
device tensors, each a whole statistic as :mod:`gradwatch.measure.statistics` declares it.

The training thread makes it (:func:`gradwatch.step.gather.gather`); the ranks combine it, each
statistic as its declaration says (:meth:`StepMessage.combine_across_ranks`); one copy brings it
to the host (:meth:`StepMessage.to_host`), where :class:`HostValues` hands the numbers back by
statistic and row. Nothing in it refers to a module, a parameter or a hook, so whatever reads it
(the readout, the diagnosis, a background worker) needs nothing else. This module alone lays rows
out in the message and takes them back out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..measure.statistics import (
    ELEMENTS,
    INPUT_ABSMAX,
    KEEP,
    LAYER,
    MAX,
    NORM,
    STEP,
    SUM,
    UNIT,
    Row,
    Statistic,
)
from .distributed import Exchange


@dataclass(frozen=True)
class LayerFacts:
    """What the readout knows of a watched layer: facts that change only when the model does."""

    name: str
    module_type: str
    kind: str | None  # an activation's kind
    fan_in: int | None
    fan_out: int | None
    sequence: bool  # measured through time
    params: tuple[int, ...]  # its parameters' positions in the step's parameter list
    matrix: int | None  # the position of its weight matrix (its first parameter of 2+ dims)
    matrix_numel: int = 0
    numel: int = 0  # its parameters' elements, all together


@dataclass
class Header:
    """The plain facts of a step: which layers, in forward order, and what they saw."""

    layers: tuple[LayerFacts, ...]  # every watched layer, in forward order
    pooled: list[bool]  # per layer: an activation with one value per sample and unit
    seen: list[int]  # per row of the per-layer statistics: its layer's position in ``layers``
    calls: list[int]  # per row: forwards that called it
    elements: list[float]  # per row: ELEMENTS, counted on the host (this rank's own)
    units: list[int]  # per row: an activation's units
    unit_owners: tuple[tuple[int, int], ...]  # (row, units) of each segment of unit counts
    weighed: bool = False  # the weights were read on this step
    recurrent: dict[str, tuple] = field(default_factory=dict)  # layer -> weight facts (weighed)
    combined: bool = False  # every rank's numbers were combined
    loss_scale: float | None = None  # a GradScaler's scale kept on the host (else LOSS_SCALE)
    loss_steps: tuple[int, ...] = ()  # the steps whose losses LOSSES holds, in order
    # Tensor parallelism: ranks per mesh holding the same samples; per row, 1 where this rank's
    # numbers are added to the others', 0 where another rank's copy stands for them (None: all
    # 1); the same for the model's input.
    mesh_size: int = 1
    weights: list[float] | None = None
    input_weight: float = 1.0


@dataclass
class Field:
    """One statistic of the step: its tensor (rows stacked), whose rows they are, and how many
    ranks hold each row (``NORM`` only; 0: every rank holds the whole, nothing to combine)."""

    statistic: Statistic
    tensor: torch.Tensor
    index: tuple[int, ...] | None  # the rows' owners; None: one row per row of the header
    widths: tuple[int, ...] | None = None  # ``steps`` statistics: each row's time steps
    copies: list[int] | None = None
    partials: dict[int, torch.Tensor] | None = None  # ``NORM`` rows of Partial tensors: locals


class StepMessage:
    """The header and the fields of one step."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self.fields: dict[str, Field] = {}

    def add(
        self,
        statistic: Statistic,
        tensor: torch.Tensor | None,
        index: list[int] | None = None,
        copies: list[int] | None = None,
        partials: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """Add a statistic's rows (nothing when ``tensor`` is None: the step has none);
        ``NORM``: ``copies`` per row, and the local tensors of the rows whose copies are
        negative (Partial: see :func:`~gradwatch.step.distributed.local_shard`)."""
        if tensor is not None:
            owners = tuple(index) if index is not None else None
            self.fields[statistic.name] = Field(statistic, tensor, owners, None, copies, partials)

    def add_rows(self, statistic: Statistic, rows: list[tuple[int, torch.Tensor]]) -> None:
        """Add a per-layer statistic's rows, given as (row, summed row) of the layers that have
        one."""
        if not rows:
            return
        device = rows[0][1].device
        flat = torch.cat([t.reshape(-1).to(device) for _, t in rows])
        widths = tuple(t.shape[-1] for _, t in rows) if statistic.steps else None
        index = tuple(i for i, _ in rows)
        self.fields[statistic.name] = Field(statistic, flat, index, widths)

    def __contains__(self, statistic: Statistic) -> bool:
        return statistic.name in self.fields

    def tensor(self, statistic: Statistic) -> torch.Tensor:
        return self.fields[statistic.name].tensor

    def layout(self) -> tuple:
        """Which layers, units and time steps: ranks can only sum equal layouts. Shapes only:
        ranks may see different batch sizes and still sum. Fields each rank keeps (its own
        losses) are left out: a rank that gives no loss still combines the rest."""
        h = self.header
        names = tuple(h.layers[k].name for k in h.seen)
        shapes = tuple(
            (f.statistic.name, f.index, f.widths)
            for f in self.fields.values()
            if f.statistic.combine != KEEP
        )
        return (names, h.unit_owners, shapes)

    def combine_across_ranks(self, exchange: Exchange) -> bool:
        """Combine every field over the ranks of the default process group, in place, in one
        ``exchange``: the SUM and NORM fields (the header's counted ELEMENTS too, which come back
        as a field) summed in one flat fp64 vector, the MAX fields taken at their largest, the
        model's input's first (combined even when layouts differ). Ranks whose layout differs
        keep their own numbers: returns False then."""
        h = self.header
        device = next(iter(self.fields.values())).tensor.device
        elements = torch.tensor(h.elements, dtype=torch.float64, device=device)
        parts, places = [self._weighed(elements, ELEMENTS, None)], []
        absmax, maxes = None, []
        for f in self.fields.values():
            combine = f.statistic.combine
            if f.statistic is INPUT_ABSMAX:  # first of the MAX values: combined whatever happens
                absmax = f
            elif combine == MAX:
                maxes.append(f)
            elif combine == SUM:
                parts.append(self._weighed(f.tensor.reshape(-1).double(), f.statistic, f))
                places.append((f, None))
            elif combine == NORM:
                assert f.copies is not None, f"{f.statistic.name!r} combined without copies"
                shared = [i for i, c in enumerate(f.copies) if c > 0]
                if shared:
                    copies = torch.tensor(
                        [float(f.copies[i]) for i in shared], dtype=torch.float64, device=device
                    )
                    parts.append(f.tensor[shared].double().square().to(device) / copies)
                    places.append((f, shared))
                for i, t in (f.partials or {}).items():  # the addends themselves, then a norm
                    parts.append(t.detach().reshape(-1).double().to(device) / -f.copies[i])
                    places.append((f, i))
        payload = torch.cat([p.to(device) for p in parts])
        key = (self.layout(), tuple((f.statistic.name, f.tensor.numel()) for f, _ in places))
        none = torch.full((1,), -math.inf, dtype=torch.float64, device=device)
        first = absmax.tensor.reshape(1).double().to(device) if absmax is not None else none
        largest = torch.cat([first, *(f.tensor.reshape(-1).double().to(device) for f in maxes)])
        summed, top = exchange(payload, largest, repr(key))
        if absmax is not None:  # this rank saw an input: the largest is finite (or NaN)
            absmax.tensor = top[:1].to(absmax.tensor)
        if summed is None:
            return False
        sizes = [f.tensor.numel() for f in maxes]
        for f, value in zip(maxes, torch.split(top[1:], sizes)):
            f.tensor = value.reshape(f.tensor.shape).to(f.tensor.dtype)
        out = iter(torch.split(summed, [p.numel() for p in parts]))
        # every rank's elements, summed: read with the rest, in the one host copy
        self.fields[ELEMENTS.name] = Field(ELEMENTS, next(out), None)
        for f, shared in places:
            value = next(out)
            if shared is None:  # SUM
                f.tensor = value.reshape(f.tensor.shape)
            elif isinstance(shared, int):  # a Partial tensor, summed: its norm
                f.tensor[shared] = torch.linalg.vector_norm(value).to(f.tensor.dtype)
            else:
                f.tensor[shared] = value.sqrt().to(f.tensor.dtype)
        h.combined = True
        return True

    def _weighed(self, flat: torch.Tensor, statistic: Statistic, f: Field | None) -> torch.Tensor:
        """A SUM field's values times their rows' weights (see ``Header.weights``): under
        tensor parallelism a replica is added once, by the rank whose copy stands for all."""
        h = self.header
        if statistic.per == STEP:
            return flat * h.input_weight if h.input_weight != 1.0 else flat
        if h.weights is None:
            return flat
        if statistic.per == UNIT:  # each unit takes its layer's weight
            per_row = [(h.weights[i], units) for i, units in h.unit_owners]
        elif statistic.per == LAYER and f is not None and f.index is not None:
            width = len(statistic.parts)
            sizes = f.widths or (1,) * len(f.index)
            per_row = [(h.weights[i], width * n) for i, n in zip(f.index, sizes)]
        else:  # one row per row of the header
            width = flat.numel() // max(len(h.weights), 1)
            per_row = [(w, width) for w in h.weights]
        weights = torch.tensor([w for w, _ in per_row], dtype=flat.dtype)
        sizes = torch.tensor([n for _, n in per_row])
        return flat * weights.repeat_interleave(sizes).to(flat.device)

    def to_host(self) -> HostValues:
        """The fields the host reads, in one device-to-host copy, read now."""
        return self.copy_to_host().read()

    def copy_to_host(self) -> HostCopy:
        """Start the one device-to-host copy of the fields the host reads, without waiting for
        it: :meth:`HostCopy.read` (on any thread) waits and hands the numbers out."""
        return HostCopy(self.header, [f for f in self.fields.values() if f.statistic.host])


class HostCopy:
    """A step's numbers on their way to the host. Made on the training thread: one flat copy of
    every field (on CUDA a ``non_blocking`` copy into pinned memory, with an event that marks its
    end), so that the message's tensors may be written again by the next step at once."""

    def __init__(self, header: Header, fields: list[Field]) -> None:
        self.header = header
        wanted = [f for f in fields if f.tensor.numel()]
        self._layouts = {f.statistic.name: (f.index, f.widths) for f in wanted}
        self._sizes = [(f.statistic.name, f.tensor.numel()) for f in wanted]
        self._flat: torch.Tensor | None = None
        self._event = None
        if not wanted:
            return
        device = wanted[0].tensor.device
        # cat promotes to the widest dtype, so fp32 values reach the host exactly; and it copies,
        # even of one field (a view of the probes' reused buffers on the CPU)
        flat = torch.cat([f.tensor.detach().reshape(-1).to(device) for f in wanted])
        if flat.device.type == "cuda":
            pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            with torch.cuda.device(flat.device):  # the copy and its event on the same stream,
                pinned.copy_(flat, non_blocking=True)  # whichever device is current
                self._event = torch.cuda.Event()
                self._event.record()
            flat = pinned
        elif flat.device.type != "cpu":
            flat = flat.cpu()  # other accelerators: a copy that waits (no event to wait on)
        self._flat = flat

    def read(self) -> HostValues:
        """The numbers, once the copy has landed (this waits for it)."""
        values: dict[str, list[float]] = {}
        if self._flat is not None:
            if self._event is not None:
                self._event.synchronize()
            copied, pos = self._flat.tolist(), 0
            for name, size in self._sizes:
                values[name] = copied[pos : pos + size]
                pos += size
        return HostValues(self.header, values, self._layouts)


class HostValues:
    """A step's numbers on the host, handed out by statistic and row."""

    def __init__(
        self,
        header: Header,
        values: dict[str, list[float]],
        layouts: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]],
    ) -> None:
        self.header = header
        self._values = values
        self._layouts = layouts

    def __contains__(self, statistic: Statistic) -> bool:
        return statistic.name in self._values

    def rows(self, statistic: Statistic) -> dict[int, Row]:
        """Owner (a layer's row, a parameter's position) -> its row, by part."""
        values = self._values.get(statistic.name)
        if values is None:
            return {}
        index, widths = self._layouts[statistic.name]
        if widths is not None:  # rows over time steps: each as long as its sequence
            out, pos = {}, 0
            for owner, width in zip(index, widths):
                size = len(statistic.parts) * width
                out[owner] = statistic.unpack(values[pos : pos + size])
                pos += size
            return out
        parts = statistic.parts
        if index is None:
            index = range(len(values) // len(parts))
        # every row as wide as its parts: one column per part (a deep net's rows are thousands)
        columns = [values[k :: len(parts)] for k in range(len(parts))]
        return dict(zip(index, map(statistic.row._make, zip(*columns))))

    def values(self, statistic: Statistic, part: str) -> dict[int, float]:
        """Owner -> one part of its row (a parameter's norm)."""
        values = self._values.get(statistic.name)
        if values is None:
            return {}
        index, widths = self._layouts[statistic.name]
        parts = statistic.parts
        if widths is None and parts == (part,):  # one number a row: no row objects
            return dict(zip(index if index is not None else range(len(values)), values))
        return {k: getattr(row, part) for k, row in self.rows(statistic).items()}

    def step(self, statistic: Statistic) -> Row | None:
        """The step's one row of a per-step statistic, or None when it was not measured."""
        return self.rows(statistic).get(0)
