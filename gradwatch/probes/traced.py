"""Forwards that dynamo traces: what the hooks record there, and how eager code folds it into the
entries afterwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..measure import stats
from ..measure.statistics import SIGNAL, STATISTICS
from .buffers import Entry
from .compat import mode_on_top
from .hooks import GradHook, ProbeHook
from .kinds import CHANNELS_FIRST, FUNCTION_NAMES, float_tensors, fn_params
from .rows import activation_rows, wanted
from .softmaxes import MHA, attention_measured, log_z_measured


class Measured(NamedTuple):
    """What traced code measured of one activation call (nothing for a layer that is not one)."""

    counts: torch.Tensor | None  # per-unit flat counts (a graph output)
    numel: int  # the elements they count
    rows: dict[str, torch.Tensor]  # the other statistics' rows (see rows.activation_rows)


class Seen(NamedTuple):
    """A watched module ran (its first-forward position)."""

    seq: int


class Call(NamedTuple):
    """A watched module's forward ended."""

    seq: int
    measured: Measured


class FunctionCall(NamedTuple):
    """A functional activation was called inside the module that holds this record."""

    seq: int
    fname: str
    index: int  # among the module's calls of ``fname`` in this forward
    kind: str | None  # None: an attention call
    params: dict[str, float]
    measured: Measured


NOTHING = Measured(None, 0, {})


