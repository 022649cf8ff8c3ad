"""Optimizer mode (``GradWatch(..., optimizer=opt)``): each step is closed from inside
``optimizer.step()``, and the steps a ``GradScaler`` skips are seen through its ``update()``."""

from __future__ import annotations

import logging
import weakref
from typing import Any, Protocol

import torch

log = logging.getLogger("gradwatch")


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (Accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): whatever exposes the one it wraps as ``optimizer`` or
    ``_optimizer``. That one holds the state and the learning rate, and its ``step`` runs exactly
    when an update happens (a wrapper skips it on accumulation steps and on AMP overflows)."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = next(
            (
                candidate
                for candidate in (getattr(optimizer, a, None) for a in ("optimizer", "_optimizer"))
                if isinstance(candidate, torch.optim.Optimizer) and candidate is not optimizer
            ),
            None,
        )
        if inner is None:
            break
        optimizer = inner
    return optimizer


class ClosesSteps(Protocol):
    """What optimizer mode asks of the watcher (``GradWatch``, which owns this object)."""

    def end_step(self, skipped: bool = False) -> Any: ...


class OptimizerMode:
    """The hooks of optimizer mode on one optimizer (and its scaler). They close the watcher's
    steps through its public :meth:`~gradwatch.GradWatch.end_step`."""

    def __init__(self, watch: ClosesSteps, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        self._ref = weakref.ref(watch)
        self.stepped = False  # the optimizer step ran since the scaler's last update()
        self._handle = optimizer.register_step_pre_hook(_StepPreHook(self))
        self._scaler_update = ScalerUpdate.install(self, scaler) if scaler is not None else None

    def stepping(self) -> None:
        """Inside ``optimizer.step()``, before any parameter changes (after GradScaler unscaled)."""
        self.stepped = True
        watch = self._ref()
        if watch is not None:
            watch.end_step()

    def updating(self) -> None:
        """In ``scaler.update()``: with no optimizer step since the last one, the scaler skipped
        this step (inf/NaN gradients), which closes here, as skipped."""
        if self.stepped:
            self.stepped = False
            return
        watch = self._ref()
        if watch is not None:
            watch.end_step(skipped=True)

    def remove(self) -> None:
        self._handle.remove()
        if self._scaler_update is not None:
            self._scaler_update.uninstall()
            self._scaler_update = None


class _StepPreHook:
    """Optimizer step pre-hook; holds its mode weakly (the optimizer outlives a closed watcher)."""

    def __init__(self, mode: OptimizerMode) -> None:
        self._ref = weakref.ref(mode)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        mode = self._ref()
        if mode is not None:
            mode.stepping()


class ScalerUpdate:
    """Stands in for ``scaler.update`` in optimizer mode, to see the steps the scaler skips.

    On inf/NaN gradients ``GradScaler.step`` does not call ``optimizer.step()``, so the optimizer
    hook never runs, and ``scaler.update()`` (once per iteration, as GradScaler requires) is the
    only call of that iteration gradwatch can see: without it the overflow step's forward and
    backward would be read as part of the next step's. GradScaler offers no hook, so this is an
    instance attribute over the method, removed again by ``close()``; it calls what was there.
    """

    def __init__(self, mode: OptimizerMode, scaler: Any) -> None:
        self._ref = weakref.ref(mode)
        self._scaler = scaler
        # an instance attribute already there (another wrapper)
        self._own = "update" in getattr(scaler, "__dict__", ())
        self._inner = scaler.update

    @classmethod
    def install(cls, mode: OptimizerMode, scaler: Any) -> ScalerUpdate | None:
        """None where it cannot stand in (no ``update``, or a class that takes no attribute):
        skipped steps then go unseen in optimizer mode, as before."""
        if not callable(getattr(scaler, "update", None)):
            return None
        hook = cls(mode, scaler)
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
        mode = self._ref()
        if mode is not None:
            mode.updating()  # before the scale changes
        return self._inner(*args, **kwargs)

    def __reduce__(self) -> tuple:
        # A pickled or copied scaler gets its own plain method: the copy is not watched.
        return (getattr, (self._scaler, "update"))
