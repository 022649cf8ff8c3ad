"""Closing a logging step, the half of :class:`~gradwatch.GradWatch` that measures: what the
training thread must do inside the step (:meth:`StepClosing._collect`: take what the hooks
gathered, the gradient norms, start the one copy to the host) and what can wait (the readout,
the diagnosis and the sinks: :meth:`StepClosing._finish`), which the background worker runs
unless the step must be finished before ``step()`` returns, or the model is on the CPU under
``background="auto"`` (the worker measured slower there: benchmarks/README.md).

What stays on the training thread, and why: ``nan_strategy="raise"`` must raise before
``optimizer.step()`` updates anything; the curvature probe runs the model; combining the ranks
is a collective, which every rank must issue in the same order as its training's own; and
loggers that are not thread-safe (a Lightning logger the user logs to as well) are written at
the next call into gradwatch, with the warnings.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .diagnosis import notices
from .exceptions import NonFiniteError
from .measure import stats
from .measure.statistics import GRAD, WEIGHT
from .measure.stats import combine_norms
from .output.sinks import emit
from .probes import INPUTS
from .report import Curvature, Report
from .step.distributed import rank_and_world
from .step.gather import gather, recurrent_facts, weight_norms
from .step.message import HostCopy, HostValues
from .step.readout import input_scale, layer_stats, loss_scale_of, losses_of, reweigh
from .step.worker import PendingReport, Worker

log = logging.getLogger("gradwatch")

# Losses kept between two logging steps (0-d device tensors): the spike rule judges the last
# this many of them, so a schedule that rarely logs cannot grow the list without bound.
MAX_LOSSES = 4096


@dataclass
class Collected:
    """One logging step as the training thread hands it over: its numbers on their way to the
    host and the plain facts read with them."""

    step: int
    copy: HostCopy
    skipped: bool
    combined: bool
    ranks_per_copy: int  # data-parallel ranks whose losses were averaged (1 unless combined)
    weighed: bool
    failed: dict[str, Exception]
    learning_rate: float | None
    forwards: int
    trainable: bool  # the model has a trainable parameter
    rank: int
    twice: bool  # step() was called twice with the same gradients at this step


class StepClosing:
    """The measuring half of ``GradWatch`` (a mixin: one object)."""

    def _boundary(
        self,
        guard: bool,
        skipped: bool = False,
        learning_rate: float | None = None,
        optimizer: Any = None,
        loss: Any = None,
    ) -> Report | None:
        """Close the current step (``skipped``: the scaler skipped its optimizer step)."""
        report = None
        if loss is not None:  # kept as given (on the device) until a logging step reads it
            loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
            self._losses.append((self._step, loss))
            del self._losses[:-MAX_LOSSES]
        try:
            if self._probes.armed:
                report = self._measure(skipped, learning_rate, optimizer or self.optimizer)
        except (Warning, NonFiniteError):
            raise  # escalated by -W error, or nan_strategy="raise": what the user asked for
        except Exception as e:  # never break the user's training because of a measurement
            self._measurement_failed(self._step, e)
        finally:
            self._step += 1  # the step happened, whatever the measurement did
            self._arm()
            self._deliver(guard)  # what is finished: this step's when synchronous
        return report

    def _measure(self, skipped: bool, learning_rate: float | None, optimizer: Any) -> Report:
        curvature = self._curvature
        curvature_due = curvature is not None and not skipped and curvature.next_due()
        synchronous = not self._in_background() or self.nan_strategy == "raise" or curvature_due
        collected = self._collect(skipped, learning_rate, optimizer, not synchronous)
        if synchronous:
            self._settle()  # the steps handed over first: the diagnosis sees them in order
            return self._finish(collected, optimizer, synchronous=True)
        if curvature is not None and not skipped:
            curvature.due()  # counted, not due (a step the scaler skips counts here too)
        pending = PendingReport(collected.step, self._worker.on_worker)

        def job() -> None:
            report = None
            try:
                report = self._finish(collected)
            except Exception as e:
                self._measurement_failed(collected.step, e)
                reason = f"{type(e).__name__}: {e}"
                report = Report(collected.step, unmeasured={"(step)": reason})
            finally:  # whatever happened, whoever waits for it is let go
                pending.fill(report if report is not None else Report(collected.step))
            if self._report is report:
                self._report = pending  # the object step() returned, as in synchronous mode

        if self._worker.on_exit is None:  # at exit without close(): finish and say what is left
            self._worker.on_exit = functools.partial(_deliver_at_exit, weakref.ref(self))
        self._worker.submit(job)
        if self._worker.waits and not self._told_behind:
            self._told_behind = True
            log.warning(
                "gradwatch: the training thread waited for the background worker at step %d "
                "(%d logging steps were queued): measuring less often (every_n_steps) keeps "
                "the bookkeeping off the training thread",
                collected.step,
                self._worker.capacity,
            )
        return pending

    def _in_background(self) -> bool:
        """Whether logging steps go to the worker: ``background="auto"`` asks the model's first
        parameter where it lives (on the CPU there is no device queue to keep going)."""
        background = self.options.background
        if background == "auto":
            first = next(self._model.parameters(), None)
            return first is not None and first.device.type != "cpu"
        return background

    def _collect(
        self, skipped: bool, learning_rate: float | None, optimizer: Any, background: bool
    ) -> Collected:
        """The training thread's part: nothing here reads a statistic on the host. For the
        worker the weights are read on every logging step (a new finding that quotes them
        needs this step's, and by the time the worker runs, the optimizer has moved them)."""
        probes = self._probes
        probes.end_forward()
        error = probes.take_error()
        if error is not None:  # gradwatch's own bookkeeping failed: the step is dropped
            raise error
        failed = probes.take_failed()
        entries = probes.ordered_entries()
        params = probes.refresh_parameters()
        weigh = self._weighing.next
        taken = probes.take()
        rank, world = rank_and_world()
        across = self._exchange if self.sync_dist and world > 1 else None
        losses, self._losses = self._losses, []
        step = (weigh, optimizer, skipped, across, self.scaler, losses, background)
        message = gather(taken, entries, self._layers, params, *step)
        combined = message.header.combined
        if across and not combined:
            self._notice(
                "dist-layout",
                "gradwatch: ranks saw different layers or shapes on this step; every rank "
                "reports its own numbers (FSDP norms are shard norms) until they agree again",
            )
        self._weighing.count()
        lr = learning_rate if learning_rate is not None else stats.learning_rate(optimizer)
        return Collected(
            step=self._step,
            copy=message.copy_to_host(),  # the one device-to-host copy of the step, started
            skipped=skipped,
            combined=combined,
            ranks_per_copy=world // message.header.mesh_size if combined else 1,
            weighed=weigh,
            failed=failed,
            learning_rate=lr,
            forwards=probes.take_forwards(),
            trainable=any(p.requires_grad for p in params),
            rank=rank,
            twice=self._twice_at == self._step,
        )

    def _finish(self, c: Collected, optimizer: Any = None, synchronous: bool = False) -> Report:
        """From the step's numbers to its report, its findings and the sinks: on the worker,
        or (``synchronous``) on the training thread, which can also measure the curvature and
        read the weights when a new finding quotes them."""
        host = c.copy.read()
        grad_of = host.values(GRAD, "norm")
        input_rms, input_absmax = input_scale(host)
        scale = loss_scale_of(host)
        scale = float(scale) if scale else 1.0
        scaler_scale = scale if self.scaler is not None else None
        # data parallelism averages the ranks' losses: the signal of their mean is 1/ranks of
        # each (not within a tensor-parallel mesh)
        layers = layer_stats(host, self._weighing.layers, scale * c.ranks_per_copy)
        global_norm = combine_norms(list(grad_of.values())) if grad_of else None
        skipped = c.skipped or (
            self.scaler is not None and global_norm is not None and not math.isfinite(global_norm)
        )
        if c.weighed:
            self._weighing.step = c.step
        if INPUTS in c.failed:
            input_rms = input_absmax = None
        report = Report(c.step, layers, [], global_norm, input_rms, input_absmax, skipped)
        report.weight_step, report.loss_scale = self._weighing.step, scaler_scale
        report.losses = losses_of(host)
        if c.failed:
            notices.leave_out(report, c.failed)
            new = [name for name in report.unmeasured if f"unmeasured|{name}" not in self._notices]
            if new:
                with self._notice_lock:
                    self._notices.update(f"unmeasured|{name}" for name in new[1:])
                self._notice(f"unmeasured|{new[0]}", notices.unmeasured_message(report, new))
        report.learning_rate = c.learning_rate
        weigh_now = None  # a new finding's cause quotes the weights: read today's
        if synchronous:
            if self._curvature is not None and not skipped and self._curvature.due():
                report.curvature = self._measure_curvature(optimizer)
            if not c.weighed and not skipped:
                weigh_now = functools.partial(
                    self._weigh_now, report, host.header.layers, c.combined
                )
        elif not c.weighed and not skipped:  # read with the step, kept until a finding asks
            weigh_now = functools.partial(self._weigh_from, report, host)
        report.findings = self._diagnosis.findings(
            report, self.thresholds, c.learning_rate, weigh_now
        )
        for key, text in notices.coverage(report.step, c.forwards, bool(grad_of), c.trainable):
            if not (key == "no-forward" and c.twice):
                self._notice(key, text)
        self._report = report
        if c.rank == 0:
            self._write(report)
        nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
        if nonfinite:  # the norms carried may be stale either way: read them again
            self._weighing.read_next()
        if nonfinite and self.nan_strategy == "raise":
            raise NonFiniteError(nonfinite[0].message, report)
        return report

    def _measure_curvature(self, optimizer: Any) -> Curvature | None:
        try:
            with self._probes.paused():  # its forward is not the step's
                return self._curvature.measure(self._model, optimizer)
        except Exception as e:  # like any measurement: a warning, and training goes on
            message = f"gradwatch could not measure the curvature ({type(e).__name__}: {e})"
            self._notice("curvature-failed", message + "; training continues")
            return None

    def _weigh_now(self, report: Report, facts: tuple, combined: bool) -> None:
        """Read the weights on a step that was not to measure them, because a finding's cause
        depends on them (on the training thread, before the optimizer moves them); ranks whose
        data were combined agree on that, so they all call this."""
        probes = self._probes
        weight_of = weight_norms(probes.refresh_parameters(), self._exchange if combined else None)
        self._weighed(report, facts, weight_of, recurrent_facts(probes.ordered_entries()))

    def _weigh_from(self, report: Report, host: HostValues) -> None:
        """On the worker: the weights read with the step (the ranks combined them with the rest)."""
        self._weighed(
            report, host.header.layers, host.values(WEIGHT, "norm"), host.header.recurrent
        )

    def _weighed(self, report: Report, facts: tuple, weight_of: dict, recurrent: dict) -> None:
        """Put weights read after the report was made into it, and remember them."""
        reweigh(report, facts, weight_of, recurrent, self._weighing.layers)
        report.weight_step = self._weighing.step = report.step

    def _write(self, report: Report) -> None:
        """The sinks that may run here; the others get the report at the next delivery."""
        for sink in self._sinks:
            if getattr(sink, "on_training_thread", False):
                self._outbox.append(("report", (sink, report)))
            else:
                self._write_to(sink, report)

    def _write_to(self, sink: Any, report: Report) -> None:
        try:
            sink.write(report)
        except Warning as w:  # escalated by -W error: raised where the user's loop can see it
            self._outbox.append(("raise", w))
        except Exception as e:
            self._notice(
                f"sink-{type(sink).__name__}",
                f"gradwatch could not write to {type(sink).__name__} ({type(e).__name__}: {e})",
            )

    def _measurement_failed(self, step: int, e: Exception) -> None:
        self._notice(
            "measure-failed",
            f"gradwatch could not measure step {step} ({type(e).__name__}: {e}); "
            "training continues",
        )
        log.debug("measurement failed", exc_info=True)

    def _notice(self, key: str, message: str) -> None:
        """Say ``message`` once (rank 0; the others log it), at the next delivery."""
        with self._notice_lock:
            if key in self._notices:
                return
            self._notices.add(key)
        if rank_and_world()[0] == 0:
            self._say(message)
        else:
            log.debug(message)

    def _say(self, message: str) -> None:
        self._outbox.append(("text", message))

    def _deliver(self, guard: bool) -> None:
        """On the training thread: the warnings and the training-thread sinks' reports the
        finished steps left, in order, and what went wrong on the worker. ``guard``: inside
        ``optimizer.step()`` or a Trainer an escalated warning is logged, never raised."""
        for error in self._worker.take_errors():
            self._notice(
                f"worker-{type(error).__name__}",
                f"gradwatch's background worker failed ({type(error).__name__}: {error}); "
                "training continues",
            )
        outbox = self._outbox
        while outbox:
            what, item = outbox.popleft()
            if what == "text":
                emit(item, guard)
            elif what == "report":
                self._write_to(*item)
            elif guard:  # inside optimizer.step() or a Trainer: logged, never raised there
                log.warning("gradwatch: %s", item)
            else:
                raise item  # a sink's warning, escalated by -W error in the user's own loop

    def _settle(self) -> None:
        """Wait until the worker has finished every step handed over (no delivery)."""
        self._worker.wait()


def _deliver_at_exit(ref: weakref.ref) -> None:
    """The warnings of the steps finished at interpreter exit, for a watcher never closed
    (logged if escalated: nothing may raise there)."""
    owner = ref()
    if owner is not None and not owner._closed:
        owner._deliver(True)


def fresh_closing_state(owner: StepClosing) -> None:
    """The measuring half's own attributes, as a watcher starts (or a copy unpickles)."""
    owner._worker = Worker()
    # ("text", a warning's message), ("report", (a training-thread sink, its report)) or
    # ("raise", a warning a sink raised: -W error)
    owner._outbox = collections.deque()
    owner._notice_lock = threading.Lock()
    owner._told_behind = False  # the training thread waited for the worker: said once