class TracedForwards:
    """The traced-forward half of :class:`~gradwatch.probes.core.Probes` (a mixin: one object).

    Inside torch.compile the hooks are traced into the graph, and dynamo guards on every Python
    value that traced code reads: a counter read there would compile again at every step. In
    torch 2.13 it also drops attribute stores made, after a tensor hook was traced, on an object
    it had seen stored to before (list and dict updates survive). So traced code reads only
    flags that repeat from one logging step to the next, writes only into lists and dicts (each
    module's own, through its hook: see ProbeHook), and leaves the counting to eager code
    (fold_events). One traced forward is measured per logging step: a second one (gradient
    accumulation) would find the event counter not yet folded back to 0, and recompile.
    """

    def prepare_traced(self) -> None:
        """Before dynamo traces: a signal accumulator and a tensor hook object for every layer
        that carries the signal, on its parameters' device (made inside a trace, they would be
        the graph's own). Again at every logging step of a traced model: it may have moved."""
        for entry in self.module_entries.values():
            if entry.kind is not None or not entry.params:
                continue
            device = entry.params[0].device
            acc = entry.signal_acc
            if acc is None or acc.device != device:
                dtype = torch.float32 if device.type == "mps" else torch.float64  # no fp64 there
                entry.signal_acc = torch.zeros(len(SIGNAL.parts), dtype=dtype, device=device)
            if entry.grad_hook is None:
                entry.grad_hook = GradHook(entry, self)

    def tracing(self) -> bool:
        """Whether dynamo is tracing this call; ``traced`` first: it spares eager users the
        slower question (dynamo tells us before it traces anything, see _on_compile_start)."""
        return self.traced and torch.compiler.is_compiling()

    def traced_recording(self) -> bool:
        # len(), not bool(): dynamo before 2.13 cannot trace bool() of a dict (a graph break)
        return len(self.traced_now) > 0 or self.recording

    def traced_state(self) -> dict[str, Any]:
        state = self.traced_now
        if not state:  # the first hook of a forward, or a compiled part of an eager forward
            state.update(stack=[], busy=False, mode=False, entered=[])
            state["channels_first"] = self.channels_first
        return state

    def traced_begin(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if self.traced_forwards or not (torch.is_grad_enabled() and module.training):
            return
        self.traced_forwards.append(True)
        state = self.traced_state()
        if self.mode is not None and not self.mode_entered:
            self.mode.__enter__()  # every traced forward is a survey: it costs nothing at run time
            state["mode"] = True
        one = args[0] if len(args) == 1 and not kwargs else None
        for t in float_tensors(one if isinstance(one, torch.Tensor) else (args, kwargs)):
            if t.numel():
                self.traced_inputs.append((stats.norm_min_max(t), t.numel()))

    def traced_end(self) -> None:
        if self.traced_now.get("mode"):
            self.mode.__exit__(None, None, None)
        self.traced_now.clear()

    def next_seq(self) -> int:
        """The sequence number of the record traced code is about to make (see fold_events)."""
        seq = self.seq
        n = seq["n"]
        seq["n"] = n + 1
        return n

    def traced_enter(self, hook: ProbeHook) -> None:
        state = self.traced_state()
        if hook.entry is not None:
            hook.events.append(Seen(self.next_seq()))
        state["stack"].append(hook)
        hook.fn_counts.clear()
        # A compiled part of an eager forward: the mode goes on inside the modules seen calling
        # a functional activation, as in eager, and off again at their end (in the same graph).
        enter = (
            not (state["mode"] or self.mode_entered or any(state["entered"]))
            and self.mode is not None
            and hook.calls_fn
        )
        if enter:
            self.mode.__enter__()
        state["entered"].append(enter)

    def traced_leave(self, hook: ProbeHook, module: nn.Module, args: Any, output: Any) -> None:
        state = self.traced_state()
        stack = state["stack"]
        if stack:  # no check that it is this module's: comparing would guard on which one
            stack.pop()
            if state["entered"].pop():
                self.mode.__exit__(None, None, None)
        entry = hook.entry
        if entry is not None:
            outputs = float_tensors(output)
            if entry.kind is None and entry.grad_hook is not None:
                for t in outputs:
                    if t.requires_grad:
                        t.register_hook(entry.grad_hook)
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if getattr(module, "inplace", False) is True:
                inp = None
            measured = self.traced_counts(state, entry.kind, inp, outputs, entry.act_params)
            if entry.logits and outputs:  # the output head: its log Z, in the graph too
                state["busy"] = True
                rows = {**measured.rows, **log_z_measured(outputs[0])}
                state["busy"] = False
                measured = Measured(measured.counts, measured.numel, rows)
            hook.events.append(Call(self.next_seq(), measured))
        if isinstance(module, CHANNELS_FIRST):
            state["channels_first"] = True
        elif entry is not None and entry.kind is None:
            state["channels_first"] = False

    def traced_functional(
        self, kind: str, func: Callable, args: tuple, kwargs: dict, out: Any
    ) -> None:
        state = self.traced_state()
        if state["busy"]:  # our own reductions below
            return
        # a compiled part whose own hooks ran eagerly (see compiling._skip_hook_frames): its caller is on
        # the eager stack
        caller = self.caller(state["stack"] or self.stack)
        if caller.fn_skip:
            return
        fname = FUNCTION_NAMES[func]
        k = self.fn_index(caller, fname)
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if kwargs.get("inplace") is True:
            inp = None
        params = fn_params(kind, args, kwargs)
        measured = self.traced_counts(state, kind, inp, float_tensors(out), params)
        caller.events.append(FunctionCall(self.next_seq(), fname, k, kind, params, measured))

    def traced_attention(self, how: str, args: tuple, kwargs: dict) -> None:
        state = self.traced_state()
        if state["busy"] or how == MHA:  # our own softmaxes; MHA's arguments are not traced
            return
        caller = self.caller(state["stack"] or self.stack)
        state["busy"] = True
        rows = attention_measured(caller, how, args, kwargs)
        state["busy"] = False
        if rows is not None:
            k = self.fn_index(caller, "attention")
            measured = Measured(None, 0, rows)
            caller.events.append(FunctionCall(self.next_seq(), "attention", k, None, {}, measured))

    def traced_counts(
        self,
        state: dict[str, Any],
        kind: str | None,
        inp: torch.Tensor | None,
        outputs: list[torch.Tensor],
        params: dict[str, float],
    ) -> Measured:
        """An activation's per-unit flat counts (a graph output), its element count, and the
        rows of the other statistics it adds (all of them: choosing the steps that keep them
        in the graph would compile it twice; the fold keeps those the step wants)."""
        if kind is None or not outputs:
            return NOTHING
        y = outputs[0]
        inp = None if inp is y else inp
        state["busy"] = True
        flat = stats.flat_mask(kind, y, inp, self.saturation_eps, **params)
        rows = activation_rows(kind, y, inp, params, wanted(kind, True))
        state["busy"] = False
        if flat is None or not flat.numel():
            return Measured(None, 0, rows)
        axis = stats.unit_axis(flat.dim(), state["channels_first"])
        return Measured(stats.flat_counts(flat, axis), flat.numel(), rows)

    def fold_traced(self) -> None:
        """Into the entries: what traced forwards saw since the last logging step (at the end of
        a forward)."""
        for row, numel in self.traced_inputs:
            self.add_input(row, numel)
        if self.seq["n"] or self.seq_used:  # all hooks: some may sit outside a folded subtree
            self.fold_events(self.event_hooks)
        self.seq_used = False
        self.forwards += len(self.traced_forwards)
        self.traced_inputs.clear()
        self.traced_forwards.clear()
        if self.traced_now.get("mode") and mode_on_top(self.mode):  # a forward that raised
            self.mode.__exit__(None, None, None)
        self.traced_now.clear()

    def fold_events(self, hooks: list[ProbeHook], done: bool = True) -> None:
        """Into the entries, in the order traced code saw them: the events ``hooks`` hold.
        ``done``: their modules' forwards have ended, so their functional call counts restart
        (traced code, which guards on them, finds them empty at every step)."""
        events = []
        for hook in hooks:
            if hook.events:
                events += [(event, hook) for event in hook.events]
                hook.events.clear()
            if done and hook.fn_counts:
                hook.fn_counts.clear()
        self.seq["n"] = 0
        self.seq_used = True
        events.sort(key=lambda pair: pair[0].seq)
        for event, hook in events:
            try:
                self.fold_event(event, hook)
            except Exception as e:  # the layer's (or its functional call's) alone
                named = isinstance(event, FunctionCall)
                self.fail(e, f"{hook.name}:{event.fname}#{event.index}" if named else hook.name)

    def fold_event(self, event: Seen | Call | FunctionCall, hook: ProbeHook) -> None:
        if isinstance(event, Seen):
            if hook.entry.order is None:
                self.place(hook.entry)
            return
        if isinstance(event, Call):
            entry = hook.entry
            self.traced_hooked = True
        else:  # hook is the caller's
            name = self.fn_name(hook, event.fname, event.index)
            entry = self.entries.get(name) or self.fn_entry(
                name, event.fname, event.kind, event.params
            )
        measured = event.measured
        entry.calls += 1
        if measured.counts is not None:
            self.unit_counts.add_counts(entry, measured.counts, measured.numel)
        if measured.rows and entry.kind is None:  # an attention call: every row it made
            for name, row in measured.rows.items():
                entry.add(STATISTICS[name], row)
        elif measured.rows:
            for statistic in wanted(entry.kind, self.derivatives):
                if statistic.name in measured.rows:
                    entry.add(statistic, measured.rows[statistic.name])

    # -- reading ---------------------------------------------------------------------------------

    def take_traced_signal(
        self, entries: list[Entry], out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Add what traced hooks accumulated to ``out`` (per entry, its SIGNAL row)."""
        owned = [(i, e.signal_acc) for i, e in enumerate(entries) if e.signal_acc is not None]
        if owned:
            if out is None:
                rows, width = len(entries), len(SIGNAL.parts)
                out = torch.zeros(rows, width, dtype=torch.float64, device=owned[0][1].device)
            rows = torch.stack([acc.to(out.device, torch.float64) for _, acc in owned])
            owner = torch.tensor([i for i, _ in owned], dtype=torch.int64)
            out.index_add_(0, owner.to(out.device, non_blocking=True), rows)
        accs = [e.signal_acc for e in self.module_entries.values() if e.signal_acc is not None]
        if accs:
            torch._foreach_zero_(accs)
        self.traced_hooked = False
        self.prepare_traced()
        return out
