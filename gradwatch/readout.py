"""From one step's host values to a :class:`LayerStats` per layer: the arithmetic that turns sums
of squares, counts and norms into the report's numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import stats
from .probes import Entry, Taken
from .report import LayerStats, Report


@dataclass
class Weighing:
    """When the weights are read, and what they were when last read: a logging step reads them
    on every ``weight_norm_every``-th measured step (and after a non-finite one), and the steps
    between carry the last values."""

    layers: dict[str, tuple] = field(default_factory=dict)  # norm, gain, recurrent facts
    step: int | None = None  # the step they were last read at
    next: bool = True  # the next logging step reads them
    measured: int = 0  # logging steps measured

    def after_step(self, every: int, nonfinite: bool) -> None:
        """A logging step was measured. After a non-finite one the carried norms may be stale
        either way (NaN weights, or a run rolled back to a checkpoint): read them again."""
        self.measured += 1
        self.next = self.measured % every == 0 or nonfinite

    def state_dict(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "measured": self.measured,
            "step": self.step,
            "layers": {k: list(v) for k, v in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next, self.measured = bool(state["next"]), int(state["measured"])
        self.step = None if state["step"] is None else int(state["step"])
        self.layers = {str(k): tuple(v) for k, v in state["layers"].items()}


def layer_stats(
    entries: list[Entry],
    taken: Taken,
    host: dict[str, list[float]],
    measured: tuple[dict[int, float], dict[int, float], dict[int, float], bool],
    weights: dict[str, tuple],
    scale: float,
    combined: bool,
) -> dict[str, LayerStats]:
    """One row per entry, in forward order. ``measured``: the parameters' gradient, weight and
    next-update norms by ``id``, and whether the weights were read on this step; ``weights`` (layer ->
    weight norm, gain and recurrent facts as last read) is updated when they were, and carried
    when not. ``scale``: the loss scale the backward signal is divided by."""
    grad_of, weight_of, update_of, weigh = measured
    n = len(taken.entries)
    signal = host.get("signal", [0.0] * (2 * n))
    signal_sumsq, signal_count = signal[0::2], signal[1::2]
    elems = host["elems"] if combined else taken.elems
    flat_dead = host.get("flat_dead", [0.0] * (3 * n))
    flat, dead, active = flat_dead[:n], flat_dead[n : 2 * n], flat_dead[2 * n :]
    calls, units = taken.calls, taken.units
    index = {e: i for i, e in enumerate(taken.entries)}
    profiles = time_profiles(taken, host, scale)
    derivs = _split(host.get("derivs", []), [(i, 2) for i, _ in taken.derivs])
    dphi2 = _split(host.get("dphi2", []), [(i, 2) for i, _ in taken.dphi2])
    layers: dict[str, LayerStats] = {}
    for e in entries:
        s = LayerStats(e.name, e.module_type, activation=e.kind)
        if e.kind is not None:
            s.pooled = e.one_per_unit
        if e.params:
            s.grad_norm, _, _ = stats.layer_norms(e.params, e.fan_in, grad_of, {})
            if weigh:
                _weigh(e, s, weight_of, weights)
            else:
                (s.weight_norm, s.weight_gain, s.recurrent_gain, s.gate_bias) = weights.get(
                    e.name, (None,) * 4
                )
            s.update_gain = update_gain(e, update_of)
        i = index.get(e)
        if i is not None:
            s.calls = calls[i]
            if signal_count[i]:
                sumsq = signal_sumsq[i] / (scale * scale)
                s.signal = math.sqrt(sumsq / signal_count[i])
                s.signal_norm = math.sqrt(sumsq)
                s.output_elements = int(signal_count[i])
            if elems[i]:
                s.saturation = flat[i] / elems[i]
            if units[i]:
                s.dead_units = dead[i] / units[i]
                s.active_units, s.units = active[i] / units[i], units[i]
                s.samples_per_unit = elems[i] / units[i]
            s.time_signal = profiles.get(i)
            if i in derivs and derivs[i][1]:
                s.state_derivative = derivs[i][0] / derivs[i][1]
            if i in dphi2 and dphi2[i][1]:
                s.dphi2 = dphi2[i][0] / dphi2[i][1]
            elif weigh and e.kind in stats.PIECEWISE_DPHI2 and s.saturation is not None:
                s.dphi2 = stats.PIECEWISE_DPHI2[e.kind] * (1 - s.saturation)
        layers[e.name] = s
    gain_factors(entries, layers)
    return layers


def gain_factors(entries: list[Entry], layers: dict[str, LayerStats]) -> None:
    """chi = n_out x Var[W] x E[phi'(z)^2] of each Linear/conv layer (mean-field theory: the
    factor on the backward signal's variance across the layer), from its weight gain and the
    activation that follows it in forward order; 1 for that factor when a Linear or conv
    follows. Only where both were measured on this step."""
    for k, e in enumerate(entries[:-1]):
        s = layers[e.name]
        if not e.fan_in or not e.fan_out or s.weight_gain is None:
            continue
        after = entries[k + 1]
        d = layers[after.name].dphi2 if after.kind is not None else None
        if after.kind is None and after.fan_out and layers[after.name].weight_gain is not None:
            d = 1.0
        if d is not None:
            s.gain_factor = e.fan_out / e.fan_in * s.weight_gain**2 * d


def reweigh(
    report: Report, entries: list[Entry], weight_of: dict[int, float], weights: dict[str, tuple]
) -> None:
    """Put weights read after the fact (by ``id``) into the report's rows, and remember them."""
    for e in entries:
        if e.params and e.name in report.layers:
            _weigh(e, report.layers[e.name], weight_of, weights)


def _weigh(e: Entry, s: LayerStats, weight_of: dict[int, float], weights: dict) -> None:
    """A row's weight norm, gain and recurrent facts from this step's weights, remembered for
    the steps that do not read them."""
    _, s.weight_norm, s.weight_gain = stats.layer_norms(e.params, e.fan_in, {}, weight_of)
    if e.time_axis is not None:
        s.recurrent_gain, s.gate_bias = stats.recurrent_facts(e.module)
    weights[e.name] = (s.weight_norm, s.weight_gain, s.recurrent_gain, s.gate_bias)


def update_gain(entry: Entry, update_of: dict[int, float]) -> float | None:
    """RMS of the next update of a layer's weight matrix times sqrt(fan_in): on the scale of
    ``weight_gain``, how far one step moves the layer."""
    if not entry.fan_in or not update_of:
        return None
    for p in entry.params:
        if p.dim() >= 2 and id(p) in update_of:
            return update_of[id(p)] * math.sqrt(entry.fan_in / p.numel())
    return None


def time_profiles(taken: Taken, host: dict[str, list[float]], scale: float) -> dict[int, list]:
    """Entry index -> RMS of its input's gradient at each time step (None where no element)."""
    out = {}
    widths = [(i, t.shape[1]) for i, t in taken.time]
    for i, values in _split(host.get("time", []), [(i, 2 * w) for i, w in widths]).items():
        w = len(values) // 2
        sumsq, count = values[:w], values[w:]
        out[i] = [math.sqrt(q / c) / scale if c else None for q, c in zip(sumsq, count)]
    return out


def _split(values: list[float], sizes: list[tuple[int, int]]) -> dict[int, list[float]]:
    out, pos = {}, 0
    for i, size in sizes:
        out[i] = values[pos : pos + size]
        pos += size
    return out


def input_scale(host: dict[str, list[float]]) -> tuple[float | None, float | None]:
    """RMS and largest absolute value of the model's floating-point inputs, when measured."""
    if "input" not in host:
        return None, None
    (sumsq, count), (absmax,) = host["input"], host["input_absmax"]
    return (math.sqrt(sumsq / count), absmax) if count else (None, None)
