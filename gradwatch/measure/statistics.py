"""Every statistic a logging step carries from the hooks to the report, declared once.

A declaration says (as torchmetrics' ``add_state(name, default, dist_reduce_fx)`` does):

- what one row holds: its ``parts``, accumulated on the device (the hooks add rows with
  :meth:`Statistic.add`, in fp64 where the part is a sum) or, for ``counted`` statistics, in
  Python integers kept with the layer;
- what a row belongs to (``per``): a layer, a parameter, one unit of an activation, or the step;
- how ranks combine it (``combine``): ``SUM``; ``NORM`` (L2 norms of pieces of one tensor spread
  over ranks, told which ranks hold the same piece); ``MAX``; ``KEEP`` (each rank its own);
- whether the host reads it, and how a row reads out (``read``: the row's parts and the layer's
  :class:`Context` -> the :class:`~gradwatch.LayerStats` fields it ``fills``).

Only this module knows the order of a row's parts (:meth:`Statistic.pack`, :meth:`Statistic.pack_rows`,
:meth:`Statistic.unpack`);
:mod:`gradwatch.step.message` packs whole rows into the step's message and back, and
:mod:`gradwatch.step.readout` reads every layer statistic through ``read``.

A new per-layer statistic: its declaration here (added to :data:`LAYER_STATISTICS`), its hook
(calling ``entry.add(STAT, STAT.pack(...))``), its ``LayerStats`` field, its rule, its test and
its line in ``docs/metrics.md``.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

LAYER, PARAMETER, UNIT, STEP = "layer", "parameter", "unit", "step"
SUM, NORM, MAX, KEEP = "sum", "norm", "max", "keep"


class Context(NamedTuple):
    """What a layer's readout may use besides its own row (a tuple: one is made per layer)."""

    scale: float = 1.0  # the backward signal is divided by it (loss scale x ranks averaged)
    elements: float = 0  # activation elements the layer saw (combined over ranks when they were)
    units: int = 0  # its units (an activation)


Row = Any  # a named tuple of the statistic's parts: numbers, or lists over time steps (``steps``)


@dataclass(frozen=True, eq=False)  # one object per statistic: compared by identity
class Statistic:
    """One statistic, declared: see the module's docstring."""

    name: str
    per: str
    parts: tuple[str, ...]
    combine: str
    doc: str
    fills: tuple[str, ...] = ()  # LayerStats fields that ``read`` sets
    read: Callable[[Row, Context], dict[str, Any]] | None = None
    host: bool = True  # the host reads it (else it only feeds another statistic on the device)
    steps: bool = False  # each part is a sequence over time steps: a row is (parts, time steps)
    counted: bool = False  # counted in Python integers on the host, not in device tensors

    def pack(self, dtype: torch.dtype = torch.float64, **parts: Any) -> torch.Tensor:
        """One row from its parts (tensors or numbers), in the declared order, in ``dtype``
        (fp64: a vanishing norm of 1e-20 squares below fp32's range). Traced code calls it too:
        plain loops only."""
        values = [parts[p] for p in self.parts]
        device = None
        for v in values:
            if isinstance(v, torch.Tensor):
                device = v.device
                break
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in values])

    def pack_rows(self, **columns: torch.Tensor) -> torch.Tensor:
        """Many rows at once from one column per part (one value per row each): ``(rows, parts)``,
        in the columns' dtype."""
        return torch.stack([columns[p] for p in self.parts], dim=-1)

    @functools.cached_property
    def row(self) -> type:
        """The named tuple a row reads back as on the host (``row.sumsq``, ``row.count``)."""
        return collections.namedtuple(self.name, self.parts)

    def unpack(self, values: list[float]) -> Row:
        """A row read back on the host, by part."""
        if self.steps:
            width = len(values) // len(self.parts)
            return self.row._make(
                values[k * width : (k + 1) * width] for k in range(len(self.parts))
            )
        return self.row._make(values)

    def add(self, total: torch.Tensor | None, row: torch.Tensor) -> torch.Tensor:
        """``total + row``: the accumulated form (a row of time steps grows to the longest)."""
        if total is None:
            return row
        if self.combine == MAX:  # the largest over calls, as over ranks
            return torch.maximum(total, row.to(total.device))
        if self.steps and total.shape[-1] != row.shape[-1]:
            width = max(total.shape[-1], row.shape[-1])
            grown = torch.zeros(len(self.parts), width, dtype=total.dtype, device=row.device)
            grown[:, : total.shape[-1]] += total.to(row.device)
            grown[:, : row.shape[-1]] += row
            return grown
        return total + row.to(total.device)


