"""Diagnosis: pure rules from a :class:`Report`'s measurements to findings with remedies.

No tensors, modules or I/O here. The rules follow the mechanism: the gradient that reaches a layer
is the output-side gradient times the Jacobians of every layer in between.

* **Vanishing / exploding** is a steady exponential trend of the backward signal along a *chain*:
  layers with the same role (same name once indices are replaced by ``#``, same type), such as
  ``layers.#.linear1`` in every block of a transformer or ``#`` for the Linear layers of a plain
  ``nn.Sequential``. Comparing like with like keeps side branches (attention query/key projections)
  and one-off shape changes (pooling, heads) from looking like vanishing. The chain is compared by
  the gradient's norm over the batch, which He/Xavier-style initialisation keeps roughly constant
  across layers of different widths, and a trend whose biggest single step carries most of the
  change is a shape change, not vanishing.
* **Saturation** is reported for bounded activations (sigmoid, tanh, hardtanh, ...), **dead units**
  for ReLU-like ones: a ReLU that is off for half its inputs is working as designed.
* **Non-finite** gradients are always an error, except on a step that a ``GradScaler`` skips while
  its scale is still 1 or more (an fp16 overflow, which it handles).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace

from ..measure.stats import BOUNDED_KINDS, RELU_LIKE_KINDS
from ..report import Finding, LayerStats, Report
from ..report.remedies import remedies
from ..report.words import layer_list
from .activation_rules import Drift, activation_findings, drift, off_xavier, weights_as_of
from .thresholds import Thresholds
from .time_rules import through_time_findings

_DIGITS = re.compile(r"\d+")
_FLOOR = 1e-30  # an exactly-zero signal is far below any threshold, without log(0)


@functools.lru_cache(maxsize=1 << 16)  # the same layer names every logging step
def role(name: str) -> str:
    """A layer's role: its name with every index replaced by ``#`` (``layers.3.fc1`` -> ``layers.#.fc#``)."""
    return _DIGITS.sub("#", name)


@dataclass
class Chain:
    """Layers with one role, input side first, each with a measured backward-signal norm."""

    role: str
    module_type: str
    members: list[LayerStats]
    _chi: tuple | None = field(default=None, repr=False, compare=False)
    _listed: str | None = field(default=None, repr=False, compare=False)

    def log_signal(self) -> list[float]:
        return [math.log10(max(m.signal_norm or 0.0, _FLOOR)) for m in self.members]

    def listed(self) -> str:
        """The members in words, once per chain (every finding on it quotes them)."""
        if self._listed is None:
            names = [s.name for s in self.members]
            self._listed = layer_list(names, self.module_type, limit=6)
        return self._listed

    def chi_prefix(self) -> tuple[dict[str, int], list[float | None]]:
        """Each member's position, and the running sums of log10 chi before each position
        (None from the first member without a usable chi on): computed once per chain, as a
        deep chain's findings each ask for a stretch of it."""
        if self._chi is None:
            prefix: list[float | None] = [0.0]
            for s in self.members:
                c, last = s.gain_factor, prefix[-1]
                ok = last is not None and c is not None and c > 0 and math.isfinite(c)
                prefix.append(last + math.log10(c) if ok else None)
            self._chi = ({s.name: k for k, s in enumerate(self.members)}, prefix)
        return self._chi


def chains(report: Report, min_length: int) -> list[Chain]:
    """Group the parameterised layers with a finite backward signal by role, input side first.

    Two neighbours of a group are compared when their outputs have the same size, or when only
    activations lie between them (a max-pooling, flatten or reshape has no entry): there one
    layer's input gradient is, up to that parameter-free junction, the other's output gradient,
    and the norm is what He init and max-pooling keep level across a change of width or
    resolution (a VGG stack keeps its norm within 0.1-0.7 over five stages, while the RMS drifts
    by the square root of the size ratio). A group is cut where the size changes across anything
    else: stages joined by normalisation, residual or other layers of their own (a vision
    transformer's or MobileNet's stages) reset the scale, so their norms are not comparable."""
    groups: dict[tuple[str, str], list[LayerStats]] = {}
    for s in report.layers.values():
        if s.activation is not None or s.weight_norm is None:
            continue
        if s.signal_norm is None or not math.isfinite(s.signal_norm):
            continue
        groups.setdefault((role(s.name), s.module_type), []).append(s)
    layers: list[LayerStats] = []  # forward order and positions, made at the first size change
    order: dict[str, int] = {}

    def joined(a: LayerStats, b: LayerStats) -> bool:
        if a.output_elements == b.output_elements:
            return True
        if not layers:
            layers.extend(report.layers.values())
            order.update((s.name, k) for k, s in enumerate(layers))
        return all(s.activation is not None for s in layers[order[a.name] + 1 : order[b.name]])

    out = []
    for (r, t), members in groups.items():
        run: list[LayerStats] = []
        for s in members + [None]:  # None closes the last run
            if run and (s is None or not joined(run[-1], s)):
                if len(run) >= min_length:
                    out.append(Chain(r, t, run))
                run = []
            if s is not None:
                run.append(s)
    return out


