"""``GradWatchCallback``: the Lightning adapter over the :class:`~gradwatch.GradWatch` engine.

It maps Trainer hooks onto the engine and adds nothing else: no statistics, no rules of its own.

- ``on_fit_start``: attach (after the strategy has wrapped and sharded the model).
- ``on_train_batch_start`` / ``on_before_backward``: a measured training step's forward begins and
  ends there, since a ``training_step`` may call submodules without ever calling the module itself.
- ``on_before_optimizer_step``: read ``.grad`` after accumulation, AMP unscaling and the DDP
  all-reduce, before gradient clipping; the step is ``trainer.global_step``.
- ``teardown`` / ``on_exception``: detach, keeping the history for a second ``fit``.

Lightning ships as two packages whose ``Callback`` classes differ (``lightning.pytorch`` and
``pytorch_lightning``); the callback derives from every one that is installed, so a Trainer from
either accepts it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch

from ..arguments import check_curvature
from ..measure.stats import learning_rate
from ..options import Options, positional_options, takes_options
from ..output.sinks import LoggerSink, TensorBoardSink
from ..watch import GradWatch
from .held import HeldEngine


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            pass
    if not bases:
        raise ImportError(
            "gradwatch.GradWatchCallback needs PyTorch Lightning: "
            "pip install lightning (or pytorch-lightning)"
        )
    return tuple(bases)


@takes_options
class GradWatchCallback(HeldEngine, *_callback_bases()):
    """Watches a LightningModule while it trains; one line in the ``Trainer``::

        trainer = Trainer(callbacks=[GradWatchCallback(every_n_steps=50)],
                          logger=TensorBoardLogger("runs"))

    With a ``TensorBoardLogger`` the scalars and the findings text go through its
    ``SummaryWriter``; any other logger (CSV, W&B, MLflow) gets the same scalar keys through
    ``log_metrics``; with ``logger=False`` there are warnings and :attr:`report` only. Only global
    rank 0 writes. Under ``ddp_spawn`` the engine lives in the worker processes, so :attr:`report`
    stays None in the launching process.

    Args:
        curvature_loss: ``curvature_loss(pl_module, batch)``, for the curvature probe: the loss on
            ``batch`` (the optimizer step's last micro-batch), computed again without ``self.log``
            or ``backward()``: Lightning's own closure does both, so it cannot be reused. The
            probe measures it inside the optimizer step, compared with that optimizer's rule.
        {options}

    The AMP scaler is taken from the Trainer, and so is the schedule: without ``every_n_steps``
    the callback measures the steps the Trainer logs (``log_every_n_steps``, 50 by default).
    """

    def __init__(
        self,
        *args: Any,
        curvature_loss: Callable[[Any, Any], Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        # (every_n_steps, thresholds) was the positional order
        positional_options("GradWatchCallback", args, ("every_n_steps", "thresholds"), options)
        # Without every_n_steps of its own the callback logs when the Trainer does
        self._follow_trainer = "every_n_steps" not in options
        self.options = Options.from_arguments("GradWatchCallback", options)
        curvature_every = self.options.curvature_every
        check_curvature(curvature_every, curvature_loss, "pl_module, batch")
        self.curvature_loss = curvature_loss
        self._batch: Any = None  # the current training batch, for curvature_loss
        self._engine: GradWatch | None = None
        self._state: dict[str, Any] | None = None  # history kept between fits and checkpoints
        self._measured_step: int | None = None
        self._loss: Any = None  # the step's loss so far (a device tensor), for loss_spike

    @property
    def first_seen(self) -> dict[str, int]:
        """``"layer|kind"`` -> the step at which that finding first appeared."""
        if self._engine is not None:
            return self._engine.first_seen
        return dict((self._state or {}).get("first_seen", {}))

    # -- attach and detach -----------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        loss = self.curvature_loss
        options = self.options
        every = getattr(trainer, "log_every_n_steps", None)
        if self._follow_trainer and isinstance(every, int) and not isinstance(every, bool):
            if every > 0:
                options = dataclasses.replace(options, every_n_steps=every)
        engine = GradWatch(
            pl_module,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            curvature_loss=(lambda: loss(pl_module, self._batch)) if loss is not None else None,
            options=options,
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if type(logger).__name__ == "TensorBoardLogger":
                    engine.add_sink(TensorBoardSink(logger.experiment, owns_writer=False))
                else:
                    engine.add_sink(LoggerSink(logger))
        if self._state:
            engine.load_state_dict(self._state)
        self._engine = engine
        self._measured_step = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        self._batch = self._loss = None
        self._release()

    # -- one optimizer step ----------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = self._engine
        if engine is not None:
            self._batch = batch
            engine.go_to_step(trainer.global_step)
            engine.begin_forward(pl_module, batch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._engine is not None:
            self._engine.end_forward()
            # Lightning divides each micro-batch's loss by the accumulation: their sum is the
            # step's loss (kept on the device; read on logging steps only). Under 16-mixed it
            # arrives scaled by the GradScaler: end_step divides it back (loss_scaled).
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                loss = loss.detach()
                self._loss = loss if self._loss is None else self._loss + loss

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is not None:
            self._engine.end_forward()  # a step that returned no loss never reached backward

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        engine = self._engine
        step = trainer.global_step
        if engine is None or step == self._measured_step:
            return  # a second optimizer in the same step: measured at the first one
        self._measured_step = step
        engine.go_to_step(step)
        loss, self._loss = self._loss, None
        # an escalated warning is logged, never raised into fit()
        engine.end_step(
            learning_rate=learning_rate(optimizer), optimizer=optimizer, loss=loss, loss_scaled=True
        )

    # -- checkpoints and pickling ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._engine is not None:
            return self._engine.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._state = dict(state_dict)
        if self._engine is not None:
            self._engine.load_state_dict(self._state)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._engine is not None:  # hooks and writers stay with this process
            state["_state"] = self._engine.state_dict()
        state["_engine"] = None
        state["_batch"] = state["_loss"] = None
        return state