# -- readouts: a row and the layer's context -> LayerStats fields ----------------------------------


def _signal(r: Row, c: Context) -> dict[str, Any]:
    if not r.count:
        return {}
    sumsq = r.sumsq / (c.scale * c.scale)
    return {
        "signal": math.sqrt(sumsq / r.count),
        "signal_norm": math.sqrt(sumsq),
        "output_elements": int(r.count),
    }


def _time_signal(r: Row, c: Context) -> dict[str, Any]:
    profile = [math.sqrt(q / n) / c.scale if n else None for q, n in zip(r.sumsq, r.count)]
    return {"time_signal": profile}


def _mean(field: str) -> Callable[[Row, Context], dict[str, Any]]:
    def read(r: Row, c: Context) -> dict[str, Any]:
        return {field: r.sum / r.count} if r.count else {}

    return read


def _flat_and_dead(r: Row, c: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c.elements:
        out["saturation"] = r.flat / c.elements
    if c.units:
        out["dead_units"] = r.dead / c.units
        out["active_units"] = r.active / c.units
        out["units"] = c.units
        out["samples_per_unit"] = c.elements / c.units
    return out


def _attention(r: Row, c: Context) -> dict[str, Any]:
    queries = sum(r.queries)
    if not queries:
        return {}
    means = [e / q for e, q in zip(r.entropy_sum, r.queries) if q]
    return {"attention_entropy": sum(r.entropy_sum) / queries, "attention_entropy_min": min(means)}


def _log_z(r: Row, c: Context) -> dict[str, Any]:
    if not r.count:
        return {}
    return {"log_z_mean": r.sum / r.count, "logit_mean": r.level / r.count}


# -- the declarations ------------------------------------------------------------------------------

SIGNAL = Statistic(
    "signal",
    LAYER,
    ("sumsq", "count"),
    SUM,
    "the gradient reaching the layer's outputs: its sum of squares and its elements",
    ("signal", "signal_norm", "output_elements"),
    _signal,
)
SHARED_SIGNAL = Statistic(
    "shared_signal",
    LAYER,
    ("grad",),
    SUM,
    "an output shared by every sample (a position embedding's, batch dim 1): its gradient "
    "itself, added over micro-batches and ranks as the parameters' are; SIGNAL is its norm",
    host=False,
    steps=True,  # one column per element
)
TIME_SIGNAL = Statistic(
    "time_signal",
    LAYER,
    ("sumsq", "count"),
    SUM,
    "a sequence module: per time step, its input gradient's sum of squares and elements",
    ("time_signal",),
    _time_signal,
    steps=True,
)
STATE_DERIVATIVE = Statistic(
    "state_derivative",
    LAYER,
    ("sum", "count"),
    SUM,
    "a tanh RNN: the sum of tanh' over its output, and how many values",
    ("state_derivative",),
    _mean("state_derivative"),
)
DPHI2 = Statistic(
    "dphi2",
    LAYER,
    ("sum", "count"),
    SUM,
    "an activation, on steps that read the weights: the sum of phi'(z)**2, and how many values",
    ("dphi2",),
    _mean("dphi2"),
)
FLAT_AND_DEAD = Statistic(
    "flat_and_dead",
    LAYER,
    ("flat", "dead", "active"),
    KEEP,  # made from the unit counts after they are combined
    "an activation: its flat elements, its units flat for every sample, its units never flat",
    ("saturation", "dead_units", "active_units", "units", "samples_per_unit"),
    _flat_and_dead,
)
ELEMENTS = Statistic(
    "elements",
    LAYER,
    ("count",),
    SUM,
    "an activation: the elements of its outputs (their units x samples)",
    counted=True,
)
UNIT_FLAT = Statistic(
    "unit_flat",
    UNIT,
    ("count",),
    SUM,
    "per unit of an activation: how many of its elements were flat",
    host=False,
)
UNIT_ELEMENTS = Statistic(
    "unit_elements", UNIT, ("count",), SUM, "per unit of an activation: its elements", host=False
)
ATTENTION = Statistic(
    "attention",
    LAYER,
    ("entropy_sum", "queries"),
    SUM,
    "an attention layer, per head: its queries' attention entropies (nats) summed, and how many",
    ("attention_entropy", "attention_entropy_min"),
    _attention,
    steps=True,  # one column per head
)
ATTENTION_PEAK = Statistic(
    "attention_peak",
    LAYER,
    ("max_logit",),
    MAX,
    "an attention layer: its largest pre-softmax logit (of a query with a key left)",
    ("attention_max_logit",),
    lambda r, c: {"attention_max_logit": r.max_logit} if math.isfinite(r.max_logit) else {},
)
LOG_Z = Statistic(
    "log_z",
    LAYER,
    ("sum", "level", "count"),
    SUM,
    "an output head, over its positions: log Z (logsumexp of the logits) summed, the logits' "
    "mean over classes summed, and how many positions",
    ("log_z_mean", "logit_mean"),
    _log_z,
)
LOG_Z_PEAK = Statistic(
    "log_z_peak",
    LAYER,
    ("absmax",),
    MAX,
    "an output head: the largest |log Z| of any position",
    ("log_z_max",),
    lambda r, c: {"log_z_max": r.absmax},
)
GRAD = Statistic("grad", PARAMETER, ("norm",), NORM, "the L2 norm of a parameter's .grad")
WEIGHT = Statistic("weight", PARAMETER, ("norm",), NORM, "the L2 norm of a parameter")
UPDATE = Statistic(
    "update", PARAMETER, ("norm",), NORM, "the L2 norm of the optimizer's next update"
)
INPUT = Statistic(
    "input", STEP, ("sumsq", "count"), SUM, "the model's floating inputs: sum of squares, elements"
)
INPUT_ABSMAX = Statistic(
    "input_absmax", STEP, ("absmax",), MAX, "the model's floating inputs: largest |value|"
)
ADAM_HEALTH = Statistic(
    "adam_health",
    PARAMETER,
    ("eps_bound", "active", "dot", "step_sumsq"),
    KEEP,  # measured where every rank holds the whole parameter and the same state
    "an Adam-family parameter's next step: weights with a gradient whose sqrt(v_hat) is below "
    "epsilon, weights with a gradient, <step, grad> and |step|^2 (the step before the lr)",
)
LOSSES = Statistic(
    "losses",
    STEP,
    ("loss",),
    KEEP,  # each rank's own loss
    "the loss of each step since the last logging step (gw.step(loss=...))",
    steps=True,
)
LOSS_SCALE = Statistic(
    "loss_scale", STEP, ("scale",), KEEP, "the GradScaler's scale, read on the device"
)

# The per-layer statistics the hooks accumulate on the device, in the order they are read out.
LAYER_STATISTICS = (
    SIGNAL,
    TIME_SIGNAL,
    STATE_DERIVATIVE,
    DPHI2,
    ATTENTION,
    ATTENTION_PEAK,
    LOG_Z,
    LOG_Z_PEAK,
)
STATISTICS = {
    s.name: s
    for s in (
        *LAYER_STATISTICS,
        FLAT_AND_DEAD,
        SHARED_SIGNAL,
        ELEMENTS,
        UNIT_FLAT,
        UNIT_ELEMENTS,
        GRAD,
        WEIGHT,
        UPDATE,
        ADAM_HEALTH,
        LOSSES,
        INPUT,
        INPUT_ABSMAX,
        LOSS_SCALE,
    )
}