def diagnose(
    report: Report,
    thresholds: Thresholds | None = None,
    dead_samples: dict[str, tuple[int, float]] | None = None,
    decaying_since: dict[str, tuple[int, int]] | None = None,
    first_gains: dict[str, tuple[int, float]] | None = None,
) -> list[Finding]:
    """All findings for one report: non-finite, vanishing, exploding, saturation, dead units.

    ``dead_samples``: activation -> (logging steps, inputs per unit) over which it has had
    ``dead_units`` above the threshold without a break, this step included; a unit that stays
    dead over several logging steps is dead even at a small batch. Without it, this step only.
    ``decaying_since``: sequence module -> (step, logging steps) since which its signal has
    vanished through time without a break (see :mod:`gradwatch.diagnosis.time_rules`); without it, a decay
    through time is not judged.
    ``first_gains``: layer -> (step, weight gain) when its weights were first measured; a cause
    that quotes weights which training has moved far from there names the drift and leads with
    the step size instead of an init (see :func:`gradwatch.diagnosis.activation_rules.drift`).
    """
    t = thresholds or Thresholds()
    if report.step < t.warmup_steps:
        return []
    if report.skipped:
        return _scaler_stuck(report)
    findings = _nonfinite(report)
    broken = {f.layer for f in findings}
    trend = _trends(report, t, broken, first_gains or {})
    findings += trend
    if decaying_since is not None:
        findings += through_time_findings(report, t, decaying_since)
    explained = _init_collapse(report, t, trend)
    findings += activation_findings(report, t, explained, dead_samples or {}, first_gains)
    return findings


QUOTE_WEIGHTS = ("vanishing", "exploding", "saturation")  # kinds whose cause quotes the weights


# -- non-finite --------------------------------------------------------------------------------


def _scaler_stuck(report: Report) -> list[Finding]:
    """On a step the GradScaler skips, inf/NaN gradients are an fp16 overflow that the scaler
    handles, unless its scale has fallen below 1: then they are inf/NaN without any scaling, and
    the scaler skips every step (it halves its scale each time), so the model no longer trains."""
    scale = report.loss_scale
    if scale is None or scale >= 1:
        return []
    note = (
        f" The GradScaler skips this step, but its scale has fallen to {scale:.3g}: below 1 the "
        "gradients are inf/NaN without any scaling, not an fp16 overflow, and it skips every "
        "step: the model has stopped training."
    )
    return [replace(f, message=f.message + note) for f in _nonfinite(report)]


def _nonfinite(report: Report) -> list[Finding]:
    def broken(s: LayerStats) -> bool:
        return any(
            v is not None and not math.isfinite(v) for v in (s.grad_norm, s.signal, s.weight_norm)
        )

    values = [
        v
        for s in report.layers.values()
        for v in (s.grad_norm, s.signal, s.weight_norm)
        if v is not None
    ]
    if math.isfinite(sum(values)):  # norms are >= 0: a finite sum means every one is finite
        return []
    bad = [s for s in report.layers.values() if broken(s)]
    # The parameterised layers are the ones that learn: name those; an activation only when
    # nothing else is affected (a model without parameters).
    bad = [s for s in bad if s.activation is None] or bad
    if not bad:
        return []
    origin = bad[-1]  # backward runs output side first: the last in forward order is hit first
    inputs_bad = report.input_absmax is not None and not math.isfinite(report.input_absmax)
    where = (
        "the model's inputs contain NaN/Inf"
        if inputs_bad
        else f"it first appears at `{origin.name}` in backward order"
    )
    out = []
    for s in bad:
        weights_bad = s.weight_norm is not None and not math.isfinite(s.weight_norm)
        what = "weights" if weights_bad else "gradients"
        msg = f"layer `{s.name}`: non-finite {what} (NaN/Inf)"
        if s is origin and len(bad) > 1:
            msg += f"; {where}, and {len(bad) - 1} other layers are affected"
        elif s is not origin:
            msg += f" ({where})"
        elif inputs_bad:
            msg += f"; {where}"
        value = s.grad_norm if s.grad_norm is not None else s.signal
        out.append(
            Finding(
                s.name,
                "nonfinite",
                "error",
                value,
                None,
                msg,
                remedies(["check-nonfinite"], f"`{s.name}`: non-finite {what}"),
            )
        )
    return out


