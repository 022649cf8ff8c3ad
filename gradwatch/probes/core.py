"""The :class:`Probes`: every hook on one model, the entries they fill, and the eager bookkeeping
of a measured forward (which module is running, which functional activation belongs to which)."""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..measure import stats
from ..measure.statistics import STATISTICS
from .batched import Deferred, deferred_tensor
from .buffers import Entry, SignalNorms, UnitCounts
from .compat import add_grad_hook, in_backward, mode_on_top
from .compiling import LIVE, compiles_watched
from .hooks import (
    ComputedHook,
    FunctionalMode,
    GradHook,
    PostHook,
    PreHook,
    ProbeHook,
    RootPostHook,
    RootPreHook,
)
from .kinds import (
    CHANNELS_FIRST,
    FUNCTION_NAMES,
    activation_kind,
    batch_size,
    float_tensors,
    fn_params,
    param_values,
    shared_output,
    weight_fan_in,
    weight_fan_out,
)
from .naming import Naming
from .placements import Placements, is_dtensor, local
from .reading import Reading
from .rows import activation_rows, wanted
from .softmaxes import heads_of, is_attention, output_head, record_attention, record_log_z
from .through_time import add_state_derivative, hook_sequence, time_axis
from .traced import TracedForwards

# What Probes.failed calls the input-scale statistic when measuring it failed.
INPUTS = "(model input)"
# Every this many measured forwards the functional mode watches every module again, to find
# functional activations that moved (a call behind a branch taken only later).
SURVEY_EVERY = 10
# model -> the live Probes attached to it: a second watcher on one model is an error, not double
# hooks. Weak on both sides: a dropped watcher or model leaves nothing behind.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class Probes(TracedForwards, Reading, Naming):
    """Owns every hook on one model and the per-entry accumulators they fill.

    Args:
        model: the (unwrapped) model.
        saturation_eps: relative derivative below which an activation counts as flat.
        include, exclude: glob patterns on module names; functional entries follow their caller.
        through_time: glob pattern on module names -> the time axis of that module's first input
            (torch's recurrent modules are measured through time without being named).
        logits_layer: the module whose outputs are the model's logits (log Z is measured there):
            its name, "auto" (found if it can be) or None.
    """

    def __init__(
        self,
        model: nn.Module,
        saturation_eps: float = 1e-2,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        through_time: dict[str, int] | None = None,
        logits_layer: str | None = "auto",
    ) -> None:
        self.armed = False
        self.logits_layer = logits_layer  # the output head's name, "auto" or None (none)
        self.recording = False  # inside a forward that is being measured
        # The caller marks where a forward begins and ends (Lightning: a training step may call
        # submodules without ever calling the root module).
        self.external_forward = False
        self.saturation_eps = saturation_eps
        self.derivatives = False  # also measure E[phi'(z)^2] (on steps that read the weights)
        self.include = include
        self.exclude = exclude
        self.through_time = through_time
        self.entries: dict[str, Entry] = {}
        self.module_entries: dict[str, Entry] = {}  # module name -> entry, fixed at attach
        self._next_order = 0
        self.stack: list[ProbeHook] = []  # pre-hooks of the modules being run (eager)
        self.channels_first = False
        self.mode: FunctionalMode | None = None
        self.mode_entered = False
        self._fn_callers: set[str] = set()  # modules seen calling a functional activation
        self._mode_states: list[bool] = []  # the mode's state outside each module entered
        self._survey = True
        self._recorded = 0  # measured forwards since attach
        self.inputs: list[torch.Tensor] = []  # norm, min, max of each input tensor
        self.input_count = 0
        self.index_cache: tuple | None = None
        self.signals = SignalNorms(self.fail)
        self.batch = 1  # the measured forward's batch size
        self.placements = Placements()
        self.deferred = Deferred()  # small activation outputs, counted when the forward ends
        self.unit_counts = UnitCounts()  # per-unit flat counts of the activations
        self.ordered: list[Entry] | None = None
        self.forwards = 0  # measured forward passes since the last take
        # gradwatch's own bookkeeping failed since the last take: the step is dropped
        self.error: Exception | None = None
        # layer name (or INPUTS) -> the first error its hooks raised since the last take
        self.failed: dict[str, Exception] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []  # every hook installed
        # (module, hook, is a pre-hook) of the hooks that come off between distant logging steps
        self._module_hooks: list[tuple[nn.Module, ProbeHook, bool]] = []
        self._module_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.traced = False  # dynamo compiled something since attach: the hooks stay installed
        self.traced_hooked = False  # a traced forward hooked outputs since the last take
        # Traced code's bookkeeping (see "traced forwards" below): lists and dicts only
        self.traced_forwards: list[bool] = []  # one per traced forward measured this step
        self.traced_inputs: list[tuple] = []  # (norm/min/max row, numel) of traced inputs
        self.traced_now: dict[str, Any] = {}  # the measured traced forward's state; empty after
        # Sequence number of the next event traced code records into a hook (see "traced
        # forwards"); events since the last fold when not 0
        self.seq: dict[str, int] = {"n": 0}
        self.seq_used = False  # traced events were folded during this forward
        self.event_hooks: list[ProbeHook] = []  # every module hook, in named_modules() order
        self._pre_hooks: dict[str, ProbeHook] = {}  # module name -> its pre-hook
        # (module, its entry) for every module holding parameters; the entry is None when the
        # module is not watched (its parameters still count in the global norm)
        self._param_modules: list[tuple[nn.Module, Entry | None]] = []
        # every parameter slot as last read, and what refresh_parameters returned for it
        self._param_cache: tuple[list, list[nn.Parameter]] | None = None
        try:
            self._attach(model)
        except BaseException:
            self.remove()  # a failed attach leaves the model as it was
            raise

    # -- attaching -----------------------------------------------------------------------------

    def _selected(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not (self.exclude and any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    def _attach(self, model: nn.Module) -> None:
        other = _ATTACHED.get(model)
        if other is not None and other() is not None and other().handles:
            raise RuntimeError(
                "this model is already watched by another GradWatch (or GradWatchCallback); "
                "close() that one first"
            )
        _ATTACHED[model] = weakref.ref(self)
        names: list[str] = []
        head = output_head(model, self.logits_layer)
        for name, module in model.named_modules():
            if type(module).__name__ == "OptimizedModule":
                continue  # a compiled submodule: its hooks go on the module it wraps
            # ... whose name loses the wrapper's "_orig_mod" (the report reads as if eager)
            name = ".".join(part for part in name.split(".") if part != "_orig_mod")
            names.append(name)
            kind = activation_kind(module)
            own = tuple(module.parameters(recurse=False))
            axis = time_axis(module, name, self.through_time)
            entry = None
            if (own or kind or axis is not None) and self._selected(name):
                entry = Entry(
                    name=name,
                    module_type=type(module).__name__,
                    kind=kind,
                    params=own,
                    module=module,
                    fan_in=weight_fan_in(module),
                    fan_out=weight_fan_out(module),
                    act_params=param_values(module) if kind else {},
                    time_axis=axis,
                )
                self.module_entries[name] = entry
            if module._parameters:
                self._param_modules.append((module, entry if own else None))
            pre, post = PreHook(self, name), PostHook(self, name)
            pre.entry = post.entry = entry
            pre.attention, pre.heads = is_attention(name, module), heads_of(module)
            if entry is not None and name == head:
                entry.logits = True
            # nn.Sigmoid calls torch.sigmoid: counted once, as the module
            pre.fn_skip = kind is not None or not self._selected(name)
            self._pre_hooks.setdefault(name, pre)
            self.event_hooks += (pre, post)
            self._module_hooks.append((module, pre, True))
            self._module_hooks.append((module, post, False))
            if any(is_dtensor(p) for p in own):  # tensor parallel: see what it computed
                self._module_hooks.append((module, ComputedHook(self, name), False))
                self.placements.active = True
        for i, name in enumerate(names):  # named_modules() is depth first: descendants follow
            end = i + 1
            while end < len(names) and (not name or names[end].startswith(name + ".")):
                end += 1
            self.event_hooks[2 * i + 1].subtree = (2 * i, 2 * end)
        self.handles.append(
            model.register_forward_pre_hook(RootPreHook(self), with_kwargs=True, prepend=True)
        )
        self._module_hooks.append((model, RootPostHook(self), False))  # after the root's own
        self.mode = FunctionalMode(self)
        LIVE.add(self)
        self.install(True)

    def _adopt_styles(self) -> None:
        """DTensor parameters that came after attach (``parallelize_module`` or ``fully_shard``
        called after ``GradWatch(model)``): before the first forward runs, see what each such
        module computes, and put gradwatch's hooks back on after the ones those calls added (a
        parallel style's output hook must run before gradwatch reads the output)."""
        styled = {
            id(m) for m, _ in self._param_modules if any(map(is_dtensor, m._parameters.values()))
        }
        if not styled:
            return
        self.placements.active = True
        for module, hook, pre in list(self._module_hooks):
            if not pre and type(hook) is PostHook and id(module) in styled:
                self._module_hooks.append((module, ComputedHook(self, hook.name), False))
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()
        self.install(True)

    def install(self, on: bool) -> None:
        """Put the per-module hooks on (for logging steps) or take them off (between them).

        Idle hooks still cost ``nn.Module`` its slow call path: about 5 us a module on every
        forward, a tenth of a 1,000-layer MLP's step. Adding and removing them costs about 13 us
        a module, so the caller takes them off only when logging steps are several steps apart.
        Once dynamo has compiled anything in this process they stay (compiled code does not see
        hooks added later), and so they do where torch cannot report compiles.
        """
        if not self.handles:  # removed for good
            return
        # asked at every step: torch._dynamo.reset() drops the callback
        watched = compiles_watched()
        if on:
            if not self._module_handles:
                for module, hook, pre in self._module_hooks:
                    add = module.register_forward_pre_hook if pre else module.register_forward_hook
                    first = {"prepend": True} if type(hook) is ComputedHook else {}  # before TP's
                    self._module_handles.append(add(hook, **first))
            return
        # Off only while dynamo will warn us before it compiles.
        if self.traced or not watched:
            return
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    # -- what the conductor asks (it calls these, it never writes the fields) -------------------

    def arm(self, armed: bool, derivatives: bool) -> None:
        """Whether the hooks work on the coming step, and whether they also measure E[phi'^2]."""
        self.armed = armed
        self.derivatives = armed and derivatives

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The hooks rest inside (a forward that is not the step's: the curvature probe's)."""
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed

    def begin_external_forward(self, module: nn.Module, inputs: Any) -> None:
        """The caller marks forwards from now on (see ``GradWatch.begin_forward``)."""
        self.external_forward = True
        if self.armed:
            self.begin_forward(module, (inputs,), {})

    def compile_started(self) -> None:
        """Dynamo is about to compile (anything, in this process): the hooks go on and stay on,
        and traced code finds its accumulators ready."""
        self.traced = True
        self.install(True)
        self.prepare_traced()

    def remove(self) -> None:
        """Remove every hook and leave the functional mode; safe to call twice."""
        self.exit_mode()
        for h in self.handles + self._module_handles:
            h.remove()
        self.handles.clear()
        self._module_handles.clear()
        self._module_hooks.clear()  # they hold the modules: a closed watcher must not pin them
        self.event_hooks.clear()  # ... nor its layers: the hooks hold the entries
        self._pre_hooks.clear()
        self._param_modules.clear()
        self._param_cache = self.ordered = None
        self.stack.clear()
        self.signals.clear()  # what waits holds tensors of the last step
        self.deferred.clear()
        self.entries.clear()  # the entries hold the parameters: a closed watcher lets them go
        self.module_entries.clear()
        self.armed = False

    # -- forward bookkeeping ---------------------------------------------------------------------

    def begin_forward(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        self.exit_mode()  # a previous forward that raised may have left it on
        self.traced_now.clear()  # left by a compiled part of the last forward
        self.recording = torch.is_grad_enabled() and module.training and not in_backward()
        if not self.recording:
            return
        self.forwards += 1
        self.stack.clear()
        self._mode_states.clear()
        self.channels_first = False
        # The functional mode costs a Python call per torch op. It runs everywhere on a survey
        # forward; on the others only inside the modules seen calling a functional activation.
        self._survey = self._recorded % SURVEY_EVERY == 0
        if not self._recorded and not self.placements.active:
            self._adopt_styles()
        self._recorded += 1
        one = args[0] if len(args) == 1 and not kwargs else None  # model(x): no pytree walk
        self.batch = batch_size(args, kwargs)
        try:
            inputs = float_tensors(one if isinstance(one, torch.Tensor) else (args, kwargs))
            self.placements.model_inputs(inputs)
            for t in inputs:
                if t.numel():
                    self.add_input(stats.norm_min_max(t), t.numel())
        except Exception as e:
            self.fail(e, INPUTS)
        self.set_mode(self._survey or "" in self._fn_callers)

    def add_input(self, row: torch.Tensor, numel: int) -> None:
        if self.inputs and self.inputs[0].device != row.device:
            row = row.to(self.inputs[0].device)  # inputs on several devices
        self.inputs.append(row)
        self.input_count += numel

    def fail(self, error: Exception, layer: str | None = None) -> None:
        """A hook raised. In ``layer``'s measurement (or INPUTS'): that layer's statistics from
        hooks are left out of this step, the other layers' are kept. In gradwatch's own
        bookkeeping (``layer`` None): nothing more is measured until the boundary, which drops
        the step."""
        if layer is not None:
            self.failed.setdefault(layer, error)
            return
        if self.error is None:
            self.error = error
        self.recording = False

    def take_failed(self) -> dict[str, Exception]:
        """The layers whose measurement failed since the last call, and start over."""
        failed, self.failed = self.failed, {}
        return failed

    def end_forward(self) -> None:
        """A forward ended (also called at the boundary, before reading)."""
        self.exit_mode()
        self.recording = False
        if self.deferred.items:
            self.deferred.count(self)
        if (
            self.traced_inputs
            or self.traced_forwards
            or self.traced_now
            or self.seq_used
            or self.seq["n"]
        ):
            self.fold_traced()

    def exit_mode(self) -> None:
        self.set_mode(False)
        self.placements.clear()  # the outputs it knows: kept no longer than the forward

    def set_mode(self, on: bool) -> None:
        if on != self.mode_entered and self.mode is not None:
            self.mode_entered = on
            if on:
                self.mode.__enter__()
            else:
                self.mode.__exit__(None, None, None)

    def _toggle_mode(self, on: bool) -> None:
        """Switch the mode at a module boundary, unless another mode entered inside a forward sits
        above ours: popping would remove that one. Ours then stays on (only slower)."""
        if not on and self.mode_entered and not mode_on_top(self.mode):
            return
        self.set_mode(on)

    def enter(self, hook: ProbeHook, args: tuple = ()) -> tuple | None:
        """A module's forward begins: the arguments to call it with instead, or None."""
        if self.seq["n"]:  # a compiled part ran before this module: its layers come first
            self.fold_events(self.event_hooks, done=False)
        entry = hook.entry
        new_args = None
        if entry is not None:
            if entry.order is None:
                self.place(entry)
            if entry.time_axis is not None:
                try:
                    new_args = hook_sequence(self, entry, args)
                except Exception as e:
                    self.fail(e, entry.name)
        if not (self._survey or self._fn_callers):
            return new_args  # the functional mode stays off for this whole forward
        self.stack.append(hook)
        hook.fn_counts.clear()  # call indices restart with each forward of the module
        if not self._survey:
            self._mode_states.append(self.mode_entered)
            self._toggle_mode(hook.calls_fn)
        return new_args

    def leave(self, hook: ProbeHook, module: nn.Module, args: Any, output: Any) -> None:
        if self.seq["n"]:  # its forward (or part of it) was compiled: what its children saw
            lo, hi = hook.subtree
            self.fold_events(self.event_hooks[lo:hi])
        if self.stack and self.stack[-1].name == hook.name:
            self.stack.pop()
        if not self._survey and self._mode_states:
            self._toggle_mode(self._mode_states.pop())
        entry = hook.entry
        if entry is not None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self._measure(entry, inp, output)
            if entry.time_axis is not None:
                add_state_derivative(entry, module, output)
        if isinstance(module, CHANNELS_FIRST):
            self.channels_first = True
        elif entry is not None and entry.kind is None:
            self.channels_first = False

    def recomputed(self, name: str, output: Any) -> None:
        """A forward re-run inside backward by activation checkpointing: statistics were counted
        in the first run, but with reentrant checkpointing only the re-run's outputs receive a
        gradient, so it carries the signal hooks (with non-reentrant ones they never fire)."""
        entry = self.module_entries.get(name)
        if entry is not None:
            self._hook_outputs(entry, float_tensors(output))

    def functional(self, kind: str, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        caller = self.caller(self.stack)
        if caller.fn_skip:
            return
        fname = FUNCTION_NAMES[func]
        name = self.fn_name(caller, fname, self.fn_index(caller, fname))
        entry = self.entries.get(name)
        if entry is None:
            entry = self.fn_entry(name, fname, kind, fn_params(kind, args, kwargs))
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        try:
            self._measure(entry, inp, out)
        except Exception as e:
            self.fail(e, name)

    def attention(self, how: str, args: tuple, kwargs: dict) -> None:
        # under tensor parallelism its heads may be split, its arguments DTensors
        args, kwargs, heads = self.placements.attention(args, kwargs, self.caller(self.stack))
        record_attention(self, how, args, kwargs, heads)

    def place(self, entry: Entry) -> None:
        entry.order = self._next_order
        self._next_order += 1
        self.entries[entry.name] = entry
        self.ordered = None

    def _measure(self, entry: Entry, inp: torch.Tensor | None, output: Any) -> None:
        entry.calls += 1
        outputs = float_tensors(output)
        self._hook_outputs(entry, outputs)  # a DTensor's gradient is made local in add_signal
        if self.placements.active and outputs and self.placements.seen(outputs[0]):
            outputs, inp, entry.piece = self.placements.observe(entry.module, inp, outputs)
        if entry.logits and outputs and not (entry.piece and entry.piece.block(-1, outputs[0])):
            record_log_z(entry, outputs[0])  # not of logits split over the vocabulary
        if entry.kind is None or not outputs:
            return
        y = outputs[0]
        axis = stats.unit_axis(y.dim(), self.channels_first)
        entry.unit_block = entry.piece.block(axis, y) if entry.piece is not None else None
        entry.one_per_unit = stats.one_per_unit(y.shape, axis)
        extra = wanted(entry.kind, self.derivatives)  # other statistics of this call
        waits = deferred_tensor(entry, y, inp, bool(extra))
        if waits is not None:  # counted with its likes at the forward's end
            self.deferred.add(entry, waits, axis)
            return
        if inp is not None and (inp is y or inp.data_ptr() == y.data_ptr()):
            inp = None  # in-place: the input is gone
        # flat_mask works on detached tensors: no autograd bookkeeping, no no_grad() context.
        flat = stats.flat_mask(entry.kind, y, inp, self.saturation_eps, **entry.act_params)
        if flat is not None and flat.numel():
            self.unit_counts.add(entry, flat, stats.unit_axis(flat.dim(), self.channels_first))
        if extra:
            for name, row in activation_rows(entry.kind, y, inp, entry.act_params, extra).items():
                entry.add(STATISTICS[name], row)

    def add_signal(self, entry: Entry, grad: torch.Tensor) -> None:
        """Backward hook work: the gradient's norm into the signal slots."""
        self.signals.add(entry, local(grad) if self.placements.active else grad)

    def _hook_outputs(self, entry: Entry, outputs: list[torch.Tensor]) -> None:
        # Only parameterised layers carry the backward signal: the rules read it there, and an
        # activation's is its neighbours' times its derivative, which saturation and dead units
        # already measure. A tensor hook per output is most of what a deep net's logging step
        # costs in hooks (its node wrapper and hook dict live until backward).
        if entry.kind is not None:
            return
        entry.shared = self.batch > 1 and bool(outputs) and shared_output(outputs[0])
        for t in outputs:
            if t.requires_grad:
                if entry.grad_hook is None:
                    entry.grad_hook = GradHook(entry, self)
                add_grad_hook(t, entry.grad_hook)
