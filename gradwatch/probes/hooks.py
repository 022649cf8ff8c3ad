"""The hook objects gradwatch puts on a model: module pre- and post-hooks, the model's root hooks,
the tensor hook on each output, and the mode that sees functional activations.

Hook objects hold only a weak reference to the :class:`~gradwatch.probes.core.Probes`: a deep copy
of the model (an EMA copy) gets inert hooks, and ``torch.save(model)`` pickles them as inert hooks
too.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..measure import stats
from ..measure.statistics import SIGNAL
from .compat import in_backward
from .kinds import FUNCTION_KINDS
from .placements import is_dtensor
from .softmaxes import ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from .buffers import Entry
    from .recorder import Recorder


class GradHook:
    """Tensor hook on an entry's outputs: the norm of each incoming gradient."""

    __slots__ = ("entry", "_ref")

    def __init__(self, entry: Entry, probes: Recorder) -> None:
        self.entry = entry
        self._ref = weakref.ref(probes)

    def __call__(self, grad: torch.Tensor | None) -> None:
        if grad is None:  # no gradient reached this output (cuDNN's RNNs leave h_n, c_n so)
            return
        probes = self._ref()
        if probes is not None and probes.tracing():
            # Traced into the compiled backward: dynamo refuses any Python side effect here.
            acc = self.entry.signal_acc
            if acc is not None:
                sumsq = stats.signal_sumsq(grad, acc.dtype)
                acc.add_(SIGNAL.pack(acc.dtype, sumsq=sumsq, count=grad.numel()).to(acc.device))
        elif probes is not None:
            try:
                probes.add_signal(self.entry, grad)
            except Exception as e:  # never break the user's backward
                probes.fail(e, self.entry.name)


class ProbeHook:
    """Base of the module hooks: a weak reference to the Recorder, inert after a copy or unpickle.

    Traced code reaches a module's own data through its hook, never through its name: dynamo
    guards on every name or list length that traced code reads, so a block compiled on its own
    (after a graph break) would compile again for every block of the model.
    """

    def __init__(self, probes: Recorder | None, name: str = "") -> None:
        self._ref = weakref.ref(probes) if probes is not None else None
        self.name = name
        self.entry: Entry | None = None  # the module's entry; None when it is not watched
        self.events: list = []  # what traced code saw here since the last fold (traced.Seen...)
        self.fn_counts: dict[str, int] = {}  # functional calls so far in this forward (pre-hook)
        self.calls_fn = False  # the module was seen calling a functional activation
        self.attention = False  # an attention module: its softmaxes are attention
        self.heads: int | None = None  # ... and the heads it says it has
        self.fn_skip = False  # its functional calls are not measured (see Recorder._attach)
        self.subtree = (0, 0)  # its own and its descendants' hooks in Recorder.event_hooks

    def probes(self) -> Recorder | None:
        p = self._ref() if self._ref is not None else None
        return p if p is not None and p.armed else None

    def __deepcopy__(self, memo: dict) -> ProbeHook:
        return type(self)(None, self.name)

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(None, state["name"])


# Every hook body (these, GradHook above, FunctionalMode below) is guarded: an error inside
# gradwatch never reaches the user's step. An error in one layer's hook leaves that layer's
# statistics out of the step's report, the others are kept (Recorder.fail); the boundary names the
# layer in a warning, once.


class PreHook(ProbeHook):
    def __call__(self, module: nn.Module, args: Any) -> tuple | None:
        if (p := self.probes()) is not None and p.traced and torch.compiler.is_compiling():
            if p.traced_recording():
                p.traced_enter(self)
        elif p is not None and p.recording:
            try:
                return p.enter(self, args)  # new arguments only for a sequence it hooks
            except Exception as e:
                p.fail(e, self.name)
        return None


class PostHook(ProbeHook):
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (p := self.probes()) is not None:
            if p.traced and torch.compiler.is_compiling():  # p.tracing(), inlined: every module
                if p.traced_recording():
                    p.traced_leave(self, module, args, output)
            elif p.recording:
                try:
                    # Our reductions need not pass through the functional mode's Python handler.
                    with torch._C.DisableTorchFunction():
                        p.leave(self, module, args, output)
                except Exception as e:
                    p.fail(e, self.name)
            elif p.forwards and in_backward() and torch.is_grad_enabled():
                try:
                    p.recomputed(self.name, output)
                except Exception as e:
                    p.fail(e, self.name)


class ComputedHook(ProbeHook):
    """Runs before a parallel style's own output hook: the DTensor the module computed, whose
    shape says which dimensions the style's local output splits (see placements)."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (p := self.probes()) is not None and p.recording and is_dtensor(output):
            p.placements.computed(module, output)


class RootPreHook(ProbeHook):
    def __call__(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if (p := self.probes()) is not None and not p.external_forward:
            if p.tracing():
                p.traced_begin(module, args, kwargs)
                return
            try:
                p.begin_forward(module, args, kwargs)
            except Exception as e:
                p.fail(e)


class RootPostHook(ProbeHook):
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (p := self.probes()) is not None and not p.external_forward:
            if p.tracing():
                p.traced_end()
                return
            try:
                p.end_forward()
            except Exception as e:
                p.fail(e)


class FunctionalMode(TorchFunctionMode):
    """Sees functional activations (``torch.sigmoid``, ``F.relu``...) during a logged forward."""

    def __init__(self, probes: Recorder) -> None:
        super().__init__()
        self._ref = weakref.ref(probes)
        self._placements = probes.placements  # asked at every op: no weak reference to follow

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        how = ATTENTION_FUNCTIONS.get(func)
        if how is not None:
            return self._attention(how, func, args, kwargs)
        out = func(*args, **kwargs)
        if self._placements.tracking:  # tensor parallel: what is split follows
            self._propagate(args, kwargs, out)
        kind = FUNCTION_KINDS.get(func)
        if kind is None or (p := self._ref()) is None:
            return out
        if p.tracing():
            if p.traced_recording():
                p.traced_functional(kind, func, args, kwargs, out)
        elif p.recording:
            try:
                p.functional(kind, func, args, kwargs, out)
            except Exception as e:
                p.fail(e)
        return out

    def _propagate(self, args: tuple, kwargs: dict, out: Any) -> None:
        p = self._ref()
        if p is not None and p.recording:
            try:
                p.placements.propagate(args, kwargs, out)
            except Exception as e:
                p.fail(e)

    def _attention(self, how: str, func, args: tuple, kwargs: dict):
        """An attention call (or a softmax that may be one): measured from its own inputs,
        after the call, which runs as the model made it."""
        p = self._ref()
        if p is not None and p.tracing():
            out = func(*args, **kwargs)
            if p.traced_recording():
                p.traced_attention(how, args, kwargs)
            return out
        if p is None or not p.recording:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            with torch._C.DisableTorchFunction():
                p.attention(how, args, kwargs)
        except Exception as e:  # the attention row's alone: the caller's own row stays
            p.fail(e, f"{p.caller(p.stack).name}:attention")
        return out