# -- vanishing / exploding -----------------------------------------------------------------------


def _trends(
    report: Report, t: Thresholds, skip: set[str], first_gains: dict[str, tuple[int, float]]
) -> list[Finding]:
    order = {name: i for i, name in enumerate(report.layers)}
    out: list[Finding] = []
    for chain in chains(report, t.min_chain_length):
        if any(m.name in skip for m in chain.members):
            continue
        logs = chain.log_signal()
        total = logs[0] - logs[-1]  # < 0: smaller toward the input
        steps = [a - b for a, b in zip(logs, logs[1:])]
        for kind in ("vanishing", "exploding"):
            sign = -1.0 if kind == "vanishing" else 1.0
            limit = math.log10(t.vanishing_ratio if kind == "vanishing" else t.exploding_ratio)
            if sign * total <= sign * limit:
                continue
            largest = max(sign * s for s in steps)
            if largest > t.max_step_share * sign * total:
                continue  # one step carries most of it: a shape change, not a trend
            ref = chain.members[-1]
            # the cause and the remedies are the chain's: explained once, not per layer
            because, ids = _trend_cause(kind, _cause(report, order, chain, first_gains), t)
            if "weights" in because:
                because += weights_as_of(report)
            for m, v in zip(chain.members, logs):
                ratio = 10 ** (v - logs[-1])
                if sign * (v - logs[-1]) <= sign * limit:
                    continue
                severity = "error" if sign * (v - logs[-1]) > 2 * sign * limit else "warning"
                out.append(_trend_finding(kind, severity, m, ref, chain, ratio, because, ids, t))
    return out


@dataclass
class _Cause:
    activation: str | None  # dominant activation kind along the chain
    n_activations: int
    saturation: float | None
    dead_units: float | None
    gain: float | None  # mean weight gain of the chain
    collapsed: int = 0  # activations along the chain with dead units above the threshold
    drift: Drift | None = None  # training moved the chain's weights far from their first scale


def _cause(
    report: Report, order: dict[str, int], chain: Chain, first_gains: dict[str, tuple[int, float]]
) -> _Cause:
    lo, hi = order[chain.members[0].name], order[chain.members[-1].name]
    acts = [s for s in report.layers.values() if s.activation and lo <= order[s.name] <= hi]
    kinds: dict[str, int] = {}
    for s in acts:
        kinds[s.activation] = kinds.get(s.activation, 0) + 1
    dominant = max(kinds, key=kinds.get) if kinds else None
    same = [s for s in acts if s.activation == dominant]
    gains = [m.weight_gain for m in chain.members if m.weight_gain is not None]
    collapsed = sum(1 for s in same if s.dead_units is not None and s.dead_units >= 0.5)
    return _Cause(
        dominant,
        len(same),
        _mean([s.saturation for s in same]),
        _mean([s.dead_units for s in same]),
        _mean(gains),
        collapsed,
        drift(chain.members, first_gains),
    )


def _init_collapse(report: Report, t: Thresholds, trend: list[Finding]) -> set[str]:
    """Activations whose dead units are explained by an under-initialised vanishing chain.

    With too-small weights the pre-activations of deep ReLU layers shrink to their biases, so
    about half the units sit off for every input. That is the vanishing finding's cause (fixed by
    He init), not units killed by large updates: report it there, not as a separate finding.
    """
    names = list(report.layers)
    position = {n: i for i, n in enumerate(names)}
    starts = [
        position[f.layer]
        for f in trend
        if f.kind == "vanishing" and any(r.id == "he-init" for r in f.remedies)
    ]
    if not starts:
        return set()
    return {n for n in names[min(starts) :] if report.layers[n].activation in RELU_LIKE_KINDS}


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def _trend_finding(
    kind: str,
    severity: str,
    m: LayerStats,
    ref: LayerStats,
    chain: Chain,
    ratio: float,
    because: str,
    ids: list[str],
    t: Thresholds,
) -> Finding:
    threshold = t.vanishing_ratio if kind == "vanishing" else t.exploding_ratio
    rel = "of" if kind == "vanishing" else "times"
    msg = (
        f"layer `{m.name}`: backward signal is {ratio:.1e} {rel} that at `{ref.name}`, the output "
        f"side of {chain.listed()} "
        f"(like layers, compared by the norm of their output gradient; threshold {threshold:g}): "
        f"{kind} gradients"
    )
    msg += _predicted(chain, m, ref)
    if kind == "vanishing":
        msg += ", so this layer barely learns."
    else:
        msg += ", so updates to this layer are unstable."
        if m.relative_grad is not None:
            msg += f" Its gradient is {m.relative_grad:.1e} times its weights' norm."
    ctx = f"`{m.name}`: {kind} signal"  # no value: the same remedies step after step
    return Finding(m.name, kind, severity, ratio, threshold, msg + because, remedies(ids, ctx))


