"""The ``GradWatch`` engine: arms the probes on logging steps, reads ``.grad`` at the optimizer
boundary, builds the :class:`Report`, diagnoses it and hands it to the sinks."""

from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Any

import torch
from torch import nn

from . import rules, stats
from .distributed import local_shard, rank_and_world, sum_across_ranks
from .options import Options, Schedule
from .probes import IN_ABSMAX, IN_COUNT, IN_SUMSQ, INPUTS, Entry, Probes, Taken, unwrap
from .report import LayerStats, Report
from .rules import Thresholds
from .sinks import Sink, TensorBoardSink, WarningSink, emit
from .stats import combine_norms, segment_totals

log = logging.getLogger("gradwatch")


class NonFiniteError(FloatingPointError):
    """Raised by ``nan_strategy="raise"`` when a step's gradients or signal are not finite.

    Attributes:
        report: the step's :class:`Report`, with the ``nonfinite`` findings.
    """

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


_STATE_VERSION = 1
# Logging steps this many steps apart or more take the per-module hooks off in between: idle,
# they cost about 5 us a module on every forward; adding and removing them about 13 us a module
# (both measured on a 1,000-layer MLP, a 2-core CPU).
KEEP_HOOKS_BELOW = 4


class GradWatch:
    """Watches a model while it trains: per-layer gradients, backward signal, saturation, dead units.

    Call :meth:`step` once per optimizer step, after ``backward()`` (after ``scaler.unscale_``
    under AMP) and before ``zero_grad()``; or pass ``optimizer=`` and gradwatch measures by itself
    inside every ``optimizer.step()``.

    Example::

        gw = gradwatch.GradWatch(model, log_dir="runs/exp")
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            report = gw.step()        # a Report on logging steps, None on the others
            optimizer.step()
            optimizer.zero_grad()
        gw.close()

    Args:
        model: any ``nn.Module`` (DDP and ``torch.compile`` wrappers are unwrapped; attach before
            compiling).
        log_dir: write TensorBoard event files there (gradwatch owns and closes the writer).
        writer: write through this ``SummaryWriter`` instead (gradwatch flushes, never closes it).
        every_n_steps: measure steps 0, n, 2n, ...; or a callable ``step -> bool``.
        optimizer: optimizer mode: measure inside every ``optimizer.step()``, no ``step()`` calls.
            Gradients are read there, so they are post-clip if the loop clips before stepping.
        thresholds: a :class:`Thresholds`; defaults documented there.
        scaler: the ``torch.amp.GradScaler`` in use, if any: the backward signal is divided by its
            loss scale, and a step with inf/NaN gradients is recorded as skipped, not as a finding.
        include, exclude: glob patterns of module names to watch or leave out.
        warn: emit findings as :class:`GradWatchWarning` (once per layer and kind).
        nan_strategy: what a ``nonfinite`` finding does besides being reported: ``"warn"``
            (default; training goes on) or ``"raise"``: ``step()`` (or, in optimizer mode,
            ``optimizer.step()`` before it updates anything) raises :class:`NonFiniteError`
            naming the first affected layer.
        sync_dist: under ``torch.distributed`` (DDP, FSDP), sum activation counts and FSDP shard
            norms over all ranks on logging steps, so every rank reports the global batch and the
            unsharded norms. ``step()`` must then be called on every rank. False: rank-local
            numbers, no communication. Only rank 0 writes to TensorBoard and warns either way.
        weight_norm_every: measure the weight norms (and the weight gain) on the first logging
            step and then on every n-th one; the reports in between carry the last measured values
            (``Report.weight_step`` says from when). Weights move by one learning-rate step at a
            time, and reading them costs as much as reading the gradients. 1: every logging step.
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | os.PathLike | None = None,
        writer: Any = None,
        every_n_steps: Schedule = 50,
        optimizer: torch.optim.Optimizer | None = None,
        thresholds: Thresholds | None = None,
        *,
        scaler: Any = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        warn: bool = True,
        nan_strategy: str = "warn",
        sync_dist: bool = True,
        weight_norm_every: int = 10,
    ) -> None:
        _validate(model, log_dir, writer, optimizer, scaler)
        self.options = Options(
            every_n_steps=every_n_steps,
            thresholds=thresholds,
            include=include,
            exclude=exclude,
            warn=warn,
            nan_strategy=nan_strategy,
            sync_dist=sync_dist,
            weight_norm_every=weight_norm_every,
        )
        self._model = unwrap(model)
        self.optimizer = optimizer
        self.scaler = scaler
        self.report: Report | None = None
        self._first_seen: dict[str, int] = {}  # "layer|kind" -> step it was first found
        self._step = 0
        self._closed = False
        self._notices: set[str] = set()
        self._init_weights()
        self._sinks: list[Sink] = []
        self._warnings: WarningSink | None = None
        self._probes: Probes | None = None
        self._opt_handle: Any = None
        self._scaler_update: _ScalerUpdate | None = None
        self._stepped = False  # optimizer mode: the optimizer hook ran since scaler.update()
        try:  # a constructor that fails leaves no hook behind
            self._probes = Probes(self._model, self.thresholds.saturation_eps, include, exclude)
            if self.options.warn:
                self._warnings = WarningSink()
                self._sinks.append(self._warnings)
            writes = rank_and_world()[0] == 0  # only rank 0 writes event files
            if writes and log_dir is not None:
                self._sinks.append(TensorBoardSink(_open_writer(log_dir), True))
            elif writes and writer is not None:
                self._sinks.append(TensorBoardSink(writer, False))
            if optimizer is not None:
                self._opt_handle = optimizer.register_step_pre_hook(_OptimizerHook(self))
                if scaler is not None:
                    self._scaler_update = _ScalerUpdate.install(self, scaler)
            self._arm()
        except BaseException:
            self.close()
            raise

    # -- public API ------------------------------------------------------------------------------

    # The options, read-only: they were checked once, when the watcher was made.
    every_n_steps = property(lambda self: self.options.every_n_steps)
    thresholds = property(lambda self: self.options.thresholds)
    sync_dist = property(lambda self: self.options.sync_dist)
    nan_strategy = property(lambda self: self.options.nan_strategy)
    weight_norm_every = property(lambda self: self.options.weight_norm_every)

    @property
    def current_step(self) -> int:
        """The optimizer step the next measurement belongs to."""
        return self._step

    def step(self) -> Report | None:
        """Close one optimizer step: measure it if it is a logging step.

        Returns:
            The step's :class:`Report` on logging steps, None on the others.
        """
        if self._closed:
            raise RuntimeError("GradWatch.step() called after close()")
        if self.optimizer is not None:
            raise RuntimeError(
                "GradWatch.step() must not be called in optimizer mode (optimizer= was given): "
                "gradwatch measures inside optimizer.step() by itself"
            )
        return self._boundary(guard=False)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the step count, when each finding was first seen (so it is not
        announced again) and the latest report. Plain data: ``torch.save`` and JSON both take it."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "first_seen": dict(self._first_seen),
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. A ``log_dir`` writer is reopened with
        ``purge_step`` at the restored step, so TensorBoard drops what a crashed run wrote after
        its last checkpoint."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"state must be a dict from GradWatch.state_dict() (version {_STATE_VERSION}), "
                f"got {type(state).__name__}"
                + (f" with version {state.get('version')!r}" if isinstance(state, dict) else "")
            )
        self._step = int(state["step"])
        self._first_seen = {str(k): int(v) for k, v in state["first_seen"].items()}
        self.report = Report.from_dict(state["report"]) if state["report"] else None
        seen = {tuple(k.rsplit("|", 1)): step for k, step in self._first_seen.items()}
        for sink in self._sinks:
            resume = getattr(sink, "resume", None)
            if resume is not None:
                resume(self._step, seen)
        self._arm()

    @property
    def first_seen(self) -> dict[str, int]:
        """``"layer|kind"`` -> the step at which that finding first appeared."""
        return dict(self._first_seen)

    # -- for integrations (the Lightning callback is one) -----------------------------------------

    def add_sink(self, sink: Sink) -> None:
        """Hand every report from now on to ``sink`` as well (see :class:`gradwatch.sinks.Sink`).
        Only rank 0 writes: on other ranks this does nothing."""
        if not callable(getattr(sink, "write", None)):
            raise TypeError(f"sink must have a write(report) method, got {type(sink).__name__}")
        if rank_and_world()[0] == 0:
            self._sinks.append(sink)

    def begin_forward(self, module: nn.Module, inputs: Any) -> None:
        """Mark the start of a measured training forward, for a training step that may call
        submodules without calling the model itself (a ``training_step``). From the first call
        on, the caller marks every forward and the model's own calls no longer do. The floating
        tensors in ``inputs`` give the input-scale statistic."""
        if self._closed:
            return
        self._probes.external_forward = True
        if self._probes.armed:
            self._probes.begin_forward(module, (inputs,), {})

    def end_forward(self) -> None:
        """Mark the end of the forward that :meth:`begin_forward` began (before its backward)."""
        if not self._closed:
            self._probes.end_forward()

    def go_to_step(self, step: int) -> None:
        """Follow an outside count of optimizer steps (a Trainer's ``global_step``)."""
        if step != self._step:
            self._step = step
            self._arm()

    def end_step(self) -> Report | None:
        """Close the current optimizer step as :meth:`step` does, in either mode, for a caller
        inside a framework's training loop: a warning escalated to an error (``-W error``) is
        logged there instead of raised.

        Returns:
            The step's :class:`Report` on logging steps, None on the others.
        """
        if self._closed:
            return None
        return self._boundary(guard=True)

    def flush(self) -> None:
        """Put what the sinks have written so far on disk (event files are flushed anyway when
        findings change and at :meth:`close`)."""
        for sink in self._sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()

    def close(self) -> None:
        """Remove every hook and flush/close what gradwatch opened. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._probes is not None:
            self._probes.remove()
            self._probes.entries.clear()  # entries hold the parameters: let the model go
            self._probes.module_entries.clear()
        self._model = None
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        if self._scaler_update is not None:
            self._scaler_update.uninstall()
            self._scaler_update = None
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:  # closing must not fail the user's run
                    log.warning("gradwatch: closing %s failed: %s", type(sink).__name__, e)

    def __getstate__(self) -> dict[str, Any]:
        # Hooks, writers and the model stay with this process: a copy comes back detached,
        # with its history (the state_dict) and options.
        return {"state": self.state_dict(), "options": self.options}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        options = pickled["options"]  # a dict in copies pickled before Options existed
        self.options = options if isinstance(options, Options) else Options(**options)
        self._init_weights()
        self.optimizer = self.scaler = self._model = self._opt_handle = None
        self._scaler_update, self._stepped, self._warnings = None, False, None
        self._closed, self._notices, self._sinks, self._probes = True, set(), [], None
        self.report, self._first_seen, self._step = None, {}, 0
        self.load_state_dict(pickled["state"])

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the step boundary -----------------------------------------------------------------------

    def _init_weights(self) -> None:
        self._weigh_next = True  # measure the weights on the next logging step
        self._weights: dict[str, tuple[float | None, float | None]] = {}  # norm, gain by layer
        self._weight_step: int | None = None
        self._measured = 0  # logging steps measured

    def _arm(self) -> None:
        if self._probes is None:  # an unpickled, detached copy
            return
        n = self.every_n_steps
        armed = bool(n(self._step)) if callable(n) else self._step % n == 0
        self._probes.armed = armed
        self._probes.install(armed or not callable(n) and n < KEEP_HOOKS_BELOW)

    def _boundary(self, guard: bool, skipped: bool = False) -> Report | None:
        """Close the current step (``skipped``: the scaler skipped its optimizer step)."""
        report = None
        try:
            if self._probes.armed:
                report = self._measure(guard, skipped)
        except (Warning, NonFiniteError):
            raise  # escalated by -W error, or nan_strategy="raise": what the user asked for
        except Exception as e:  # never break the user's training because of a measurement
            self._notice(
                "measure-failed",
                f"gradwatch could not measure step {self._step} "
                f"({type(e).__name__}: {e}); training continues",
                guard,
            )
            log.debug("measurement failed", exc_info=True)
        finally:
            self._step += 1  # the step happened, whatever the measurement did
            self._arm()
        return report

    def _measure(self, guard: bool, skipped: bool) -> Report:
        probes = self._probes
        probes.end_forward()
        if probes.error is not None:  # gradwatch's own bookkeeping failed: drop the step
            error, probes.error = probes.error, None
            probes.take()
            probes.forwards = 0
            raise error
        failed = probes.take_failed()
        entries = probes.ordered_entries()
        params = probes.refresh_parameters()
        weigh = self._weigh_next
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        grad_parts = [local_shard(params[i].grad) for i in with_grad]
        weight_parts = [local_shard(p) for p in params] if weigh else []
        with torch.no_grad():  # one pass over gradients and weights, recording no graph
            norms = stats.norms([t for t, _ in grad_parts] + [t for t, _ in weight_parts])
        grad_norms, weight_norms = norms[: len(grad_parts)], norms[len(grad_parts) :]
        taken = probes.take()
        rank, world = rank_and_world()
        summed_counts = None  # signal and activation element counts over all ranks (device)
        if self.sync_dist and world > 1:
            summed_counts = self._sum_across_ranks(
                grad_norms, grad_parts, weight_norms, weight_parts, taken, guard
            )
        n = len(taken.entries)
        pieces: list[torch.Tensor] = [grad_norms, weight_norms]
        if taken.signal is not None:
            pieces.append(taken.signal)
        if taken.traced_signal is not None:
            pieces.append(taken.traced_signal)
        if taken.counts is not None:  # flat elements and dead units of each entry
            pieces.append(segment_totals(taken.counts, taken.rows, taken.owner, n).reshape(-1))
        if taken.input is not None:
            pieces.append(taken.input)
        if summed_counts is not None:
            pieces.append(summed_counts)
        scale = self._loss_scale()
        if isinstance(scale, torch.Tensor):
            pieces.append(scale.reshape(1).float())
        values = _to_host(pieces)  # the one device-to-host copy of the step

        pos = 0
        grad_of: dict[int, float] = {}
        for i in with_grad:
            grad_of[id(params[i])] = values[pos]
            pos += 1
        weight_of: dict[int, float] = {}
        for p in params if weigh else ():
            weight_of[id(p)] = values[pos]
            pos += 1
        signal_sumsq = [0.0] * n
        for i in taken.signal_owner:  # squared on the host, in fp64: no underflow
            signal_sumsq[i] += values[pos] * values[pos]
            pos += 1
        traced_count = {}  # entry index -> signal elements that compiled code saw
        for i in taken.traced_owner:
            signal_sumsq[i] += values[pos]
            traced_count[i] = values[pos + 1]
            pos += 2
        flat, dead = [0.0] * n, [0.0] * n
        if taken.counts is not None:
            flat, dead = values[pos : pos + n], values[pos + n : pos + 2 * n]
            pos += 2 * n
        input_rms = input_absmax = None
        if taken.input is not None:
            sq, cnt, mx = values[pos + IN_SUMSQ], values[pos + IN_COUNT], values[pos + IN_ABSMAX]
            pos += taken.input.numel()
            if cnt:
                input_rms, input_absmax = math.sqrt(sq / cnt), mx
        signal_count, elems = taken.signal_count, taken.elems
        if summed_counts is not None:
            signal_count, elems = values[pos : pos + n], values[pos + n : pos + 2 * n]
            pos += 2 * n
        if traced_count:
            signal_count = list(signal_count)
            for i, count in traced_count.items():
                signal_count[i] += count
        if isinstance(scale, torch.Tensor):
            scale = values[pos]
        scale = float(scale) if scale else 1.0
        if summed_counts is not None:  # DDP/FSDP average the rank losses: the signal of their
            scale *= world  # mean is 1/world of each
        calls, units = taken.calls, taken.units
        index = {e: i for i, e in enumerate(taken.entries)}
        layers: dict[str, LayerStats] = {}
        for e in entries:
            s = LayerStats(e.name, e.module_type, activation=e.kind)
            if e.params:
                _add_norms(s, e, grad_of, weight_of)
                if weigh:
                    self._weights[e.name] = (s.weight_norm, s.weight_gain)
                else:
                    s.weight_norm, s.weight_gain = self._weights.get(e.name, (None, None))
            i = index.get(e)
            if i is not None:
                s.calls = calls[i]
                if signal_count[i]:
                    sumsq = signal_sumsq[i] / (scale * scale)
                    s.signal = math.sqrt(sumsq / signal_count[i])
                    s.signal_norm = math.sqrt(sumsq)
                if elems[i]:
                    s.saturation = flat[i] / elems[i]
                if units[i]:
                    s.dead_units = dead[i] / units[i]
                    s.samples_per_unit = elems[i] / units[i]
            layers[e.name] = s
        global_norm = combine_norms(list(grad_of.values())) if grad_of else None
        skipped = skipped or (
            self.scaler is not None and global_norm is not None and not math.isfinite(global_norm)
        )
        if weigh:
            self._weight_step = self._step
        if INPUTS in failed:
            input_rms = input_absmax = None
        report = Report(
            self._step, layers, [], global_norm, input_rms, input_absmax, skipped, self._weight_step
        )
        if failed:
            self._leave_out(report, failed, guard)
        report.findings = rules.diagnose(report, self.thresholds)
        self._check_coverage(report, probes.forwards, bool(grad_of), params, guard)
        probes.forwards = 0
        self.report = report
        for f in report.findings:
            self._first_seen.setdefault(f"{f.layer}|{f.kind}", report.step)
        if rank == 0:
            self._write(report, guard)
        nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
        self._measured += 1
        # After a non-finite step the carried weight norms may be stale either way (NaN weights,
        # or a run rolled back to a checkpoint): measure them again.
        self._weigh_next = self._measured % self.weight_norm_every == 0 or bool(nonfinite)
        if nonfinite and self.nan_strategy == "raise":
            raise NonFiniteError(nonfinite[0].message, report)
        return report

    def _leave_out(self, report: Report, failed: dict[str, Exception], guard: bool) -> None:
        """The layers whose hooks failed on this step: their statistics from hooks (perhaps
        partial) are left out and named in ``report.unmeasured``; a warning names each the
        first time."""
        position = {name: i for i, name in enumerate(report.layers)}  # input side first
        for name in sorted(failed, key=lambda name: position.get(name, -1)):
            error = failed[name]
            report.unmeasured[name] = f"{type(error).__name__}: {error}"
            s = report.layers.get(name)
            if s is not None:
                s.signal = s.signal_norm = s.saturation = s.dead_units = None
                s.samples_per_unit = None
        new = [name for name in report.unmeasured if f"unmeasured|{name}" not in self._notices]
        if not new:
            return
        self._notices.update(f"unmeasured|{name}" for name in new)
        shown = ", ".join(f"`{name or '(root)'}`" for name in new[:5])
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        message = (
            f"gradwatch could not measure {shown}{more} on step {report.step} "
            f"({report.unmeasured[new[0]]}); the statistics from their hooks are left out of the "
            "report (Report.unmeasured says why), the other layers are measured; training continues"
        )
        if rank_and_world()[0] == 0:
            emit(message, guard=guard)
        else:
            log.debug(message)

    def _write(self, report: Report, guard: bool) -> None:
        if self._warnings is not None:  # guarded inside optimizer.step() or a Trainer
            self._warnings.guard = guard
        for sink in self._sinks:
            try:
                sink.write(report)
            except Warning:
                raise  # escalated by -W error in the user's own loop (guarded sinks never raise)
            except Exception as e:
                self._notice(
                    f"sink-{type(sink).__name__}",
                    f"gradwatch could not write to {type(sink).__name__} ({type(e).__name__}: {e})",
                    guard,
                )

    def _sum_across_ranks(
        self, grad_norms, grad_parts, weight_norms, weight_parts, taken: Taken, guard: bool
    ) -> torch.Tensor | None:
        """Sum what each rank saw of the batch, and FSDP shards' squared norms, over all ranks.

        Replicated (DDP) gradients are already equal on every rank and are left alone. ``taken``
        is updated in place; the summed signal and activation element counts of each entry are
        returned (a device tensor), or None when the ranks' layouts differ. Sums are in fp64: a
        squared vanishing norm (1e-20 squared) would underflow fp32.
        """
        shard_g = [k for k, (_, copies) in enumerate(grad_parts) if copies]
        shard_w = [k for k, (_, copies) in enumerate(weight_parts) if copies]
        device = grad_norms.device if grad_norms.numel() else weight_norms.device
        f64 = {"dtype": torch.float64, "device": device}
        pieces = [
            grad_norms[shard_g].double().square()
            / torch.tensor([float(grad_parts[k][1]) for k in shard_g], **f64),
            weight_norms[shard_w].double().square()
            / torch.tensor([float(weight_parts[k][1]) for k in shard_w], **f64),
            torch.tensor(taken.signal_count + taken.elems, **f64),
        ]
        if taken.signal is not None:
            pieces.append(taken.signal.double().square())
        if taken.traced_signal is not None:
            pieces.append(taken.traced_signal)
        if taken.counts is not None:
            pieces += [taken.counts.double(), taken.rows.double()]
        if taken.input is not None:
            pieces.append(taken.input[:IN_ABSMAX].double())
        sizes = [p.numel() for p in pieces]
        payload = torch.cat([p.reshape(-1).to(device) for p in pieces])
        layout = f"g{len(shard_g)} w{len(shard_w)} {taken.layout()} in{taken.input is not None}"
        absmax = taken.input[IN_ABSMAX] if taken.input is not None else None
        summed, absmax = sum_across_ranks(payload, layout, absmax)
        if summed is None:
            self._notice(
                "dist-layout",
                "gradwatch: ranks saw different layers or shapes on this step; every rank reports "
                "its own numbers (FSDP norms are shard norms) until they agree again",
                guard,
            )
            return None
        out = iter(torch.split(summed, sizes))
        grad_norms[shard_g] = next(out).sqrt().to(grad_norms.dtype)
        weight_norms[shard_w] = next(out).sqrt().to(weight_norms.dtype)
        counts = next(out)
        if taken.signal is not None:
            taken.signal = next(out).sqrt().float()
        if taken.traced_signal is not None:
            taken.traced_signal = next(out).reshape(-1, 2)
        if taken.counts is not None:  # exact integers in fp64; a unit is dead if flat on all ranks
            taken.counts, taken.rows = next(out), next(out)
        if taken.input is not None:
            taken.input[:IN_ABSMAX] = next(out)
            taken.input[IN_ABSMAX] = absmax
        return counts

    def _loss_scale(self) -> torch.Tensor | float | None:
        s = self.scaler
        if s is None or not getattr(s, "is_enabled", lambda: True)():
            return None
        scale = getattr(s, "_scale", None)  # the device tensor: no extra host sync
        if isinstance(scale, torch.Tensor):
            return scale
        return float(s.get_scale())

    def _check_coverage(
        self,
        report: Report,
        forwards: int,
        any_grad: bool,
        params: list[nn.Parameter],
        guard: bool,
    ) -> None:
        if not any(p.requires_grad for p in params):
            self._notice(
                "no-params",
                "gradwatch: the model has no trainable parameters; only activations are watched",
                guard,
            )
        elif not any_grad:
            self._notice(
                "no-grad",
                f"gradwatch step {report.step}: no parameter has a gradient; "
                "call gw.step() after loss.backward() and before optimizer.zero_grad()",
                guard,
            )
        if forwards == 0:
            self._notice(
                "no-forward",
                f"gradwatch step {report.step}: no training forward pass "
                "of the model was seen (model in eval mode, run under no_grad, called "
                "through .forward(), or compiled before gradwatch attached?); backward "
                "signal and activation statistics are missing",
                guard,
            )

    def _notice(self, key: str, message: str, guard: bool) -> None:
        if key not in self._notices:
            self._notices.add(key)
            if rank_and_world()[0] == 0:
                emit(message, guard=guard)
            else:
                log.debug(message)


class _OptimizerHook:
    """Optimizer step pre-hook (optimizer mode); inside GradScaler.step it runs after unscaling."""

    def __init__(self, watch: GradWatch) -> None:
        self._ref = weakref.ref(watch)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        watch = self._ref()
        if watch is not None and not watch._closed:
            watch._stepped = True
            watch._boundary(guard=True)


class _ScalerUpdate:
    """Stands in for ``scaler.update`` in optimizer mode, to see the steps the scaler skips.

    On inf/NaN gradients ``GradScaler.step`` does not call ``optimizer.step()``, so the optimizer
    hook never runs, and ``scaler.update()`` (once per iteration, as GradScaler requires) is the
    only call of that iteration gradwatch can see: without it the overflow step's forward and
    backward would be read as part of the next step's. GradScaler offers no hook, so this is an
    instance attribute over the method, removed again by ``close()``; it calls what was there.
    """

    def __init__(self, watch: GradWatch, scaler: Any) -> None:
        self._ref = weakref.ref(watch)
        self._scaler = scaler
        # an instance attribute already there (another wrapper)
        self._own = "update" in getattr(scaler, "__dict__", ())
        self._inner = scaler.update

    @classmethod
    def install(cls, watch: GradWatch, scaler: Any) -> _ScalerUpdate | None:
        """None where it cannot stand in (no ``update``, or a class that takes no attribute):
        skipped steps then go unseen in optimizer mode, as before."""
        if not callable(getattr(scaler, "update", None)):
            return None
        hook = cls(watch, scaler)
        try:
            scaler.update = hook
        except (AttributeError, TypeError):
            log.debug("gradwatch cannot watch %s.update", type(scaler).__name__, exc_info=True)
            return None
        return hook

    def uninstall(self) -> None:
        scaler = self._scaler
        if vars(scaler).get("update") is not self:
            return  # wrapped again since: this one stays, inert (the watcher is closed)
        if self._own:
            scaler.update = self._inner
        else:
            del scaler.update

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        watch = self._ref()
        if watch is not None and not watch._closed:
            if watch._stepped:
                watch._stepped = False
            else:  # the scaler skipped this optimizer step: close it, before the scale changes
                watch._boundary(guard=True, skipped=True)
        return self._inner(*args, **kwargs)

    def __reduce__(self) -> tuple:
        # A pickled or copied scaler gets its own plain method: the copy is not watched.
        return (getattr, (self._scaler, "update"))


def _add_norms(s: LayerStats, e: Entry, grad_of: dict, weight_of: dict) -> None:
    """The layer's gradient and weight norms (and weight gain), from its parameters' norms."""
    grads, weights = [], []
    for p in e.params:
        k = id(p)
        if k in grad_of:
            grads.append(grad_of[k])
        if k in weight_of:
            weights.append(weight_of[k])
            if e.fan_in and s.weight_gain is None and p.dim() >= 2:  # the weight matrix
                s.weight_gain = weight_of[k] * math.sqrt(e.fan_in / p.numel())
    if grads:
        s.grad_norm = combine_norms(grads)
    if weights:
        s.weight_norm = combine_norms(weights)


def _to_host(pieces: list[torch.Tensor]) -> list[float]:
    pieces = [p for p in pieces if p.numel()]
    if not pieces:
        return []
    if len(pieces) == 1:
        return pieces[0].reshape(-1).cpu().tolist()
    device = pieces[0].device
    return torch.cat([p.reshape(-1).to(device) for p in pieces]).cpu().tolist()


def _open_writer(log_dir: str | os.PathLike) -> Any:
    """A ``SummaryWriter`` on ``log_dir``; what the file system refuses, as a ValueError."""
    from torch.utils.tensorboard import SummaryWriter  # only when a writer is made

    path = os.fspath(log_dir)
    try:
        return SummaryWriter(log_dir=path)
    except OSError as e:
        raise ValueError(
            f"log_dir={path!r} cannot hold TensorBoard event files: "
            f"{e.strerror or e} ({type(e).__name__})"
        ) from e


def _check_log_dir(log_dir: str | os.PathLike) -> None:
    """Why ``log_dir`` cannot be a directory of event files, before anything is made."""
    path = os.fspath(log_dir)
    if "://" in str(path):  # a remote file system (s3://): TensorBoard's own to check
        return
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"log_dir={path!r} is a file; give a directory for the event files")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"log_dir={path!r} cannot be made: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"log_dir={path!r} is not writable: {existing!r} does not let you write")


def _validate(model, log_dir, writer, optimizer, scaler) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if log_dir is not None and writer is not None:
        raise ValueError("give log_dir or writer, not both (log_dir makes a new SummaryWriter)")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a str or os.PathLike, got {type(log_dir).__name__}")
    if log_dir is not None:
        _check_log_dir(log_dir)
    if writer is not None and not (hasattr(writer, "add_scalar") and hasattr(writer, "add_text")):
        raise TypeError(
            f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if scaler is not None and not hasattr(scaler, "get_scale"):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )
