"""The background worker that finishes logging steps off the training thread, in order.

The training thread hands over each logging step as a job (its numbers already on their way to
the host) and goes on training; one thread runs the jobs one after the other: the readout, the
diagnosis and the sinks. What must reach the user's thread (warnings, loggers that are not
thread-safe) waits in an outbox the training thread empties at its next call into gradwatch.
"""

from __future__ import annotations

import atexit
import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..report import Report

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
        self.on_exit: Callable[[], None] | None = None  # after the wait at interpreter exit

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; when ``capacity`` jobs are waiting, first wait for the oldest."""
        if self._stopping:  # stopped: nothing would run it
            job()
            return
        with self._ready:
            if self._thread is None:  # started before anything is counted: it may fail
                thread = threading.Thread(target=self._run, name="gradwatch", daemon=True)
                thread.start()
                self._thread = thread
                atexit.register(_finish_at_exit, weakref.ref(self))
            if self._busy >= self.capacity:
                self.waits += 1
                while self._busy >= self.capacity:
                    self._ready.wait()
            self._busy += 1
            self._jobs.append(job)
            self._ready.notify_all()

    def on_worker(self) -> bool:
        """Whether the caller runs on the worker's own thread."""
        return self._thread is threading.current_thread()

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
        if worker.on_exit is not None:
            try:
                worker.on_exit()
            except Exception:  # nothing may fail the interpreter's exit
                pass


class PendingReport(Report):
    """The report of a logging step the worker has not finished yet: its step is known, and
    reading anything else (comparing it too) waits until the worker has filled it in; from then
    on it is a plain :class:`Report` (equal to one, and pickled as one)."""

    def __init__(self, step: int, on_worker: Callable[[], bool]) -> None:
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "_filled", threading.Event())
        object.__setattr__(self, "_on_worker", on_worker)

    def fill(self, report: Report) -> None:
        """Become ``report`` (on the worker, when the step is finished)."""
        own = object.__getattribute__(self, "__dict__")
        filled = own["_filled"]
        own.update(vars(report))
        for name in ("_filled", "_on_worker"):
            own.pop(name, None)
        object.__setattr__(self, "__class__", type(report))  # a plain report from now on
        filled.set()

    def finish(self) -> None:
        """Wait until the worker filled it in (on the worker itself, for a later step's
        report, there is nothing to wait for: it becomes an empty report)."""
        own = object.__getattribute__(self, "__dict__")
        filled = own.get("_filled")
        if filled is None:
            return
        if own["_on_worker"]():
            self.fill(Report(own["step"]))
        else:
            filled.wait()

    def __getattribute__(self, name: str) -> Any:
        # Every field but the step waits, even those whose default is a class attribute.
        if name not in ("step", "fill", "finish") and not name.startswith("__"):
            object.__getattribute__(self, "finish")()
        return object.__getattribute__(self, name)

    def __eq__(self, other: object) -> bool:
        self.finish()
        return self == other  # as the report it now is

    def __reduce_ex__(self, protocol: Any) -> Any:
        self.finish()  # a copy is of the finished report
        return self.__reduce_ex__(protocol)