def _predicted(chain: Chain, m: LayerStats, ref: LayerStats) -> str:
    """What the mean-field theory predicts for the same ratio: sqrt of the product of the gain
    factors chi of the layers from ``m`` to ``ref`` (variances multiply, norms go as the root)."""
    index, prefix = chain.chi_prefix()
    i, j = index[m.name], index[ref.name]
    if i >= j or prefix[j] is None or prefix[i] is None:
        return ""
    log_product = prefix[j] - prefix[i]
    mean = 10 ** (log_product / (j - i))
    return (
        f"; the theory predicts {10 ** (log_product / 2):.1e} from the weights and the measured "
        f"activation derivatives (chi = n_out x Var[W] x E[phi'^2] averages {mean:.2g} over the "
        f"{j - i} layers in between, and 1 would keep the signal level)"
    )


INIT_REMEDIES = ("he-init", "xavier-init", "lecun-init", "orthogonal-init")


def _trend_cause(kind: str, cause: _Cause, t: Thresholds) -> tuple[str, list[str]]:
    """What a chain's vanishing or exploding comes from, as the messages' last sentences, and the
    remedies that answer it. Weights that training has moved far from their first scale are the
    step size's doing, not the init's: the drift is named, the step size leads, and no init
    remedy is offered (an init answers the scale a model is built with)."""
    d = cause.drift
    if d is None:
        return _built_cause(kind, cause, t)
    msg, ids = _built_cause(kind, replace(cause, gain=None), t)  # no sentence on the weights
    gain = f", to {cause.gain:.3g}/sqrt(fan_in)" if cause.gain is not None else ""
    msg += f" Cause: {d.words()}{gain}: training, not the initialisation, set their scale"
    kept = [i for i in ids if i not in INIT_REMEDIES and i not in ("lower-lr", "gradient-clipping")]
    if d.factor > 1:
        msg += ", through updates too large for them."
        return msg, ["lower-lr", "gradient-clipping"] + kept
    msg += " (weight decay, or updates that shrank them)."
    return msg, kept + ["lower-lr"]


def _built_cause(kind: str, cause: _Cause, t: Thresholds) -> tuple[str, list[str]]:
    """:func:`_trend_cause` for weights at the scale the model was built with."""
    act, msg = cause.activation, ""
    if act in BOUNDED_KINDS:
        msg += f" Cause: {cause.n_activations} {act} activations between them"
        if cause.saturation is not None and cause.saturation >= 0.01:
            msg += f" ({100 * cause.saturation:.0f}% saturated on average)"
        msg += (
            ": each multiplies the signal by its derivative, at most 1/4 for sigmoid."
            if act == "sigmoid"
            else ": each multiplies the signal by its derivative, below 1."
        )
        ids = (
            ["relu-family", "normalization", "residual"]
            if kind == "vanishing"
            else ["gradient-clipping", "xavier-init", "lower-lr"]
        )
        off = off_xavier(cause.gain)
        if off:
            msg += f" The weights {off}."
            ids = ["xavier-init"] + [i for i in ids if i != "xavier-init"]
    elif act in RELU_LIKE_KINDS:
        gain = cause.gain
        low_init = gain is not None and gain < t.he_gain
        if low_init:
            msg += (
                f" Cause: {act} layers with weights at {gain:.2f}/sqrt(fan_in) "
                f"(He init for ReLU is 1.41/sqrt(fan_in))."
            )
            if cause.collapsed:
                msg += (
                    f" {cause.collapsed} of these {act} layers also have half or more of "
                    f"their units off for the whole batch: the same collapse."
                )
        if kind == "vanishing":
            ids = (
                ["he-init", "normalization", "residual"]
                if low_init
                else ["normalization", "residual"]
            )
            if cause.dead_units is not None and cause.dead_units >= t.dead_units:
                ids.append("leaky-relu")
        else:
            ids = ["gradient-clipping", "he-init", "lower-lr"]
            if gain is not None and gain > 2 * 1.41:
                msg += (
                    f" Cause: weights at {gain:.2f}/sqrt(fan_in), far above He init's "
                    f"1.41/sqrt(fan_in)."
                )
    else:
        ids = (
            ["xavier-init", "normalization", "residual"]
            if kind == "vanishing"
            else ["gradient-clipping", "xavier-init", "lower-lr"]
        )
    return msg, ids
