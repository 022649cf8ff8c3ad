"""The background worker that finishes logging steps off the training thread, in order.

The training thread hands over each logging step as a job (its numbers already on their way to
the host) and goes on training; one thread runs the jobs one after the other: the readout, the
diagnosis and the sinks. What must reach the user's thread (warnings, loggers that are not
thread-safe) waits in an outbox the training thread empties at its next call into gradwatch.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..report import Report

log = logging.getLogger("gradwatch")

# Logging steps that may wait for the worker. A full queue makes the training thread wait for the
# oldest (nothing is dropped): only a step whose bookkeeping takes longer than the training step
# itself, logged every step, gets there.
CAPACITY = 4
# At interpreter exit without close(), the steps still queued get this long to finish (their
# TensorBoard records are the last ones, often the ones that matter).
EXIT_WAIT_S = 30.0


class Worker:
    """Runs jobs one at a time, in the order given, on one daemon thread (started with the first
    job). A job's exception is kept, never raised there: :meth:`take_errors` hands it over."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._ready = threading.Condition()
        self._busy = 0  # jobs submitted and not finished
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.waits = 0  # hand-overs that found the queue full and waited

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; when ``capacity`` jobs are waiting, first wait for the oldest."""
        if self._stopping:  # stopped: nothing would run it
            job()
            return
        with self._ready:
            if self._busy >= self.capacity:
                self.waits += 1
                while self._busy >= self.capacity:
                    self._ready.wait()
            self._busy += 1
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gradwatch", daemon=True)
                self._thread.start()
                atexit.register(_finish_at_exit, weakref.ref(self))
            self._ready.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Until every job submitted so far has run (or ``timeout`` seconds have passed)."""
        if self._thread is threading.current_thread():
            return  # a job asking for its own results: they are being made
        with self._ready:
            self._ready.wait_for(lambda: not self._busy, timeout)

    def take_errors(self) -> list[BaseException]:
        with self._ready:
            errors, self._errors = self._errors, []
        return errors

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        self.wait()
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except BaseException as e:  # kept for the training thread, which decides
                with self._ready:
                    self._errors.append(e)
            finally:
                with self._ready:
                    self._busy -= 1
                    self._ready.notify_all()


def _finish_at_exit(ref: weakref.ref) -> None:
    worker = ref()
    if worker is not None:
        worker.wait(EXIT_WAIT_S)


class PendingReport(Report):
    """The report of a logging step the worker has not finished yet: its step is known, and
    reading anything else waits for the worker, which fills it in; from then on it is a plain
    :class:`Report` (equal to one, and pickled as one)."""

    def __init__(self, step: int, wait: Callable[[], None]) -> None:
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "_wait", wait)

    def fill(self, report: Report) -> None:
        """Become ``report`` (on the worker, when the step is finished)."""
        vars(self).update(vars(report))
        vars(self).pop("_wait", None)
        object.__setattr__(self, "__class__", type(report))  # a plain report from now on

    def __getattribute__(self, name: str) -> Any:
        # Every field but the step waits, even those whose default is a class attribute.
        if name not in ("step", "fill") and not name.startswith("__"):
            wait = object.__getattribute__(self, "__dict__").get("_wait")
            if wait is not None:
                wait()
                if type(self) is PendingReport:  # the worker left it unfinished: empty
                    object.__getattribute__(self, "fill")(Report(self.step))
        return object.__getattribute__(self, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        self.layers  # noqa: B018  (waits: a copy is of the finished report)
        return self.__reduce_ex__(protocol)
