"""The ``GradWatch`` engine: arms the probes on logging steps, reads ``.grad`` at the optimizer
boundary, builds the :class:`Report`, diagnoses it and hands it to the sinks."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .arguments import check_arguments, check_curvature, check_logits_layer, check_loss, open_writer
from .closing import StepClosing, fresh_closing_state
from .diagnosis import notices
from .diagnosis.engine import Diagnosis
from .optimizer_mode import OptimizerMode, inner_optimizer
from .options import Options, positional_options, takes_options
from .output.sinks import Sink, TensorBoardSink, WarningSink
from .probes import Probes, unwrap
from .report import Report
from .step.curvature import CurvatureProbe
from .step.distributed import Exchange, rank_and_world
from .step.gather import Layers, loss_scale
from .step.readout import Weighing

log = logging.getLogger("gradwatch")


_STATE_VERSION = 2
_READS_VERSIONS = (1, 2)  # version 1 lacks the rules' streaks: they start afresh
# Logging steps this many steps apart or more take the per-module hooks off in between: idle,
# they cost about 5 us a module on every forward; adding and removing them about 13 us a module
# (both measured on a 1,000-layer MLP, a 2-core CPU).
KEEP_HOOKS_BELOW = 4


@takes_options
class GradWatch(StepClosing):
    """Watches a model while it trains: per-layer gradients, backward signal, saturation, dead units.

    Call :meth:`step` once per optimizer step, after ``backward()`` (after ``scaler.unscale_``
    under AMP) and before ``zero_grad()``; or pass ``optimizer=`` and gradwatch measures by itself
    inside every ``optimizer.step()``.

    Example (``log_dir="runs/exp"`` writes it all to TensorBoard too)::

        >>> import torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.GradWatch(model, every_n_steps=10) as gw:
        ...     for step in range(20):
        ...         model(torch.randn(16, 4)).pow(2).mean().backward()
        ...         report = gw.step()  # a Report on logging steps, None on the others
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        >>> gw.report.step, list(gw.report.layers), gw.report.findings
        (10, ['0', '1', '2'], [])

    Args:
        model: any ``nn.Module`` (DDP and ``torch.compile`` wrappers are unwrapped; attach before
            compiling).
        log_dir: write TensorBoard event files there (gradwatch owns and closes the writer).
        writer: write through this ``SummaryWriter`` instead (gradwatch flushes, never closes it).
        optimizer: optimizer mode: measure inside every ``optimizer.step()``, no ``step()`` calls.
            Gradients are read there, so they are post-clip if the loop clips before stepping.
        scaler: the ``torch.amp.GradScaler`` in use, if any: the backward signal is divided by its
            loss scale, and a step with inf/NaN gradients is recorded as skipped, not as a finding.
        curvature_loss: with ``curvature_every``: the loss on the current batch, computed again
            (a function with no arguments and no side effects that does not call ``backward()``).
        options: the options below as one :class:`Options` (instead of one by one).
        {options}
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | os.PathLike | None = None,
        writer: Any = None,
        *args: Any,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        curvature_loss: Callable[[], torch.Tensor] | None = None,
        options: Options | None = None,
        **chosen: Any,
    ) -> None:
        # (model, log_dir, writer, every_n_steps, optimizer, thresholds) was the positional order
        if optimizer is not None:
            chosen["optimizer"] = optimizer
        positional_options("GradWatch", args, ("every_n_steps", "optimizer", "thresholds"), chosen)
        optimizer = inner_optimizer(chosen.pop("optimizer", None))
        if options is None:
            options = Options.from_arguments("GradWatch", chosen)
        elif not isinstance(options, Options) or chosen:
            raise TypeError(
                "options must be a gradwatch.Options, given instead of the options one by one, "
                f"got {type(options).__name__}" + (f" and {sorted(chosen)}" if chosen else "")
            )
        curvature_every = options.curvature_every
        check_arguments(model, log_dir, writer, optimizer, scaler)
        check_logits_layer(unwrap(model), options.logits_layer)
        check_curvature(curvature_every, curvature_loss)
        self._fresh(options, unwrap(model), optimizer, scaler)
        if curvature_every is not None:
            self._curvature = CurvatureProbe(curvature_every, curvature_loss)
        try:  # a constructor that fails leaves no hook behind
            self._probes = Probes(
                self._model,
                self.thresholds.saturation_eps,
                options.include,
                options.exclude,
                options.through_time,
                options.logits_layer,
            )
            if self.options.warn:
                self._sinks.append(WarningSink(self._say))
            writes = rank_and_world()[0] == 0  # only rank 0 writes event files
            if writes and log_dir is not None:
                self._sinks.append(TensorBoardSink(open_writer(log_dir), True))
            elif writes and writer is not None:
                self._sinks.append(TensorBoardSink(writer, False))
            if optimizer is not None:
                self._optimizer_mode = OptimizerMode(self, optimizer, scaler)
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

    def step(
        self, optimizer: torch.optim.Optimizer | None = None, loss: Any = None
    ) -> Report | None:
        """Close one optimizer step: measure it if it is a logging step.

        Args:
            optimizer: the optimizer about to step, if you like: the size of its next update is
                measured (``LayerStats.update_gain``), and the curvature probe compares its step
                with the curvature (``Curvature.stability_ratio``).
            loss: the step's loss, if you like (a number or a one-element tensor, read only on
                logging steps): a spike in it is a ``loss_spike`` finding that names the layers
                whose share of the gradient changed most (``Report.losses``).

        Returns:
            The step's :class:`Report` on logging steps, None on the others. With the
            background worker (the ``background`` option) it is returned at once and fills in
            when first read (reading waits for the worker).
        """
        if self._closed:
            raise RuntimeError("GradWatch.step() called after close()")
        if self.optimizer is not None:
            raise RuntimeError(
                "GradWatch.step() must not be called in optimizer mode (optimizer= was given): "
                "gradwatch measures inside optimizer.step() by itself"
            )
        optimizer = inner_optimizer(optimizer)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        check_loss(loss)
        if self._repeats.same_gradients(self._model):
            self._twice_at = self._step  # not "no forward": say what happened
            self._notice("step-twice", notices.step_twice(self._step))
        return self._boundary(False, optimizer=optimizer, loss=loss)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to find what the uninterrupted run would: the step, the
        latest report, the rules' memory, the weight and curvature schedules and the notices
        given (see docs/usage.md). Plain data: ``torch.save`` and JSON both take it. Waits for
        the steps the background worker has not finished."""
        self._settle()
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "report": self._report.to_dict() if self._report is not None else None,
            **self._diagnosis.state_dict(),
            "weights": self._weighing.state_dict(),
            "curvature_seen": self._curvature.seen if self._curvature is not None else None,
            "notices": sorted(self._notices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. A ``log_dir`` writer is reopened with
        ``purge_step`` at the restored step, so TensorBoard drops what a crashed run wrote after
        its last checkpoint."""
        if not isinstance(state, dict) or state.get("version") not in _READS_VERSIONS:
            got = f" with version {state.get('version')!r}" if isinstance(state, dict) else ""
            raise ValueError(
                f"state must be a dict from GradWatch.state_dict() (versions 1, {_STATE_VERSION}"
                f"; this gradwatch writes {_STATE_VERSION}), got {type(state).__name__}{got}"
            )
        self._settle()
        self._step = int(state["step"])
        self._diagnosis.load_state_dict(state)
        if state.get("weights") is not None:  # version 1 lacks them: the next step reads them
            self._weighing.load_state_dict(state["weights"])
        if self._curvature is not None and state.get("curvature_seen") is not None:
            self._curvature.seen = int(state["curvature_seen"])
        self._notices.update(state.get("notices", ()))
        self._report = Report.from_dict(state["report"]) if state["report"] else None
        seen = {tuple(k.rsplit("|", 1)): step for k, step in self.first_seen.items()}
        for resume in filter(None, (getattr(sink, "resume", None) for sink in self._sinks)):
            resume(self._step, seen)
        self._arm()

    @property
    def report(self) -> Report | None:
        """The latest logging step's :class:`Report` (None before the first). Reading it waits
        for the steps the background worker has not finished."""
        self._settle()
        return self._report

    @property
    def first_seen(self) -> dict[str, int]:
        """``"layer|kind"`` -> the step at which that finding first appeared."""
        self._settle()
        return dict(self._diagnosis.first_seen)

    # -- for integrations (the Lightning callback is one) -----------------------------------------

    def add_sink(self, sink: Sink) -> None:
        """Hand every report from now on to ``sink`` as well (see :class:`gradwatch.Sink`).
        Only rank 0 writes: on other ranks this does nothing."""
        if not callable(getattr(sink, "write", None)):
            raise TypeError(f"sink must have a write(report) method, got {type(sink).__name__}")
        if rank_and_world()[0] == 0:
            self._sinks = [*self._sinks, sink]  # a new list: the worker may be going through it

    def begin_forward(self, module: nn.Module, inputs: Any) -> None:
        """Mark the start of a measured training forward, for a training step that may call
        submodules without calling the model itself (a ``training_step``). From the first call
        on, the caller marks every forward and the model's own calls no longer do. The floating
        tensors in ``inputs`` give the input-scale statistic."""
        if self._closed:
            return
        self._probes.begin_external_forward(module, inputs)

    def end_forward(self) -> None:
        """Mark the end of the forward that :meth:`begin_forward` began (before its backward)."""
        if not self._closed:
            self._probes.end_forward()

    def go_to_step(self, step: int) -> None:
        """Follow an outside count of optimizer steps (a Trainer's ``global_step``)."""
        if step != self._step:
            self._step = step
            self._arm()

    def end_step(
        self,
        skipped: bool = False,
        learning_rate: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss: Any = None,
        loss_scaled: bool = False,
    ) -> Report | None:
        """Close the current optimizer step as :meth:`step` does, for a caller inside a training
        loop (a framework's, or ``optimizer.step()``): a warning escalated to an error
        (``-W error``) is logged there instead of raised.

        Args:
            skipped: the step's ``optimizer.step()`` did not run (a GradScaler found inf/NaN
                gradients): it is reported as skipped, with no finding.
            learning_rate: the learning rate this step's update uses, quoted by ``diverging``
                findings (in optimizer mode it is read from the optimizer).
            optimizer: the optimizer about to step (optimizer mode: the one given): the size of
                its next update is measured against the weights (``LayerStats.update_gain``).
            loss: the step's loss, as for :meth:`step`.
            loss_scaled: ``loss`` is as the GradScaler (``scaler=``) scaled it for backward (a
                framework's backward hook sees it so): it is divided by the scaler's scale, on
                the device.

        Returns:
            The step's :class:`Report` on logging steps, None on the others. With the
            background worker (the ``background`` option) it is returned at once and fills in
            when first read (reading waits for the worker).
        """
        if self._closed:
            return None
        check_loss(loss)
        if loss is not None and loss_scaled:
            scale = loss_scale(self.scaler)  # this step's: the scaler updates after the step
            loss = loss / scale if scale is not None else loss
        return self._boundary(True, skipped, learning_rate, inner_optimizer(optimizer), loss)

    def flush(self) -> None:
        """Wait for the steps the background worker has not finished, give their warnings, and
        put what the sinks have written so far on disk (event files are flushed anyway when
        findings change and at :meth:`close`)."""
        self._settle()
        self._deliver(False)
        for flush in filter(None, (getattr(sink, "flush", None) for sink in self._sinks)):
            flush()

    def close(self, guard: bool = False) -> None:
        """Remove every hook, finish the steps handed to the background worker (their warnings
        and any error it met are given here), and flush/close what gradwatch opened. Safe to
        call twice. ``guard``: for a framework's hook (a Trainer's teardown), where a warning
        escalated to an error (``-W error``) is logged instead of raised."""
        if self._closed:
            return
        self._closed = True
        try:
            self._worker.stop()
            self._deliver(guard)
        finally:
            self._release()

    def _release(self) -> None:
        if self._probes is not None:
            self._probes.remove()
        self._model = None
        self._layers = Layers()  # its key holds the entries and the parameters
        if self._optimizer_mode is not None:
            self._optimizer_mode.remove()
            self._optimizer_mode = None
        for sink in self._sinks:
            try:
                getattr(sink, "close", lambda: None)()
            except Exception as e:  # closing must not fail the user's run
                log.warning("gradwatch: closing %s failed: %s", type(sink).__name__, e)

    def __getstate__(self) -> dict[str, Any]:
        # Hooks, writers and the model stay with this process: a copy comes back detached,
        # with its history (the state_dict) and options.
        return {"state": self.state_dict(), "options": self.options}  # (state_dict waits)

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        options = pickled["options"]  # a dict in copies pickled before Options existed
        self._fresh(options if isinstance(options, Options) else Options(**options))
        self.load_state_dict(pickled["state"])

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the step boundary -----------------------------------------------------------------------

    def _fresh(
        self, options: Options, model: nn.Module | None = None, optimizer=None, scaler=None
    ) -> None:
        """Every attribute of a watcher before anything is attached; without a model, a detached
        (closed) copy, as unpickling makes."""
        self.options = options
        self._model, self.optimizer, self.scaler = model, optimizer, scaler
        self._report: Report | None = None
        self._diagnosis = Diagnosis()  # when each finding was first seen, recent history
        self._step = 0
        self._closed = model is None
        self._notices: set[str] = set()
        self._sinks: list[Sink] = []
        self._probes: Probes | None = None
        self._optimizer_mode: OptimizerMode | None = None
        # when the weights are read, and their last values
        self._weighing = Weighing(options.weight_norm_every)
        self._layers = Layers()  # the watched layers' facts, for the step's message
        self._repeats, self._twice_at = notices.Repeats(), None  # step() without a backward
        self._curvature: CurvatureProbe | None = None
        self._losses: list[tuple[int, Any]] = []  # (step, loss) since the last logging step
        self._exchange = Exchange()  # the ranks' one all-reduce a logging step
        fresh_closing_state(self)

    def _arm(self) -> None:
        if self._probes is None:  # an unpickled, detached copy
            return
        n = self.every_n_steps
        armed = bool(n(self._step)) if callable(n) else self._step % n == 0
        self._probes.arm(armed, self._weighing.arm())  # E[phi'^2] where weights are read
        self._probes.install(armed or not callable(n) and n < KEEP_HOOKS_BELOW)
