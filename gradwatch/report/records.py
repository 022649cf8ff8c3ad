"""Plain records of one logging step: what was measured and what was found.

These hold floats and strings only, never tensors or modules, so sinks, the CLI and users can keep,
copy, pickle and serialise them freely.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1

# Activations whose derivative goes to zero at both tails: their problem is saturation (a unit
# flat for every sample is saturated, and reads as such: not as a dead unit).
BOUNDED_KINDS = frozenset({"sigmoid", "tanh", "hardtanh", "softsign", "hardsigmoid"})
# Activations that are flat on one side only: their problem is units that never switch on.
RELU_LIKE_KINDS = frozenset(
    {"relu", "relu6", "leaky_relu", "gelu", "silu", "elu", "celu", "selu", "softplus"}
)

FINDING_KINDS = (
    "diverging",
    "vanishing",
    "exploding",
    "init",
    "saturation",
    "dead_units",
    "nonfinite",
    "sharp_curvature",
    "plateau",
    "attention_logits",
    "logit_drift",
    "adam_epsilon",
    "update_jump",
    "loss_spike",
)
SEVERITIES = ("info", "warning", "error")  # info: a note (``plateau``), not a problem by itself


@dataclass(frozen=True)
class Remedy:
    """One fix from the catalogue: a stable ``id`` and the text that applies it to a layer."""

    id: str
    text: str


@dataclass(frozen=True)
class Finding:
    """A problem with one layer, the measurement behind it and what to change."""

    layer: str
    kind: str
    severity: str
    value: float | None
    threshold: float | None
    message: str
    remedies: tuple[Remedy, ...] = ()
    since: int | None = None  # the step this (layer, kind) was first found; set by GradWatch

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "severity": self.severity,
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "message": self.message,
            "remedies": [{"id": r.id, "text": r.text} for r in self.remedies],
            "since": self.since,
        }


@dataclass
class LayerStats:
    """What was measured for one layer on one logging step.

    Attributes:
        name: the name from ``model.named_modules()`` (wrapper prefixes stripped); functional
            activations are ``<calling module>:<function>#<k>``.
        module_type: the class name, or the function name for a functional activation.
        grad_norm: L2 norm of the ``.grad`` of the module's own parameters; None when none has one.
        weight_norm: L2 norm of the same parameters, as measured at the report's
            ``weight_step`` (weights are measured on every ``weight_norm_every``-th logging step).
        signal: RMS of the gradient of the loss w.r.t. the layer's output (the backward signal);
            None when no output received a gradient on this step, and for activations (their
            neighbours carry it).
        signal_norm: L2 norm of that same gradient over the whole batch (``signal * sqrt(count)``).
        saturation: activations only: fraction of elements whose local derivative is near zero.
        dead_units: activations only: fraction of units that were flat for every sample.
        active_units: activations only: fraction of units that were flat for no sample.
        units: activations only: how many units those fractions are of.
        activation: the activation kind ("sigmoid", "relu", ...) or None for other layers.
        weight_gain: RMS of the weight times sqrt(fan_in) (He init gives about 1.41, Xavier about
            1.0 for square layers, PyTorch's default about 0.58), at ``weight_step`` too; None for
            layers without a matrix.
        samples_per_unit: activations only: how many values each unit produced on this step.
        calls: forward calls measured on this step.
        output_elements: how many output elements received a gradient on this step (the count
            behind ``signal``); a change along a chain is a change of width or resolution.
        time_signal: sequence modules only (``nn.RNN``/``GRU``/``LSTM`` and those named in
            ``through_time``): RMS of the gradient of the loss w.r.t. the module's input at each
            time step, first step first (None where no input had that many steps). It has passed
            back through every later step of the recurrence: what vanishes or explodes through
            time.
        recurrent_gain: a vanilla ``nn.RNN``'s largest singular value of ``weight_hh`` (over its
            layers), at ``weight_step``: each time step multiplies the signal by at most this
            times the activation's derivative.
        gate_bias: an LSTM's forget-gate (a GRU's update-gate) bias, ``bias_ih + bias_hh``
            averaged over units and layers, at ``weight_step``: near 0 the gate keeps about half
            of the state at each step.
        dphi2: activations, on steps that read the weights: the measured E[phi'(z)^2], the mean
            square of the activation's local derivative (1/2 for a ReLU that is on half the
            time, at most 1/16 for sigmoid).
        gain_factor: Linear and ungrouped conv layers, on the same steps: chi = n_out x Var[W] x
            E[phi'(z)^2] of the activation that follows it (1 when the next layer is a Linear or
            conv), with n_out the outputs each input feeds and Var[W] from ``weight_gain``: the
            factor by which the theory says the backward signal's variance is multiplied as it
            crosses the layer (1 keeps it level; He init with ReLU gives about 1).
        update_gain: RMS of the update the optimizer's next step makes to the weight matrix,
            times sqrt(fan_in): on the scale of ``weight_gain``, how far one step moves the layer
            (1 is as much as its whole He/Xavier initialisation). Only where the optimizer is known
            (optimizer mode, Lightning) and is of the Adam family; on every logging step, against
            the weights as last read.
        state_derivative: a tanh ``nn.RNN``'s mean tanh'(pre-activation) = 1 - h**2 over its
            output: below 1 it shrinks the signal at every time step (saturation).
        attention_max_logit: attention layers (``<module>:attention#k``): the largest logit
            any query gave a key, before the softmax (``q.k`` times the call's scale, plus what
            the model adds before its softmax: masks only lower it); queries with every key
            masked are left out.
        attention_entropy: attention layers: the mean entropy (nats) of the queries' attention
            distributions; ``log(keys)`` is uniform attention, 0 is one-hot.
        attention_entropy_min: attention layers: the lowest mean entropy of any head.
        log_z_mean, log_z_max: the output head (``logits_layer``): mean and largest |log Z| of
            its positions, log Z being the logsumexp of its logits (0 when they are already log
            probabilities).
        logit_mean: the output head: its logits' mean over classes and positions, their level
            (which the cross-entropy cannot see).
        update_ratio: where an Adam-family optimizer is known: the L2 norm of
            the next update over the weights' (RMS over RMS: the fraction one step moves the
            layer).
        adam_step_rms: the RMS of that step before the learning rate, m_hat/(sqrt(v_hat)+eps)
            (plus decoupled decay): about 1 when every weight moves by the full learning rate,
            far less when the gradient's sign keeps changing.
        adam_epsilon_share: of the weight matrix's elements with a gradient, the fraction
            whose sqrt(v_hat) is below Adam's epsilon: their step is shrunk by more than half.
        update_cosine: cosine between the next update and the negative gradient (1: plain
            gradient descent's direction; Adam's is lower, its preconditioner turns it).
        pooled: activations only: its output holds one value per sample and unit, every other
            dim 1 (``(N, C, 1, 1)``, as after global pooling) rather than a feature map; a
            bounded one there is a gate broadcast over a feature map, as in a
            squeeze-and-excitation block. None for other layers and under ``torch.compile``.
    """

    name: str
    module_type: str
    grad_norm: float | None = None
    weight_norm: float | None = None
    signal: float | None = None
    signal_norm: float | None = None
    saturation: float | None = None
    dead_units: float | None = None
    active_units: float | None = None
    units: int | None = None
    activation: str | None = None
    weight_gain: float | None = None
    samples_per_unit: float | None = None
    calls: int = 0
    output_elements: int | None = None
    time_signal: list[float | None] | None = None
    recurrent_gain: float | None = None
    gate_bias: float | None = None
    state_derivative: float | None = None
    update_gain: float | None = None
    dphi2: float | None = None
    gain_factor: float | None = None
    pooled: bool | None = None
    attention_max_logit: float | None = None
    attention_entropy: float | None = None
    attention_entropy_min: float | None = None
    log_z_mean: float | None = None
    log_z_max: float | None = None
    logit_mean: float | None = None
    update_ratio: float | None = None
    adam_step_rms: float | None = None
    adam_epsilon_share: float | None = None
    update_cosine: float | None = None

    @property
    def relative_grad(self) -> float | None:
        """``grad_norm / weight_norm``: how far one unit-learning-rate step would move the layer."""
        if self.grad_norm is None or not self.weight_norm:
            return None
        return self.grad_norm / self.weight_norm

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_value(v) for k, v in asdict(self).items()}


@dataclass
class Curvature:
    """The loss's curvature on one logging step's batch (the opt-in probe, ``curvature_every``).

    Attributes:
        top_eigenvalue: the largest eigenvalue of the Hessian of the loss over the trainable
            parameters, on the batch the curvature loss saw: the curvature of its sharpest
            direction, by power iteration on Hessian-vector products.
        stability_ratio: how far the optimizer's next step is from its stability limit along the
            sharpest direction of the landscape it sees; above 1 a step along it lands further
            from that direction's minimum than it started, so the iterates oscillate and grow.
            Plain SGD: ``lr * top_eigenvalue / 2``. With momentum and for adaptive optimizers,
            ``rule`` says what is compared. None for an optimizer gradwatch does not know, or
            without one.
        adaptive: the ratio is an adaptive optimizer's (Adam, RMSprop, Adagrad): its own
            Hessian, scaled by the optimizer's per-weight step. Reported, not judged: a step that
            overshoots raises the gradient's second moment, which shrinks the next step, so these
            optimizers hover at or above 1 while training well.
        iterations: Hessian-vector products the estimates took (both, when two were needed).
        converged: the power iteration's estimate changed by less than 0.1% at its last step
            (otherwise it is a lower bound: the iteration ran out of steps).
        loss: the curvature loss's value.
        progress: the loss decrease the next step would make to first order (the gradient
            times the step), as a fraction of ``loss``; None without a known optimizer.
        rule: what ``stability_ratio`` compares, in words.
    """

    top_eigenvalue: float | None
    stability_ratio: float | None = None
    iterations: int = 0
    converged: bool = True
    loss: float | None = None
    progress: float | None = None
    rule: str = ""
    adaptive: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_value(v) for k, v in asdict(self).items()}


@dataclass
class ReportData:
    """Everything measured and found on one logging step (the public :class:`~gradwatch.Report`
    adds how it reads: ``str(report)``, ``report.table()``).

    Attributes:
        step: 0-based count of optimizer steps.
        layers: name -> :class:`LayerStats`, input side first (first-forward execution order).
        findings: one :class:`Finding` per affected layer and kind.
        global_grad_norm: L2 norm over every parameter's ``.grad`` (shared parameters once).
        input_rms, input_absmax: scale of the floating-point inputs given to the model.
        skipped: True when a ``GradScaler`` found inf/NaN gradients and will skip this step.
        loss_scale: the ``GradScaler``'s scale on this step (None without one).
        weight_step: the step whose weights ``weight_norm`` and ``weight_gain`` describe: this
            step, or the latest logging step that measured them (None: not measured yet).
        unmeasured: layer name -> why its hooks could not measure it on this step (the error);
            its signal, saturation and dead units are None then, its norms still measured.
            ``"(model input)"`` stands for ``input_rms`` and ``input_absmax``.
        curvature: a :class:`Curvature` on the steps the opt-in probe measured, else None.
        learning_rate: the learning rate of this step's update, where the optimizer is known
            (optimizer mode, ``gw.step(optimizer=...)``, Lightning), else None.
        losses: ``(step, loss)`` of each step since the previous logging step whose loss was
            given (``gw.step(loss=...)``; Lightning gives it), this one last.
    """

    step: int
    layers: dict[str, LayerStats] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    global_grad_norm: float | None = None
    input_rms: float | None = None
    input_absmax: float | None = None
    skipped: bool = False
    weight_step: int | None = None
    unmeasured: dict[str, str] = field(default_factory=dict)
    loss_scale: float | None = None
    curvature: Curvature | None = None
    learning_rate: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def loss(self) -> float | None:
        """This step's loss, when it was given."""
        return self.losses[-1][1] if self.losses and self.losses[-1][0] == self.step else None

    def grad_shares(self) -> dict[str, float]:
        """Layer -> its share of the squared global gradient norm (the shares of layers that
        share no parameter add up to 1)."""
        total = self.global_grad_norm
        if not total or not math.isfinite(total):
            return {}
        return {
            name: (s.grad_norm / total) ** 2
            for name, s in self.layers.items()
            if s.grad_norm is not None and math.isfinite(s.grad_norm)
        }

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-safe dict (NaN and inf become ``null``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "step": self.step,
            "global_grad_norm": _json_float(self.global_grad_norm),
            "input_rms": _json_float(self.input_rms),
            "input_absmax": _json_float(self.input_absmax),
            "skipped": self.skipped,
            "weight_step": self.weight_step,
            "unmeasured": dict(self.unmeasured),
            "loss_scale": _json_float(self.loss_scale),
            "curvature": self.curvature.to_dict() if self.curvature is not None else None,
            "learning_rate": _json_float(self.learning_rate),
            "losses": [[k, _json_float(v)] for k, v in self.losses],
            "layers": [s.to_dict() for s in self.layers.values()],
            "findings": [f.to_dict() for f in self.findings],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReportData:
        """The inverse of :meth:`to_dict` (non-finite values come back as None)."""
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"report schema_version {d.get('schema_version')!r} is not {SCHEMA_VERSION}"
            )
        names = {f.name for f in fields(LayerStats)}
        layers = {}
        for row in d["layers"]:
            s = LayerStats(**{k: v for k, v in row.items() if k in names})
            layers[s.name] = s
        findings = [
            Finding(**{**f, "remedies": tuple(Remedy(**r) for r in f["remedies"])})
            for f in d["findings"]
        ]
        return cls(
            step=d["step"],
            layers=layers,
            findings=findings,
            global_grad_norm=d["global_grad_norm"],
            input_rms=d["input_rms"],
            input_absmax=d["input_absmax"],
            skipped=d["skipped"],
            weight_step=d.get("weight_step"),  # absent from reports written before it existed
            unmeasured=dict(d.get("unmeasured", {})),  # likewise
            loss_scale=d.get("loss_scale"),  # likewise
            curvature=Curvature(**d["curvature"]) if d.get("curvature") else None,
            learning_rate=d.get("learning_rate"),  # likewise
            losses=[(int(k), v) for k, v in d.get("losses", [])],  # likewise
        )


def _json_float(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return x


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v
