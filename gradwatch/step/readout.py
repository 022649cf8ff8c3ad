"""From one step's message, on the host, to a :class:`LayerStats` per layer: every declared
per-layer statistic read out by its own ``read``, and the parameter norms put together per layer.
It needs the message alone (no module, parameter or hook)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from ..measure import stats
from ..measure.statistics import (
    ADAM_HEALTH,
    ELEMENTS,
    FLAT_AND_DEAD,
    GRAD,
    INPUT,
    INPUT_ABSMAX,
    LAYER_STATISTICS,
    LOSS_SCALE,
    LOSSES,
    UPDATE,
    WEIGHT,
    Context,
)
from ..report import LayerStats, Report
from .message import HostValues, LayerFacts

# The per-layer statistics that read out into LayerStats fields, in order.
READ_OUT = (*LAYER_STATISTICS, FLAT_AND_DEAD)


@dataclass
class Weighing:
    """When the weights are read, and what they were when last read: a logging step reads them
    on every ``every``-th measured step (and after a non-finite one), and the steps between
    carry the last values. The training thread decides (:meth:`arm`, :meth:`count`); whoever
    finishes a step (the worker) keeps the values and may ask for a reading (:meth:`read_next`)."""

    every: int = 10
    layers: dict[str, tuple] = field(default_factory=dict)  # norm, gain, recurrent facts
    step: int | None = None  # the step they were last read at
    next: bool = True  # the next logging step reads them
    measured: int = 0  # logging steps measured
    reread: bool = False  # asked for by a finished step: the next logging step armed reads them

    def arm(self) -> bool:
        """Whether the next logging step reads the weights (the probes then measure E[phi'^2])."""
        if self.reread:
            self.next, self.reread = True, False
        return self.next

    def count(self) -> None:
        """A logging step was handed over."""
        self.measured += 1
        self.next = self.measured % self.every == 0

    def read_next(self) -> None:
        """Read them on the next logging step armed: after a non-finite one the carried norms
        may be stale either way (NaN weights, or a run rolled back to a checkpoint)."""
        self.reread = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "next": self.next or self.reread,
            "measured": self.measured,
            "step": self.step,
            "layers": {k: list(v) for k, v in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next, self.measured = bool(state["next"]), int(state["measured"])
        self.reread = False
        self.step = None if state["step"] is None else int(state["step"])
        self.layers = {str(k): tuple(v) for k, v in state["layers"].items()}


def layer_stats(host: HostValues, weights: dict[str, tuple], scale: float) -> dict[str, LayerStats]:
    """One row per watched layer, in forward order. ``weights`` (layer -> weight norm, gain and
    recurrent facts as last read) is updated when the step read them, and carried when not.
    ``scale``: the loss scale the backward signal is divided by."""
    h = host.header
    grad_of = host.values(GRAD, "norm")
    weight_of = host.values(WEIGHT, "norm")
    update_of = host.values(UPDATE, "norm")
    health = host.rows(ADAM_HEALTH)
    layers: dict[str, LayerStats] = {}
    for f, pooled in zip(h.layers, h.pooled):
        s = LayerStats(f.name, f.module_type, activation=f.kind)
        if f.kind is not None:
            s.pooled = pooled
        if f.params:
            s.grad_norm = _combined(f.params, grad_of)
            if h.weighed:
                _weigh(f, s, weight_of, h.recurrent, weights)
            else:
                (s.weight_norm, s.weight_gain, s.recurrent_gain, s.gate_bias) = weights.get(
                    f.name, (None,) * 4
                )
            s.update_gain = update_gain(f, update_of)
            if health:
                adam_health(f, s, health, _combined(f.params, update_of))
        layers[f.name] = s
    seen = [layers[h.layers[k].name] for k in h.seen]  # per row of the per-layer statistics
    for s, calls in zip(seen, h.calls):
        s.calls = calls
    summed = host.values(ELEMENTS, "count")  # every rank's, when the step was combined
    elements = [summed[i] for i in range(len(h.elements))] if summed else h.elements
    contexts = list(map(Context._make, zip(itertools.repeat(scale), elements, h.units)))
    for statistic in READ_OUT:
        read = statistic.read
        for i, row in host.rows(statistic).items():
            for name, value in read(row, contexts[i]).items():
                setattr(seen[i], name, value)
    if h.weighed:  # a piecewise-linear activation's E[phi'^2] from its flat fraction
        for s in seen:
            if (
                s.dphi2 is None
                and s.activation in stats.PIECEWISE_DPHI2
                and s.saturation is not None
            ):
                s.dphi2 = stats.PIECEWISE_DPHI2[s.activation] * (1 - s.saturation)
    gain_factors(h.layers, layers)
    return layers


def gain_factors(facts: tuple[LayerFacts, ...], layers: dict[str, LayerStats]) -> None:
    """chi = n_out x Var[W] x E[phi'(z)^2] of each Linear/conv layer (mean-field theory: the
    factor on the backward signal's variance across the layer), from its weight gain and the
    activation that follows it in forward order; 1 for that factor when a Linear or conv
    follows. Only where both were measured on this step."""
    for k, f in enumerate(facts[:-1]):
        s = layers[f.name]
        if not f.fan_in or not f.fan_out or s.weight_gain is None:
            continue
        after = facts[k + 1]
        d = layers[after.name].dphi2 if after.kind is not None else None
        if after.kind is None and after.fan_out and layers[after.name].weight_gain is not None:
            d = 1.0
        if d is not None:
            s.gain_factor = f.fan_out / f.fan_in * s.weight_gain**2 * d


def reweigh(
    report: Report,
    facts: tuple[LayerFacts, ...],
    weight_of: dict[int, float],
    recurrent: dict[str, tuple],
    weights: dict[str, tuple],
) -> None:
    """Put weights read after the fact (by position) into the report's rows, and remember them."""
    for f in facts:
        if f.params and f.name in report.layers:
            _weigh(f, report.layers[f.name], weight_of, recurrent, weights)


def _weigh(
    f: LayerFacts,
    s: LayerStats,
    weight_of: dict[int, float],
    recurrent: dict[str, tuple],
    weights: dict,
) -> None:
    """A row's weight norm, gain and recurrent facts from this step's weights, remembered for
    the steps that do not read them."""
    s.weight_norm = _combined(f.params, weight_of)
    if f.fan_in and f.matrix in weight_of:  # RMS(W) x sqrt(fan_in) of its weight matrix
        s.weight_gain = weight_of[f.matrix] * math.sqrt(f.fan_in / f.matrix_numel)
    if f.sequence:  # 0-d tensors, read here (off the training thread)
        s.recurrent_gain, s.gate_bias = (
            None if v is None else float(v) for v in recurrent.get(f.name, (None, None))
        )
    weights[f.name] = (s.weight_norm, s.weight_gain, s.recurrent_gain, s.gate_bias)


def _combined(positions: tuple[int, ...], norms: dict[int, float]) -> float | None:
    """The norm of a layer's parameters together, from theirs (None: none was measured)."""
    found = [norms[k] for k in positions if k in norms]
    return stats.combine_norms(found) if found else None


def update_gain(f: LayerFacts, update_of: dict[int, float]) -> float | None:
    """RMS of the next update of a layer's weight matrix times sqrt(fan_in): on the scale of
    ``weight_gain``, how far one step moves the layer."""
    if not f.fan_in or f.matrix not in update_of:
        return None
    return update_of[f.matrix] * math.sqrt(f.fan_in / f.matrix_numel)


def adam_health(
    f: LayerFacts, s: LayerStats, health: dict[int, Any], update_norm: float | None
) -> None:
    """A layer's Adam step, from its parameters' ADAM_HEALTH rows: the step's RMS (before the
    learning rate), its epsilon-dominated share, its cosine with the negative gradient, and the
    update's norm over the weights'."""
    rows = [health[k] for k in f.params if k in health]
    if not rows or not f.numel:
        return
    sumsq = sum(r.step_sumsq for r in rows)
    s.adam_step_rms = math.sqrt(sumsq / f.numel)
    # Of the weight matrix alone: a bias or norm gain can have a gradient that is rounding
    # noise by symmetry (a key bias shifts every logit of a query alike), eps-bound and harmless.
    matrix = health.get(f.matrix) if f.matrix is not None else None
    if matrix is not None and matrix.active:
        s.adam_epsilon_share = matrix.eps_bound / matrix.active
    if sumsq > 0 and s.grad_norm:
        s.update_cosine = sum(r.dot for r in rows) / (math.sqrt(sumsq) * s.grad_norm)
    if update_norm is not None and s.weight_norm:
        s.update_ratio = update_norm / s.weight_norm


def losses_of(host: HostValues) -> list[tuple[int, float]]:
    """(step, loss) of the steps since the last logging step that gave one."""
    row = host.step(LOSSES)
    return list(zip(host.header.loss_steps, row.loss)) if row is not None else []


def input_scale(host: HostValues) -> tuple[float | None, float | None]:
    """RMS and largest absolute value of the model's floating-point inputs, when measured."""
    row, top = host.step(INPUT), host.step(INPUT_ABSMAX)
    if row is None or top is None or not row.count:
        return None, None
    return math.sqrt(row.sumsq / row.count), top.absmax


def loss_scale_of(host: HostValues) -> float | None:
    """The GradScaler's scale on this step (None: no scaler, or one that is off)."""
    row = host.step(LOSS_SCALE)
    return row.scale if row is not None else host.header.loss_scale
