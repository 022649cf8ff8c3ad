"""Every threshold of the diagnosis in one frozen record, checked when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the diagnosis, with its default.

    Example::

        >>> Thresholds(vanishing_ratio=1e-4).exploding_ratio
        1000.0
        >>> Thresholds(saturation=1.5)
        Traceback (most recent call last):
        ...
        ValueError: Thresholds.saturation must be in (0, 1], got 1.5

    Attributes:
        vanishing_ratio: a layer whose backward-signal norm is below this fraction of the
            output-side end of its chain is vanishing (an error below the square of it).
        exploding_ratio: above this multiple it is exploding (an error above the square).
        min_chain_length: chains shorter than this are not judged for vanishing/exploding.
        max_step_share: the largest single step of a chain may carry at most this share of the
            chain's total change (in log scale); more means a one-off drop, not a steady trend.
        saturation: fraction of a bounded activation's outputs in the flat region that makes a
            finding (an error from ``saturation_error`` on).
        saturation_eps: "flat" means a local derivative below this fraction of its largest.
        dead_units: fraction of a ReLU-like activation's units that are off for the whole batch
            that makes a finding (an error from ``dead_units_error`` on).
        min_samples_per_unit: dead units are judged only when each unit saw this many values.
        input_rms: inputs with an RMS above this count as unscaled.
        he_gain: a ReLU chain whose weights' RMS * sqrt(fan_in) is below this is under-initialised
            (He gives 1.41, PyTorch's default 0.58).
        warmup_steps: no finding before this optimizer step.
        jump_ratio: a logging step whose global gradient norm is this many times its recent
            median (and far outside the run's own spread) is diverging; with fewer than five
            earlier logging steps, the square of it.
        growth_ratio: a gradient norm that rose on nearly every one of the last 6-64 logging
            steps, by this factor in all, is diverging.
        max_update_gain: when the optimizer is known, a Linear/conv layer whose next update
            moves it by this many times the larger of 1 and its weight gain (both as RMS x
            sqrt(fan_in), 1 being a He/Xavier initialisation's worth) is diverging.
        time_patience: a sequence module's gradient that vanishes through time (its first time
            steps below ``vanishing_ratio`` of its last) is a finding once it has done so for this
            many optimizer steps, on three logging steps or more: gated cells learn to keep their
            state within the first few dozen steps when the task needs it.
        max_stability_ratio, curvature_patience: with the curvature probe on and plain or
            momentum SGD, ``sharp_curvature`` when the stability ratio (see ``Curvature``) is
            twice ``max_stability_ratio`` on the first measurement (between 1 and 2 times it, a
            catapult's range: an ``info`` note), or reaches it on ``curvature_patience``
            measurements in a row while the loss climbs past the highest it had been (below it,
            the edge of stability: an ``info`` note); an error once it has lasted that long at
            twice the limit. Along the sharpest direction the step overshoots; a network at the
            edge of stability flattens itself each time it does.
        attention_logit, attention_growth, attention_logit_error: an attention layer whose
            largest logit reaches ``attention_logit`` (QK-clip's usual threshold) and
            ``attention_growth`` times its early value makes an ``attention_logits`` finding;
            an error from ``attention_logit_error`` on, or when the mean attention entropy has
            fallen below ``entropy_collapse`` of its early value (attention gone one-hot).
        log_z_drift: an output head whose mean log Z moved this many nats from its early value
            makes a ``logit_drift`` finding (an error once |log Z| reaches 64, where bf16's
            spacing is half a nat).
        adam_epsilon: a layer whose next Adam step is epsilon-dominated (sqrt(v_hat) < eps)
            for this fraction of its weights that have a gradient makes an ``adam_epsilon``
            finding.
        update_jump: a layer whose Adam step (RMS of m_hat/(sqrt(v_hat)+eps), learning rate
            apart) is this many times its median over recent logging steps, and at least 2
            (twice what a stationary gradient gives), makes an ``update_jump`` finding.
        spike_sigmas, spike_window: a loss (``gw.step(loss=...)``) above the mean plus
            ``spike_sigmas`` standard deviations of the previous ``spike_window`` losses is a
            ``loss_spike`` (OLMo's spike score: 6 and 128); judged once half the window is
            there.
        plateau_ratio, plateau_progress: with the curvature probe on, two measurements in a row
            (the learning rate not rising in between) with a stability ratio below
            ``plateau_ratio`` and a predicted first-order loss decrease per step below
            ``plateau_progress`` of the loss make a ``plateau`` note: the slope and the
            curvature are both small, so steps of this size barely move the loss.
    """

    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    min_chain_length: int = 4
    max_step_share: float = 0.5
    saturation: float = 0.5
    saturation_error: float = 0.9
    saturation_eps: float = 1e-2
    dead_units: float = 0.5
    dead_units_error: float = 0.9
    min_samples_per_unit: int = 16
    input_rms: float = 10.0
    he_gain: float = 1.0
    warmup_steps: int = 0
    jump_ratio: float = 10.0
    growth_ratio: float = 30.0
    max_update_gain: float = 1.0
    time_patience: int = 100
    max_stability_ratio: float = 1.0
    curvature_patience: int = 5
    plateau_ratio: float = 0.01
    plateau_progress: float = 1e-4
    attention_logit: float = 100.0
    attention_growth: float = 10.0
    attention_logit_error: float = 1000.0
    entropy_collapse: float = 0.1
    log_z_drift: float = 20.0
    adam_epsilon: float = 0.5
    update_jump: float = 4.0
    spike_sigmas: float = 6.0
    spike_window: int = 128

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want_int = f.type in ("int", int)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or (want_int and not isinstance(v, int))
            ):
                raise TypeError(
                    f"Thresholds.{f.name} must be {'an int' if want_int else 'a number'}, "
                    f"got {v!r} ({type(v).__name__})"
                )
            if not math.isfinite(v):
                raise ValueError(f"Thresholds.{f.name} must be finite, got {v!r}")
        _check_range("vanishing_ratio", self.vanishing_ratio, 0, 1, "in (0, 1)")
        _check_range("exploding_ratio", self.exploding_ratio, 1, math.inf, "> 1")
        _check_range("max_step_share", self.max_step_share, 0, 1, "in (0, 1]", hi_ok=True)
        _check_range("saturation_eps", self.saturation_eps, 0, 1, "in (0, 1)")
        for name in ("saturation", "saturation_error", "dead_units", "dead_units_error"):
            _check_range(name, getattr(self, name), 0, 1, "in (0, 1]", hi_ok=True)
        if self.saturation_error < self.saturation or self.dead_units_error < self.dead_units:
            raise ValueError(
                "Thresholds: the *_error thresholds must be >= their warning thresholds"
            )
        if self.min_chain_length < 2:
            raise ValueError(
                f"Thresholds.min_chain_length must be >= 2, got {self.min_chain_length}"
            )
        for name in ("min_samples_per_unit", "warmup_steps", "time_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"Thresholds.{name} must be >= 0, got {getattr(self, name)}")
        _check_range("input_rms", self.input_rms, 0, math.inf, "> 0")
        _check_range("he_gain", self.he_gain, 0, math.inf, "> 0")
        _check_range("jump_ratio", self.jump_ratio, 1, math.inf, "> 1")
        _check_range("growth_ratio", self.growth_ratio, 1, math.inf, "> 1")
        _check_range("max_update_gain", self.max_update_gain, 0, math.inf, "> 0")
        _check_range("max_stability_ratio", self.max_stability_ratio, 0, math.inf, "> 0")
        if self.curvature_patience < 1:
            raise ValueError(
                f"Thresholds.curvature_patience must be >= 1, got {self.curvature_patience}"
            )
        for name in ("attention_logit", "log_z_drift", "spike_sigmas"):
            _check_range(name, getattr(self, name), 0, math.inf, "> 0")
        for name in ("attention_growth", "update_jump"):
            _check_range(name, getattr(self, name), 1, math.inf, "> 1")
        if self.attention_logit_error < self.attention_logit:
            raise ValueError("Thresholds.attention_logit_error must be >= attention_logit")
        _check_range("entropy_collapse", self.entropy_collapse, 0, 1, "in (0, 1)")
        _check_range("adam_epsilon", self.adam_epsilon, 0, 1, "in (0, 1]", hi_ok=True)
        if self.spike_window < 4:
            raise ValueError(f"Thresholds.spike_window must be >= 4, got {self.spike_window}")
        _check_range("plateau_ratio", self.plateau_ratio, 0, math.inf, "> 0")
        _check_range("plateau_progress", self.plateau_progress, 0, math.inf, "> 0")


def _check_range(
    name: str, v: float, lo: float, hi: float, allowed: str, hi_ok: bool = False
) -> None:
    if not (lo < v < hi or (hi_ok and v == hi)):
        raise ValueError(f"Thresholds.{name} must be {allowed}, got {v!r}")
