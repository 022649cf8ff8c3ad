"""The instabilities that end transformer runs, each judged against the run's own early values.

Pure: reports in, findings out; plain data kept between logging steps (``state_dict``).

* ``attention_logits`` (Dehghani et al. 2023; Wortsman et al. 2023): an attention logit is
  ``q.k/sqrt(d)``, so when the query and key weights grow together the logits grow with their
  product. Past about a hundred the softmax is one-hot for almost every query: its entropy
  collapses, its gradient vanishes, and the loss stalls or diverges. Judged on the largest
  logit against the layer's own early value, so a model loaded with large logits is not a
  finding for having them.
* ``logit_drift`` (PaLM; Wortsman et al. 2023): the cross-entropy does not change when every
  output logit moves by the same constant, so nothing holds log Z (their logsumexp) at any level
  and it wanders with the updates, usually towards large negative values late in training. Far
  from 0, bf16 logits lose their resolution (its spacing is half a nat from 64 on). Judged where
  the level of every logit moved with log Z: a confident classifier's log Z rises with its
  winning logit while the level falls, a spread growing, not a drift.
* ``adam_epsilon`` (Wortsman et al. 2023): once a layer's gradients are as small as Adam's
  epsilon, epsilon rather than sqrt(v_hat) sets the step, which shrinks far below the learning
  rate. Judged on three measured logging steps in a row: a state the layer stays in.
* ``update_jump`` (Molybog et al. 2023; OLMo's reports): a layer's Adam step, learning rate
  apart, several times its recent median: the step m_hat/sqrt(v_hat) grows when the gradient
  outgrows the second moment's average or turns consistent in sign, and update spikes of one
  layer are seen to come before loss spikes.
* ``loss_spike`` (OLMo's spike score): a loss above the mean plus ``spike_sigmas`` standard
  deviations of the previous ``spike_window`` losses, in log scale while they are positive. The finding says which layers' share of
  the global gradient norm changed most, which signal rose first over the preceding logging
  steps, and the step whose batch to replay.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from ..report import Finding, LayerStats, Report
from ..report.remedies import remedies

EARLY = 3  # logging steps that make a layer's early value
RECENT = 10  # logging steps a layer's recent Adam step is the median of
MIN_RECENT = 5  # ... needed before a jump is judged
# measured logging steps in a row a layer must be epsilon-dominated: Wortsman et al.'s is a state
# a layer settles in, while a branch scaled near 0 at init (ConvNeXt's layer scale of 1e-6) has
# gradients below eps only until its scale takes its first few steps
EPS_PATIENCE = 3
TRAIL = 8  # logging steps kept to say which signal moved first before a spike
LAGGING_STEP = 2.0  # an Adam step RMS twice what a stationary gradient gives: v_hat lags
BF16_HALF_NAT = 64.0  # |log Z| from which bf16's spacing is half a nat
ROSE = 2.0  # a signal "moved" at the first logging step it reached this times its median before
MIN_BEFORE = 3  # ... of at least this many logging steps


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class Instability:
    """What the transformer rules remember between logging steps; plain data only."""

    def __init__(self) -> None:
        self.early: dict[str, list[float]] = {}  # "layer|what" -> its first EARLY values
        self.steps: dict[str, deque[float]] = {}  # layer -> its recent Adam step RMS
        self.losses: deque[float] = deque()  # the losses the next one is judged against
        self.trail: deque[dict[str, Any]] = deque(maxlen=TRAIL)  # recent logging steps
        self.eps_streaks: dict[str, int] = {}  # layer -> measured steps epsilon-dominated in a row

    def findings(self, report: Report, t: Any, judge: bool = True) -> list[Finding]:
        """This step's findings (none when ``judge`` is False: warm-up), then remember it."""
        attention, heads, adam = [], [], []  # the rows each rule reads, in one pass
        for s in report.layers.values():
            if s.attention_max_logit is not None:
                attention.append(s)
            if s.log_z_mean is not None:
                heads.append(s)
            if s.adam_step_rms is not None:
                adam.append(s)
        found = []
        if judge:
            found = self._attention(attention, t) + self._log_z(heads, t) + self._adam(adam, t)
        now = self._point(report, adam)
        spikes = self._spikes(report, t)
        if judge and spikes:
            found.append(self._attribute(report, now, spikes, t))
        self._remember(now, adam)
        return found

    # -- early values and history ------------------------------------------------------------------

    def _baseline(self, key: str, value: float, pick=statistics.median) -> float:
        """The layer's early value of one statistic: ``pick`` (median, min, max) of its first
        EARLY logging steps, this one included while they last."""
        early = self.early.setdefault(key, [])
        if len(early) < EARLY:
            early.append(value)
        return pick(early)

    @staticmethod
    def _point(report: Report, adam: list[LayerStats]) -> dict[str, Any]:
        """This logging step as the trail keeps it: the signals a spike is traced back by."""
        rms = [s.adam_step_rms for s in adam if _finite(s.adam_step_rms)]
        return {
            "step": report.step,
            "norm": report.global_grad_norm,
            "update": statistics.fmean(rms) if rms else None,
            "loss": report.loss,
            # what a spike is attributed by: only where the loss is given
            "shares": report.grad_shares() if report.losses else {},
        }

    def _remember(self, now: dict[str, Any], adam: list[LayerStats]) -> None:
        for s in adam:
            if _finite(s.adam_step_rms) and s.adam_step_rms > 0:
                self.steps.setdefault(s.name, deque(maxlen=RECENT)).append(s.adam_step_rms)
        self.trail.append(now)

    # -- the rules -----------------------------------------------------------------------------------

    def _attention(self, rows: list[LayerStats], t: Any) -> list[Finding]:
        out = []
        for s in rows:
            name = s.name
            top = s.attention_max_logit
            if not _finite(top):
                continue
            # the smallest and the largest early values: logits can grow within the first
            # logging steps, and growth from where they started is what is judged
            # (at least 1: a zero-initialised query projection starts at exactly 0)
            base = max(self._baseline(f"{name}|logit", top, min), 1.0)
            entropy, early_entropy = s.attention_entropy, None
            if _finite(entropy):
                early_entropy = self._baseline(f"{name}|entropy", entropy, max)
            if top < t.attention_logit or top < t.attention_growth * base:
                continue
            collapsed = (
                early_entropy is not None
                and early_entropy > 0
                and entropy < t.entropy_collapse * early_entropy
            )
            error = top >= t.attention_logit_error or collapsed
            where = f"`{name}`"
            said = (
                f"attention logits grew: the largest logit at {where} is {top:.3g}, "
                f"{top / base:.3g}x its early {base:.3g}"
            )
            if early_entropy is not None:
                low = s.attention_entropy_min
                said += (
                    f"; its queries' attention entropy is {entropy:.2g} nats (early "
                    f"{early_entropy:.2g}"
                    + (f", lowest head {low:.2g}" if _finite(low) else "")
                    + ")"
                )
            msg = (
                f"{said}. A logit is q.k/sqrt(d): queries and keys that grow together make it "
                "grow with their product, and past about a hundred the softmax is one-hot for "
                "almost every query, so its gradient vanishes and the loss stalls or diverges."
            )
            ctx = f"{where}: largest attention logit {top:.3g}"
            out.append(
                Finding(
                    name,
                    "attention_logits",
                    "error" if error else "warning",
                    top,
                    max(t.attention_logit, t.attention_growth * base),
                    msg,
                    remedies(["qk-layernorm", "qk-clip", "lower-lr"], ctx),
                )
            )
        return out

    def _log_z(self, rows: list[LayerStats], t: Any) -> list[Finding]:
        out = []
        for s in rows:
            name = s.name
            mean = s.log_z_mean
            if not _finite(mean):
                continue
            level = s.logit_mean
            if not _finite(level):
                continue
            base = self._baseline(f"{name}|log_z", mean)
            drift = mean - base
            moved = level - self._baseline(f"{name}|level", level)
            # A drift of the level every logit shares, which the loss cannot see, not a growing
            # spread: a classifier growing confident lifts its log Z with its winning logit
            # while the level of the others falls.
            if abs(drift) < t.log_z_drift or moved * drift <= 0 or abs(moved) < abs(drift) / 2:
                continue
            top = s.log_z_max if _finite(s.log_z_max) else abs(mean)
            msg = (
                f"the output logits drift: the mean log Z of `{name}` is {mean:.3g}, {drift:+.3g} "
                f"nats from its early {base:.3g} (largest |log Z| {top:.3g}), and the level of "
                f"every logit moved with it ({moved:+.3g}). The cross-entropy does not change "
                "when every logit moves by one constant, so nothing holds that level and it "
                "wanders with the updates; far from 0 the logits lose resolution in low "
                "precision (bf16's spacing is half a nat from 64 on) and the loss can diverge."
            )
            ctx = f"`{name}`: mean log Z {mean:.3g}"
            out.append(
                Finding(
                    name,
                    "logit_drift",
                    "error" if top >= BF16_HALF_NAT else "warning",
                    drift,
                    t.log_z_drift,
                    msg,
                    remedies(["z-loss", "weight-decay"], ctx),
                )
            )
        return out

    def _adam(self, rows: list[LayerStats], t: Any) -> list[Finding]:
        out = []
        for s in rows:
            name = s.name
            share = s.adam_epsilon_share
            if _finite(share):  # measured on this step: the streak goes on or ends
                dominated = share >= t.adam_epsilon
                self.eps_streaks[name] = self.eps_streaks.get(name, 0) + 1 if dominated else 0
            if self.eps_streaks.get(name, 0) >= EPS_PATIENCE and _finite(share):
                msg = (
                    f"Adam's epsilon dominates the next step of `{name}`: for {share:.0%} of its "
                    "weights with a gradient, sqrt(v_hat) is below epsilon, so their step is "
                    "lr * m_hat / (sqrt(v_hat) + eps), shrunk by more than half; the smaller the "
                    "gradients get, the less the layer learns."
                )
                ctx = f"`{name}`: {share:.0%} of its weights epsilon-dominated"
                out.append(
                    Finding(
                        name,
                        "adam_epsilon",
                        "warning",
                        share,
                        t.adam_epsilon,
                        msg,
                        remedies(["lower-epsilon"], ctx),
                    )
                )
            rms, recent = s.adam_step_rms, self.steps.get(name)
            if not _finite(rms) or recent is None or len(recent) < MIN_RECENT:
                continue
            median = statistics.median(recent)
            # A stationary gradient gives a step of at most about 1 (m_hat <= sqrt(v_hat)); a
            # gradient that suddenly outgrows the second moment's average gives up to
            # (1 - beta1) / sqrt(1 - beta2), 3.2 at beta2 0.999 (0.45 at 0.95). Below twice the
            # stationary bound a jump is the gradient's sign turning consistent or its scale
            # drifting, as at the edge of stability, where Adam oscillates and trains well.
            if median <= 0 or rms < t.update_jump * median or rms < LAGGING_STEP:
                continue
            ratio = f", moving it by {s.update_ratio:.2g} of its norm" if s.update_ratio else ""
            msg = (
                f"the Adam step of `{name}` jumped: its RMS before the learning rate is "
                f"{rms:.3g}, {rms / median:.3g}x its median {median:.3g} over the last "
                f"{len(recent)} logging steps{ratio}: past what a steady gradient gives, so the "
                "gradient outgrew the second moment's long average (beta2) and sqrt(v_hat) lags "
                "it; update spikes in one layer are seen to come before loss spikes."
            )
            ctx = f"`{name}`: Adam step {rms / median:.3g}x its median"
            out.append(
                Finding(
                    name,
                    "update_jump",
                    "warning",
                    rms / median,
                    t.update_jump,
                    msg,
                    remedies(["lower-beta2", "gradient-clipping", "lower-lr"], ctx),
                )
            )
        return out

    def _spikes(self, report: Report, t: Any) -> list[tuple[int, float, float, float, int]]:
        """(step, loss, standard deviations above, typical loss, losses judged against) of each
        spike among the report's losses; every finite loss then joins the window. Judged on
        log(loss) while the losses are positive: a spike is a jump by a factor, so a converged
        loss of 2e-4 that triples on a hard batch is not one (its sd is a few 1e-5 in
        absolute terms), while an LM's loss near 3 reads as in OLMo's linear score."""
        window, out = self.losses, []
        for step, loss in report.losses:
            if not _finite(loss):
                continue
            if len(window) >= max(2, t.spike_window // 2):
                logs = loss > 0 and min(window) > 0
                xs = [math.log(v) for v in window] if logs else list(window)
                x = math.log(loss) if logs else loss
                mean = statistics.fmean(xs)
                sd = statistics.pstdev(xs, mean)
                if sd > 0 and x > mean + t.spike_sigmas * sd:
                    typical = math.exp(mean) if logs else mean
                    out.append((step, loss, (x - mean) / sd, typical, len(window)))
            window.append(loss)
            while len(window) > t.spike_window:
                window.popleft()
        return out

    def _attribute(self, report: Report, point: dict[str, Any], spikes: list, t: Any) -> Finding:
        step, loss, sigmas, typical, n = max(spikes, key=lambda x: x[2])
        now = point["shares"]  # the report has losses: its shares were kept
        before: dict[str, list[float]] = {}
        for point in self.trail:
            for name, share in point["shares"].items():
                before.setdefault(name, []).append(share)
        changes = sorted(
            ((now[k] - statistics.fmean(before.get(k, [0.0])), k) for k in now),
            key=lambda c: -abs(c[0]),
        )[:3]
        layer = changes[0][1] if changes else next(iter(report.layers), "")
        moved = ", ".join(
            f"`{k}` {statistics.fmean(before.get(k, [0.0])):.0%} -> {now[k]:.0%}"
            for _, k in changes
        )
        others = (
            f" ({len(spikes)} spiking steps since the last logging step)" if len(spikes) > 1 else ""
        )
        msg = (
            f"loss spike at step {step}: {loss:.4g}, {sigmas:.1f} standard deviations above the "
            f"previous {n} losses (typically {typical:.4g}){others}."
        )
        if moved:
            late = (
                f" (measured at step {report.step}, {report.step - step} after the spike)"
                if step != report.step
                else ""
            )
            msg += f" The layers whose share of the gradient norm changed most{late}: {moved}."
        msg += f" {self._first_moved(point, step, loss)} Replay the batch of step {step}."
        ctx = f"step {step}: loss {loss:.4g} ({sigmas:.1f} sd)"
        return Finding(
            layer,
            "loss_spike",
            "warning",
            sigmas,
            t.spike_sigmas,
            msg,
            remedies(["skip-batch", "gradient-clipping", "lower-lr"], ctx),
        )

    def _first_moved(self, now: dict[str, Any], step: int, loss: float) -> str:
        """Which of the Adam step, the gradient norm and the loss rose first over the trail of
        logging steps up to ``now`` (each to ROSE times its own median before); the spike
        stands for this step's loss."""
        firsts = []
        for key, what in (
            ("update", "the Adam step"),
            ("norm", "the gradient norm"),
            ("loss", "the loss"),
        ):
            last = (step, loss) if key == "loss" else (now["step"], now[key])
            series = [(p["step"], p[key]) for p in self.trail] + [last]
            series = [(k, v) for k, v in series if _finite(v) and v > 0]
            for k in range(MIN_BEFORE, len(series)):
                if series[k][1] >= ROSE * statistics.median(v for _, v in series[:k]):
                    firsts.append((series[k][0], what))
                    break
        if not firsts:
            return "No measured signal rose before it over the last logging steps."
        by_step: dict[int, list[str]] = {}
        for k, what in sorted(firsts, key=lambda f: f[0]):
            by_step.setdefault(k, []).append(what)
        order = ", then ".join(f"{' and '.join(whats)} (step {k})" for k, whats in by_step.items())
        return f"First to rise over the last logging steps: {order}."

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "early": {k: list(v) for k, v in self.early.items()},
            "steps": {k: list(v) for k, v in self.steps.items()},
            "losses": list(self.losses),
            "trail": [dict(p) for p in self.trail],
            "eps_streaks": dict(self.eps_streaks),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.early = {str(k): [float(x) for x in v] for k, v in state.get("early", {}).items()}
        self.steps = {
            str(k): deque((float(x) for x in v), maxlen=RECENT)
            for k, v in state.get("steps", {}).items()
        }
        self.losses = deque(float(x) for x in state.get("losses", []))
        self.trail = deque((dict(p) for p in state.get("trail", [])), maxlen=TRAIL)
        self.eps_streaks = {str(k): int(v) for k, v in state.get("eps_streaks", {}).items()}
