"""Hooks on the model and the handles that remove them.

A plain boolean ``armed`` switches the hooks' work on for logging steps. Between logging steps
that are several steps apart the per-module hooks come off (:meth:`Probes.install`): idle, they
still cost ``nn.Module`` its slow call path. Once dynamo starts compiling anything in the process,
every hook goes back on and stays (compiled code does not see hooks added later).

Every hook reduces what it sees at once, in one to three tensor ops, writing the result into a
growing buffer on the model's device (:class:`Slots`); sizes and counts are Python integers. No
activation or gradient tensor is kept, and nothing is copied to the host before the optimizer
boundary.

Hook objects hold only a weak reference to the :class:`Probes`: a deep copy of the model (an EMA
copy) gets inert hooks, and ``torch.save(model)`` pickles them as inert hooks too.
"""

from __future__ import annotations

import fnmatch
import logging
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import stats

log = logging.getLogger("gradwatch")

# Positions in Taken.input, as stats.sumsq_count_absmax lays it out.
IN_SUMSQ, IN_COUNT, IN_ABSMAX = range(3)
# What Probes.failed calls the input-scale statistic when measuring it failed.
INPUTS = "(model input)"

_MODULE_KINDS: list[tuple[type, str]] = [  # order matters: ReLU6 is a Hardtanh
    (nn.ReLU6, "relu6"),
    (nn.Hardtanh, "hardtanh"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Softsign, "softsign"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.ELU, "elu"),
    (nn.CELU, "celu"),
    (nn.SELU, "selu"),
    (nn.Softplus, "softplus"),
]
_MODULE_PARAMS = ("negative_slope", "alpha", "beta", "min_val", "max_val")

FUNCTION_KINDS: dict[Callable, str] = {}
for _kind, _fns in {
    "sigmoid": ("sigmoid", "sigmoid_"),
    "tanh": ("tanh", "tanh_"),
    "relu": ("relu", "relu_"),
}.items():
    for _fname in _fns:
        for _owner in (torch, torch.Tensor):
            if hasattr(_owner, _fname):
                FUNCTION_KINDS[getattr(_owner, _fname)] = _kind
FUNCTION_KINDS.update(
    {
        torch.special.expit: "sigmoid",
        F.relu: "relu",
        F.relu6: "relu6",
        F.leaky_relu: "leaky_relu",
        F.gelu: "gelu",
        F.silu: "silu",
        F.elu: "elu",
        F.celu: "celu",
        F.selu: "selu",
        F.softplus: "softplus",
        F.hardtanh: "hardtanh",
        F.softsign: "softsign",
        F.hardsigmoid: "hardsigmoid",
    }
)
# The name each function's entries take (``torch.relu_`` -> "relu"); looked up, not computed from
# ``__name__``, which traced code cannot read.
FUNCTION_NAMES: dict[Callable, str] = {
    f: {"special_expit": "sigmoid"}.get(n, n)
    for f in FUNCTION_KINDS
    for n in [getattr(f, "__name__", FUNCTION_KINDS[f]).rstrip("_")]
}
# Positional parameters after the input, as in torch.nn.functional's signatures.
_FUNCTION_PARAMS = {
    "leaky_relu": ("negative_slope",),
    "elu": ("alpha",),
    "celu": ("alpha",),
    "softplus": ("beta",),
    "hardtanh": ("min_val", "max_val"),
}
# Outputs of these are laid out (N, C, ...): a following activation's units are channels.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)
# Every this many measured forwards the functional mode watches every module again, to find
# functional activations that moved (a call behind a branch taken only later).
SURVEY_EVERY = 10
_MAX_VIEWS = 1 << 14  # views a Slots keeps for reuse
# model -> the live Probes attached to it: a second watcher on one model is an error, not double
# hooks. Weak on both sides: a dropped watcher or model leaves nothing behind.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


# Every live Probes, for the compile callback below.
_LIVE: weakref.WeakSet[Probes] = weakref.WeakSet()


def _on_compile_start(*args: Any) -> None:
    # Compiled code keeps the hooks it was traced with, and a module compiled while they are off
    # would not see them come back (dynamo does not guard on a submodule's hooks): before dynamo
    # compiles anything in this process, every watcher's hooks go on, and stay on.
    for probes in list(_LIVE):
        probes.traced = True
        probes.install(True)
        probes.prepare_traced()


def compiles_watched() -> bool:
    """Whether dynamo will call :func:`_on_compile_start` before it next compiles: registered on
    first use and again after ``torch._dynamo.reset()``, which drops every callback. False when
    this torch has no compile callbacks; the hooks then never come off."""
    try:
        import torch._dynamo  # attaching the hooks has imported it already (measured): free

        handler = torch._dynamo.callback_handler
        if _on_compile_start not in handler.start_callbacks:
            handler.register_start_callback(_on_compile_start)
            _skip_hook_frames()
        return True
    except (ImportError, AttributeError):
        return False


def _skip_hook_frames() -> None:
    """Tell dynamo never to compile a hook as a frame of its own, nor anything it calls.

    Inside a traced module call the hooks are inlined into its graph, which this does not change.
    But a module called from code that dynamo runs eagerly (around a graph break, such as the
    logger call in Hugging Face GPT-2's loss path; the root of a compiled user-defined model) runs
    its hooks outside any graph, and dynamo used to compile each of them on its own: guarded on
    gradwatch's changing state, they recompiled until dynamo's limit, with a warning, and the
    modules after that were not measured at all (calls 0, no signal). Skipped, those hooks take
    the eager path, as the modules around them do. Private API: without it, nothing changes."""
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy

        skip = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)
        for hook in (_PreHook, _PostHook, _RootPreHook, _RootPostHook):
            set_code_exec_strategy(hook.__call__.__code__, skip)
        set_code_exec_strategy(_FunctionalMode.__torch_function__.__code__, skip)
    except Exception:  # another torch's private API must never stop an attach
        log.debug("dynamo frame strategies unavailable", exc_info=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / ``torch.compile`` wrappers, whose names gradwatch strips."""
    while True:
        inner = None
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(model, "module", None)
        elif type(model).__name__ == "OptimizedModule":
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def activation_kind(module: nn.Module) -> str | None:
    """The activation kind of a module, or None when it is not an activation."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    # Foreign activation classes (e.g. Hugging Face's GELUActivation): by name, parameter-free only.
    name = type(module).__name__.lower()
    if any(True for _ in module.parameters(recurse=False)):
        return None
    if "gelu" in name:
        return "gelu"
    if "silu" in name or "swish" in name:
        return "silu"
    return None


def _param_values(module: nn.Module) -> dict[str, float]:
    return {
        k: float(v)
        for k in _MODULE_PARAMS
        if isinstance(v := getattr(module, k, None), (int, float))
    }


def _weight_fan_in(module: nn.Module) -> int | None:
    """fan_in of a Linear or (non-transposed) convolution weight, None for other layers."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    if isinstance(module, nn.Linear) or (
        isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
    ):
        return w[0].numel()
    return None


def _float_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):  # the common case, and no pytree walk for dynamo to trace
        return [obj] if obj.is_floating_point() else []
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _fn_params(kind: str, args: tuple, kwargs: dict) -> dict[str, float]:
    """The constants of a functional activation call (``F.leaky_relu(x, 0.2)``)."""
    params = dict(zip(_FUNCTION_PARAMS.get(kind, ()), args[1:]))
    params.update({k: v for k, v in kwargs.items() if k in _MODULE_PARAMS})
    return {k: float(v) for k, v in params.items() if isinstance(v, (int, float))}


def _mode_on_top(mode: TorchFunctionMode) -> bool:
    try:
        depth = torch._C._len_torch_function_stack()
        return depth > 0 and torch._C._get_function_stack_at(depth - 1) is mode
    except AttributeError:  # private API gone: never pop at a module boundary
        return False


def _in_backward() -> bool:
    # Non-reentrant activation checkpointing re-runs forward hooks inside backward. Traced code
    # gets False: the call is opaque to dynamo and would break the graph at every module.
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _add_grad_hook(t: torch.Tensor, hook: _GradHook) -> None:
    """``t.register_hook(hook)`` without the handle we never use: the same two steps
    ``Tensor.register_hook`` takes, minus its import, its handle and the handle's weak reference
    (about 4 of the ~9 ms a 1,000-layer MLP's logging forward spent on tensor hooks, and objects
    for the garbage collector). Subclasses and traced code take the public path; so does a torch
    whose internals moved."""
    if type(t) is torch.Tensor and not torch.compiler.is_compiling():
        try:
            hooks = t._backward_hooks
            if hooks is None:
                # an OrderedDict, as register_hook makes: later handles keep a weakref to it
                hooks = t._backward_hooks = OrderedDict()  # the setter installs the pre-hook
                if t.grad_fn is not None:
                    t.grad_fn._register_hook_dict(t)
            hooks[hook] = hook  # after any user hook already there, as with register_hook
            return
        except AttributeError:
            pass
    t.register_hook(hook)


class Slots:
    """A growing fp32 buffer on the device that hooks write their reductions into (``out=``).

    Results stay on the device until the boundary's single copy, and no Python object per result
    outlives its hook: thousands of small tensors alive until the logging step ends made the
    garbage collector's full passes a fifth of a 1,000-layer model's logging step. The views
    handed out are kept: the same offsets come back step after step, and slicing a tensor costs
    more in Python than the reduction written into it.
    """

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.used = 0
        self._views: dict[tuple[int, int], torch.Tensor] = {}  # (start, size or 0) -> view

    def claim(
        self, size: int, device: torch.device, scalar: bool = False
    ) -> tuple[int, torch.Tensor | None]:
        """Reserve ``size`` slots: their offset into :attr:`buf`, and the slots themselves to
        write into with ``out=`` (a 0-dim view for one ``scalar`` slot), or None when the buffer
        is on another device (then :meth:`write` the value)."""
        start, end = self.used, self.used + size
        buf = self.buf
        if buf is None or buf.device != device and start == 0:
            self._resize(max(64, 2 * end), device)
        elif end > buf.numel():
            self._resize(2 * end, buf.device)
            self.buf[:start].copy_(buf[:start])
        self.used = end
        if self.buf.device != device:
            return start, None
        key = (start, 0 if scalar else size)
        out = self._views.get(key)
        if out is None:
            if len(self._views) >= _MAX_VIEWS:  # offsets that keep moving: start again
                self._views.clear()
            out = self._views[key] = self.buf[start] if scalar else self.buf[start:end]
        return start, out

    def _resize(self, capacity: int, device: torch.device) -> None:
        self.buf = torch.empty(capacity, dtype=torch.float32, device=device)
        self._views = {}  # views of the old buffer

    def write(self, start: int, value: torch.Tensor) -> None:
        """Copy ``value`` into slots reserved on another device than the buffer's."""
        self.buf[start : start + value.numel()].copy_(value.reshape(-1))

    def take(self) -> torch.Tensor | None:
        """What was written since the last take (valid until the next write), then start over."""
        if not self.used:
            return None
        used, self.used = self.used, 0
        return self.buf[:used]


@dataclass(eq=False)
class Entry:
    """One row of the report: a module with parameters, an activation module or a functional call.

    Between two logging steps it counts what its hooks saw in Python integers; the reductions
    themselves sit in the probes' :class:`Slots`.
    """

    name: str
    module_type: str
    kind: str | None = None  # activation kind
    params: tuple[nn.Parameter, ...] = ()
    module: nn.Module | None = None  # None for functional activations
    fan_in: int | None = None
    act_params: dict[str, float] = field(default_factory=dict)
    order: int | None = None  # first-forward execution position
    calls: int = 0
    signals: int = 0  # output gradients seen
    signal_count: int = 0  # elements those gradients had
    elems: int = 0  # activation elements seen
    # unit count -> [offset of its per-unit flat counts in the count slots, elements per unit]:
    # a call with another unit count (a shared activation at two widths) gets its own segment.
    # Rows 0: not seen since the last reset (the lists are reused: fewer objects for the GC).
    segments: dict[int, list[int]] = field(default_factory=dict)
    grad_hook: _GradHook | None = None  # one tensor hook object for all of this entry's outputs
    # [sum of squared norms, elements] of the output gradients that traced (compiled) code saw:
    # a traced backward hook may only add in place into a tensor made before tracing
    signal_acc: torch.Tensor | None = None

    @property
    def seen(self) -> bool:
        return bool(self.calls or self.signals)

    def reset(self) -> None:
        self.calls = self.signals = self.signal_count = self.elems = 0
        for segment in self.segments.values():
            segment[1] = 0


@dataclass
class Taken:
    """What every entry gathered since the last logging step, flattened for one copy to the host.

    Device tensors: ``signal`` (every output gradient's norm, in the order they came),
    ``counts`` (every segment's per-unit flat counts) with ``rows`` (each unit's element count)
    and ``owner`` (each unit's entry index), and ``input`` (sum of squares, count, absmax of the
    model's inputs). Python lists: the rest, indexed like ``entries``.
    """

    entries: list[Entry]
    calls: list[int]
    signal: torch.Tensor | None
    signal_owner: list[int]
    signal_count: list[int]
    elems: list[int]
    units: list[int]
    counts: torch.Tensor | None
    rows: torch.Tensor | None
    owner: torch.Tensor | None
    input: torch.Tensor | None
    unit_owners: tuple[tuple[int, int], ...]  # (entry index, units) of each segment of counts
    traced_signal: torch.Tensor | None = None  # (k, 2) fp64: what compiled code saw, as signal_acc
    traced_owner: list[int] = field(default_factory=list)  # the entry index of each row

    def layout(self) -> tuple:
        """Which entries, signals and unit counts: ranks can only sum equal layouts. Shapes only:
        ranks may see different batch sizes (rows) and still sum. Built only when asked (under
        ``torch.distributed``): a deep net's names are thousands."""
        out = (tuple(e.name for e in self.entries), tuple(self.signal_owner), self.unit_owners)
        return out + (tuple(self.traced_owner),) if self.traced_owner else out


class _GradHook:
    """Tensor hook on an entry's outputs: the norm of each incoming gradient."""

    __slots__ = ("entry", "_ref")

    def __init__(self, entry: Entry, probes: Probes) -> None:
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
                acc.add_(stats.signal_sumsq_count(grad, acc.dtype).to(acc.device))
        elif probes is not None:
            try:
                probes.add_signal(self.entry, grad)
            except Exception as e:  # never break the user's backward
                probes.fail(e, self.entry.name)


class _ProbeHook:
    """Base of the module hooks: a weak reference to the Probes, inert after a copy or unpickle.

    Traced code reaches a module's own data through its hook, never through its name: dynamo
    guards on every name or list length that traced code reads, so a block compiled on its own
    (after a graph break) would compile again for every block of the model.
    """

    def __init__(self, probes: Probes | None, name: str = "") -> None:
        self._ref = weakref.ref(probes) if probes is not None else None
        self.name = name
        self.entry: Entry | None = None  # the module's entry; None when it is not watched
        self.events: list[tuple] = []  # what traced code saw here since the last fold
        self.fn_counts: dict[str, int] = {}  # functional calls so far in this forward (pre-hook)
        self.calls_fn = False  # the module was seen calling a functional activation
        self.fn_skip = False  # its functional calls are not measured (see Probes._attach)
        self.subtree = (0, 0)  # its own and its descendants' hooks in Probes._event_hooks

    def probes(self) -> Probes | None:
        p = self._ref() if self._ref is not None else None
        return p if p is not None and p.armed else None

    def __deepcopy__(self, memo: dict) -> _ProbeHook:
        return type(self)(None, self.name)

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(None, state["name"])


# Every hook body (these, _GradHook above, _FunctionalMode below) is guarded: an error inside
# gradwatch never reaches the user's step. An error in one layer's hook leaves that layer's
# statistics out of the step's report, the others are kept (Probes.fail); the boundary names the
# layer in a warning, once.


class _PreHook(_ProbeHook):
    def __call__(self, module: nn.Module, args: Any) -> None:
        if (p := self.probes()) is not None and p.traced and torch.compiler.is_compiling():
            if p.traced_recording():
                p.traced_enter(self)
        elif p is not None and p.recording:
            try:
                p.enter(self)
            except Exception as e:
                p.fail(e, self.name)


class _PostHook(_ProbeHook):
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
            elif p.forwards and _in_backward() and torch.is_grad_enabled():
                try:
                    p.recomputed(self.name, output)
                except Exception as e:
                    p.fail(e, self.name)


class _RootPreHook(_ProbeHook):
    def __call__(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if (p := self.probes()) is not None and not p.external_forward:
            if p.tracing():
                p.traced_begin(module, args, kwargs)
                return
            try:
                p.begin_forward(module, args, kwargs)
            except Exception as e:
                p.fail(e)


class _RootPostHook(_ProbeHook):
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (p := self.probes()) is not None and not p.external_forward:
            if p.tracing():
                p.traced_end()
                return
            try:
                p.end_forward()
            except Exception as e:
                p.fail(e)


class _FunctionalMode(TorchFunctionMode):
    """Sees functional activations (``torch.sigmoid``, ``F.relu``...) during a logged forward."""

    def __init__(self, probes: Probes) -> None:
        super().__init__()
        self._ref = weakref.ref(probes)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
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


class Probes:
    """Owns every hook on one model and the per-entry accumulators they fill.

    Args:
        model: the (unwrapped) model.
        saturation_eps: relative derivative below which an activation counts as flat.
        include, exclude: glob patterns on module names; functional entries follow their caller.
    """

    def __init__(
        self,
        model: nn.Module,
        saturation_eps: float = 1e-2,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        self.armed = False
        self.recording = False  # inside a forward that is being measured
        # The caller marks where a forward begins and ends (Lightning: a training step may call
        # submodules without ever calling the root module).
        self.external_forward = False
        self.saturation_eps = saturation_eps
        self.include = include
        self.exclude = exclude
        self.entries: dict[str, Entry] = {}
        self.module_entries: dict[str, Entry] = {}  # module name -> entry, fixed at attach
        self._next_order = 0
        self._stack: list[_ProbeHook] = []  # pre-hooks of the modules being run (eager)
        self._channels_first = False
        self._mode: _FunctionalMode | None = None
        self._mode_entered = False
        self._fn_callers: set[str] = set()  # modules seen calling a functional activation
        self._mode_states: list[bool] = []  # the mode's state outside each module entered
        self._survey = True
        self._recorded = 0  # measured forwards since attach
        self._inputs: list[torch.Tensor] = []  # norm, min, max of each input tensor
        self._input_count = 0
        self._index_cache: tuple | None = None
        self.signal_slots = Slots()
        self.count_slots = Slots()
        self._signal_entries: list[Entry] = []  # the entry of each signal slot
        self._signal_lock = threading.Lock()
        self._ordered: list[Entry] | None = None
        self.forwards = 0  # measured forward passes since the last take
        # gradwatch's own bookkeeping failed since the last take: the step is dropped
        self.error: Exception | None = None
        # layer name (or INPUTS) -> the first error its hooks raised since the last take
        self.failed: dict[str, Exception] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []  # every hook installed
        # (module, hook, is a pre-hook) of the hooks that come off between distant logging steps
        self._module_hooks: list[tuple[nn.Module, _ProbeHook, bool]] = []
        self._module_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.traced = False  # dynamo compiled something since attach: the hooks stay installed
        self._traced_hooked = False  # a traced forward hooked outputs since the last take
        # Traced code's bookkeeping (see "traced forwards" below): lists and dicts only
        self._traced_forwards: list[bool] = []  # one per traced forward measured this step
        self._traced_inputs: list[tuple] = []  # (norm/min/max row, numel) of traced inputs
        self._traced_now: dict[str, Any] = {}  # the measured traced forward's state; empty after
        # Sequence number of the next event traced code records into a hook (see "traced
        # forwards"); events since the last fold when not 0
        self._seq: dict[str, int] = {"n": 0}
        self._seq_used = False  # traced events were folded during this forward
        self._event_hooks: list[_ProbeHook] = []  # every module hook, in named_modules() order
        self._pre_hooks: dict[str, _ProbeHook] = {}  # module name -> its pre-hook
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
        for name, module in model.named_modules():
            if type(module).__name__ == "OptimizedModule":
                continue  # a compiled submodule: its hooks go on the module it wraps
            # ... whose name loses the wrapper's "_orig_mod" (the report reads as if eager)
            name = ".".join(part for part in name.split(".") if part != "_orig_mod")
            names.append(name)
            kind = activation_kind(module)
            own = tuple(module.parameters(recurse=False))
            entry = None
            if (own or kind) and self._selected(name):
                entry = Entry(
                    name=name,
                    module_type=type(module).__name__,
                    kind=kind,
                    params=own,
                    module=module,
                    fan_in=_weight_fan_in(module),
                    act_params=_param_values(module) if kind else {},
                )
                self.module_entries[name] = entry
            if module._parameters:
                self._param_modules.append((module, entry if own else None))
            pre, post = _PreHook(self, name), _PostHook(self, name)
            pre.entry = post.entry = entry
            # nn.Sigmoid calls torch.sigmoid: counted once, as the module
            pre.fn_skip = kind is not None or not self._selected(name)
            self._pre_hooks.setdefault(name, pre)
            self._event_hooks += (pre, post)
            self._module_hooks.append((module, pre, True))
            self._module_hooks.append((module, post, False))
        for i, name in enumerate(names):  # named_modules() is depth first: descendants follow
            end = i + 1
            while end < len(names) and (not name or names[end].startswith(name + ".")):
                end += 1
            self._event_hooks[2 * i + 1].subtree = (2 * i, 2 * end)
        self.handles.append(
            model.register_forward_pre_hook(_RootPreHook(self), with_kwargs=True, prepend=True)
        )
        self._module_hooks.append((model, _RootPostHook(self), False))  # after the root's own
        self._mode = _FunctionalMode(self)
        _LIVE.add(self)
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
                    self._module_handles.append(add(hook))
            return
        # Off only while dynamo will warn us before it compiles.
        if self.traced or not watched:
            return
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

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
                entry.signal_acc = torch.zeros(2, dtype=dtype, device=device)
            if entry.grad_hook is None:
                entry.grad_hook = _GradHook(entry, self)

    def remove(self) -> None:
        """Remove every hook and leave the functional mode; safe to call twice."""
        self._exit_mode()
        for h in self.handles + self._module_handles:
            h.remove()
        self.handles.clear()
        self._module_handles.clear()
        self._module_hooks.clear()  # they hold the modules: a closed watcher must not pin them
        self._event_hooks.clear()  # ... nor its layers: the hooks hold the entries
        self._pre_hooks.clear()
        self._param_modules.clear()
        self._param_cache = self._ordered = None
        self._stack.clear()
        self.armed = False

    # -- forward bookkeeping ---------------------------------------------------------------------

    def begin_forward(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        self._exit_mode()  # a previous forward that raised may have left it on
        self._traced_now.clear()  # left by a compiled part of the last forward
        self.recording = torch.is_grad_enabled() and module.training and not _in_backward()
        if not self.recording:
            return
        self.forwards += 1
        self._stack.clear()
        self._mode_states.clear()
        self._channels_first = False
        # The functional mode costs a Python call per torch op. It runs everywhere on a survey
        # forward; on the others only inside the modules seen calling a functional activation.
        self._survey = self._recorded % SURVEY_EVERY == 0
        self._recorded += 1
        one = args[0] if len(args) == 1 and not kwargs else None  # model(x): no pytree walk
        try:
            inputs = _float_tensors(one if isinstance(one, torch.Tensor) else (args, kwargs))
            for t in inputs:
                if t.numel():
                    self._add_input(stats.norm_min_max(t), t.numel())
        except Exception as e:
            self.fail(e, INPUTS)
        self._set_mode(self._survey or "" in self._fn_callers)

    def _add_input(self, row: torch.Tensor, numel: int) -> None:
        if self._inputs and self._inputs[0].device != row.device:
            row = row.to(self._inputs[0].device)  # inputs on several devices
        self._inputs.append(row)
        self._input_count += numel

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
        self._exit_mode()
        self.recording = False
        if (
            self._traced_inputs
            or self._traced_forwards
            or self._traced_now
            or self._seq_used
            or self._seq["n"]
        ):
            self._fold_traced()

    def _exit_mode(self) -> None:
        self._set_mode(False)

    def _set_mode(self, on: bool) -> None:
        if on != self._mode_entered and self._mode is not None:
            self._mode_entered = on
            if on:
                self._mode.__enter__()
            else:
                self._mode.__exit__(None, None, None)

    def _toggle_mode(self, on: bool) -> None:
        """Switch the mode at a module boundary, unless another mode entered inside a forward sits
        above ours: popping would remove that one. Ours then stays on (only slower)."""
        if not on and self._mode_entered and not _mode_on_top(self._mode):
            return
        self._set_mode(on)

    def enter(self, hook: _ProbeHook) -> None:
        if self._seq["n"]:  # a compiled part ran before this module: its layers come first
            self._fold_events(self._event_hooks, done=False)
        entry = hook.entry
        if entry is not None and entry.order is None:
            self._place(entry)
        if not (self._survey or self._fn_callers):
            return  # the functional mode stays off for this whole forward: no caller to track
        self._stack.append(hook)
        hook.fn_counts.clear()  # call indices restart with each forward of the module
        if not self._survey:
            self._mode_states.append(self._mode_entered)
            self._toggle_mode(hook.calls_fn)

    def leave(self, hook: _ProbeHook, module: nn.Module, args: Any, output: Any) -> None:
        if self._seq["n"]:  # its forward (or part of it) was compiled: what its children saw
            lo, hi = hook.subtree
            self._fold_events(self._event_hooks[lo:hi])
        if self._stack and self._stack[-1].name == hook.name:
            self._stack.pop()
        if not self._survey and self._mode_states:
            self._toggle_mode(self._mode_states.pop())
        entry = hook.entry
        if entry is not None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self._measure(entry, inp, output)
        if isinstance(module, _CHANNELS_FIRST):
            self._channels_first = True
        elif entry is not None and entry.kind is None:
            self._channels_first = False

    def recomputed(self, name: str, output: Any) -> None:
        """A forward re-run inside backward by activation checkpointing: statistics were counted
        in the first run, but with reentrant checkpointing only the re-run's outputs receive a
        gradient, so it carries the signal hooks (with non-reentrant ones they never fire)."""
        entry = self.module_entries.get(name)
        if entry is not None:
            self._hook_outputs(entry, _float_tensors(output))

    def functional(self, kind: str, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        caller = self._caller(self._stack)
        if caller.fn_skip:
            return
        fname = FUNCTION_NAMES[func]
        name = self._fn_name(caller, fname, self._fn_index(caller, fname))
        entry = self.entries.get(name)
        if entry is None:
            entry = self._fn_entry(name, fname, kind, _fn_params(kind, args, kwargs))
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        try:
            self._measure(entry, inp, out)
        except Exception as e:
            self.fail(e, name)

    def _caller(self, stack: list[_ProbeHook]) -> _ProbeHook:
        """The pre-hook of the module that calls a functional activation: the innermost module
        being run, or the model itself."""
        return stack[-1] if stack else self._pre_hooks[""]

    @staticmethod
    def _fn_index(caller: _ProbeHook, fname: str) -> int:
        """This call's index among the caller's calls of ``fname`` in its current forward."""
        k = caller.fn_counts.get(fname, 0)
        caller.fn_counts[fname] = k + 1
        return k

    def _fn_name(self, caller: _ProbeHook, fname: str, k: int) -> str:
        """The entry name of a functional call, marking its caller as one (eager code only)."""
        if not caller.calls_fn:
            caller.calls_fn = True
            self._fn_callers.add(caller.name)
        return f"{caller.name}:{fname}#{k}"

    def _fn_entry(self, name: str, fname: str, kind: str, params: dict[str, float]) -> Entry:
        """A new functional entry, placed."""
        entry = Entry(name=name, module_type=fname, kind=kind, act_params=params)
        self._place(entry)
        return entry

    def _place(self, entry: Entry) -> None:
        entry.order = self._next_order
        self._next_order += 1
        self.entries[entry.name] = entry
        self._ordered = None

    def _measure(self, entry: Entry, inp: torch.Tensor | None, output: Any) -> None:
        entry.calls += 1
        outputs = _float_tensors(output)
        self._hook_outputs(entry, outputs)
        if entry.kind is None or not outputs:
            return
        y = outputs[0]
        if inp is not None and (inp is y or inp.data_ptr() == y.data_ptr()):
            inp = None  # in-place: the input is gone
        # flat_mask works on detached tensors: no autograd bookkeeping, no no_grad() context.
        flat = stats.flat_mask(entry.kind, y, inp, self.saturation_eps, **entry.act_params)
        if flat is not None and flat.numel():
            self._add_activation(entry, flat, stats.unit_axis(flat.dim(), self._channels_first))

    def _add_activation(self, entry: Entry, flat: torch.Tensor, axis: int) -> None:
        units = flat.shape[axis] if flat.dim() else 1
        start, out, fresh = self._segment(entry, units, flat.numel(), flat.device)
        slots = self.count_slots
        if fresh:
            counts = stats.flat_counts(flat, axis, out=out)
            if out is None:
                slots.write(start, counts)
        else:  # a second call of the same shape: add to its counts
            slots.buf[start : start + units].add_(stats.flat_counts(flat, axis).to(slots.buf))

    def _add_counts(self, entry: Entry, counts: torch.Tensor, numel: int) -> None:
        """Per-unit flat counts that traced code reduced, of ``numel`` activation elements."""
        units = counts.numel()
        start, out, fresh = self._segment(entry, units, numel, counts.device)
        slots = self.count_slots
        if fresh and out is not None:
            out.copy_(counts)
        elif fresh:
            slots.write(start, counts)
        else:
            slots.buf[start : start + units].add_(counts.to(slots.buf))

    def _segment(
        self, entry: Entry, units: int, numel: int, device: torch.device
    ) -> tuple[int, torch.Tensor | None, bool]:
        """Count slots for a call of ``entry`` with ``units`` units and ``numel`` elements: their
        offset, the slots to write into (see :meth:`Slots.claim`), and whether they are new this
        step (write the counts) or hold an earlier call's (add to them)."""
        rows = numel // units
        entry.elems += numel
        segment = entry.segments.get(units)
        if segment is None or not segment[1]:
            start, out = self.count_slots.claim(units, device)
            if segment is None:
                entry.segments[units] = [start, rows]
            else:
                segment[0], segment[1] = start, rows
            return start, out, True
        segment[1] += rows
        return segment[0], None, False

    def add_signal(self, entry: Entry, grad: torch.Tensor) -> None:
        """Backward hook work: the gradient's norm into the next signal slot."""
        # Autograd runs one thread per device: a model split over GPUs calls this concurrently.
        with self._signal_lock:
            start, out = self.signal_slots.claim(1, grad.device, scalar=True)
            # the slot is the entry's before the norm is written: if that fails, the slots of
            # the other entries stay where take() expects them
            self._signal_entries.append(entry)
            entry.signals += 1
            entry.signal_count += grad.numel()
            value = stats.norm(grad, out=out)
            if out is None:
                self.signal_slots.write(start, value)

    def _hook_outputs(self, entry: Entry, outputs: list[torch.Tensor]) -> None:
        # Only parameterised layers carry the backward signal: the rules read it there, and an
        # activation's is its neighbours' times its derivative, which saturation and dead units
        # already measure. A tensor hook per output is most of what a deep net's logging step
        # costs in hooks (its node wrapper and hook dict live until backward).
        if entry.kind is not None:
            return
        for t in outputs:
            if t.requires_grad:
                if entry.grad_hook is None:
                    entry.grad_hook = _GradHook(entry, self)
                _add_grad_hook(t, entry.grad_hook)

    def refresh_parameters(self) -> list[nn.Parameter]:
        """Re-read each entry's own parameters from its module's parameter dict (FSDP2's
        ``fully_shard`` replaces them), and return the model's parameters as
        ``model.parameters()`` gives them (each once, in module order): one walk that costs a
        fraction of the generic one. The list is reused while no parameter changes: read it,
        don't modify it."""
        # Almost always nothing changed: one identity check over the flat list of every slot.
        now_all = [p for module, _ in self._param_modules for p in module._parameters.values()]
        cached = self._param_cache
        if (
            cached is not None
            and len(now_all) == len(cached[0])
            and all(map(operator.is_, now_all, cached[0]))
        ):
            return cached[1]
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for module, entry in self._param_modules:
            now = [p for p in module._parameters.values() if p is not None]
            # a new tuple only when one changed: fewer objects for the garbage collector
            if entry is not None and (
                len(now) != len(entry.params) or not all(map(operator.is_, now, entry.params))
            ):
                entry.params = tuple(now)
            for p in now:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        self._param_cache = (now_all, out)
        return out

    # -- traced forwards -------------------------------------------------------------------------
    # Inside torch.compile the hooks are traced into the graph, and dynamo guards on every Python
    # value that traced code reads: a counter read there would compile again at every step. In
    # torch 2.13 it also drops attribute stores made, after a tensor hook was traced, on an object
    # it had seen stored to before (list and dict updates survive). So traced code reads only
    # flags that repeat from one logging step to the next, writes only into lists and dicts (each
    # module's own, through its hook: see _ProbeHook), and leaves the counting to eager code
    # (_fold_events). One traced forward is measured per logging step: a second one (gradient
    # accumulation) would find the event counter not yet folded back to 0, and recompile.

    def tracing(self) -> bool:
        """Whether dynamo is tracing this call; ``traced`` first: it spares eager users the
        slower question (dynamo tells us before it traces anything, see _on_compile_start)."""
        return self.traced and torch.compiler.is_compiling()

    def traced_recording(self) -> bool:
        # len(), not bool(): dynamo before 2.13 cannot trace bool() of a dict (a graph break)
        return len(self._traced_now) > 0 or self.recording

    def _traced_state(self) -> dict[str, Any]:
        state = self._traced_now
        if not state:  # the first hook of a forward, or a compiled part of an eager forward
            state.update(stack=[], busy=False, mode=False, entered=[])
            state["channels_first"] = self._channels_first
        return state

    def traced_begin(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if self._traced_forwards or not (torch.is_grad_enabled() and module.training):
            return
        self._traced_forwards.append(True)
        state = self._traced_state()
        if self._mode is not None and not self._mode_entered:
            self._mode.__enter__()  # every traced forward is a survey: it costs nothing at run time
            state["mode"] = True
        one = args[0] if len(args) == 1 and not kwargs else None
        for t in _float_tensors(one if isinstance(one, torch.Tensor) else (args, kwargs)):
            if t.numel():
                self._traced_inputs.append((stats.norm_min_max(t), t.numel()))

    def traced_end(self) -> None:
        if self._traced_now.get("mode"):
            self._mode.__exit__(None, None, None)
        self._traced_now.clear()

    def _record(self, hook: _ProbeHook, event: tuple) -> None:
        """Traced code's record of what it saw, kept by the hook with its sequence number."""
        seq = self._seq
        hook.events.append((seq["n"], *event))
        seq["n"] += 1

    def traced_enter(self, hook: _ProbeHook) -> None:
        state = self._traced_state()
        if hook.entry is not None:
            self._record(hook, ("seen",))
        state["stack"].append(hook)
        hook.fn_counts.clear()
        # A compiled part of an eager forward: the mode goes on inside the modules seen calling
        # a functional activation, as in eager, and off again at their end (in the same graph).
        enter = (
            not (state["mode"] or self._mode_entered or any(state["entered"]))
            and self._mode is not None
            and hook.calls_fn
        )
        if enter:
            self._mode.__enter__()
        state["entered"].append(enter)

    def traced_leave(self, hook: _ProbeHook, module: nn.Module, args: Any, output: Any) -> None:
        state = self._traced_state()
        stack = state["stack"]
        if stack:  # no check that it is this module's: comparing would guard on which one
            stack.pop()
            if state["entered"].pop():
                self._mode.__exit__(None, None, None)
        entry = hook.entry
        if entry is not None:
            outputs = _float_tensors(output)
            if entry.kind is None and entry.grad_hook is not None:
                for t in outputs:
                    if t.requires_grad:
                        t.register_hook(entry.grad_hook)
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if getattr(module, "inplace", False) is True:
                inp = None
            counts = self._traced_counts(state, entry.kind, inp, outputs, entry.act_params)
            self._record(hook, ("call", *counts))
        if isinstance(module, _CHANNELS_FIRST):
            state["channels_first"] = True
        elif entry is not None and entry.kind is None:
            state["channels_first"] = False

    def traced_functional(
        self, kind: str, func: Callable, args: tuple, kwargs: dict, out: Any
    ) -> None:
        state = self._traced_state()
        if state["busy"]:  # our own reductions below
            return
        # a compiled part whose own hooks ran eagerly (see _skip_hook_frames): its caller is on
        # the eager stack
        caller = self._caller(state["stack"] or self._stack)
        if caller.fn_skip:
            return
        fname = FUNCTION_NAMES[func]
        k = self._fn_index(caller, fname)
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if kwargs.get("inplace") is True:
            inp = None
        params = _fn_params(kind, args, kwargs)
        counts = self._traced_counts(state, kind, inp, _float_tensors(out), params)
        self._record(caller, ("fn", fname, k, kind, params, *counts))

    def _traced_counts(
        self,
        state: dict[str, Any],
        kind: str | None,
        inp: torch.Tensor | None,
        outputs: list[torch.Tensor],
        params: dict[str, float],
    ) -> tuple[torch.Tensor | None, int]:
        """An activation's per-unit flat counts (a graph output) and its element count."""
        if kind is None or not outputs:
            return None, 0
        y = outputs[0]
        state["busy"] = True
        flat = stats.flat_mask(kind, y, None if inp is y else inp, self.saturation_eps, **params)
        state["busy"] = False
        if flat is None or not flat.numel():
            return None, 0
        axis = stats.unit_axis(flat.dim(), state["channels_first"])
        return stats.flat_counts(flat, axis), flat.numel()

    def _fold_traced(self) -> None:
        """Into the entries: what traced forwards saw since the last logging step (at the end of
        a forward)."""
        for row, numel in self._traced_inputs:
            self._add_input(row, numel)
        if self._seq["n"] or self._seq_used:  # all hooks: some may sit outside a folded subtree
            self._fold_events(self._event_hooks)
        self._seq_used = False
        self.forwards += len(self._traced_forwards)
        self._traced_inputs.clear()
        self._traced_forwards.clear()
        if self._traced_now.get("mode") and _mode_on_top(self._mode):  # a forward that raised
            self._mode.__exit__(None, None, None)
        self._traced_now.clear()

    def _fold_events(self, hooks: list[_ProbeHook], done: bool = True) -> None:
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
        self._seq["n"] = 0
        self._seq_used = True
        events.sort(key=lambda pair: pair[0][0])
        for event, hook in events:
            try:
                self._fold_event(event, hook)
            except Exception as e:  # the layer's (or its functional call's) alone
                self.fail(
                    e, hook.name if event[1] != "fn" else f"{hook.name}:{event[2]}#{event[3]}"
                )

    def _fold_event(self, event: tuple, hook: _ProbeHook) -> None:
        if event[1] == "seen":
            if hook.entry.order is None:
                self._place(hook.entry)
            return
        if event[1] == "call":
            _, _, counts, numel = event
            entry = hook.entry
            self._traced_hooked = True
        else:  # "fn": hook is the caller's
            _, _, fname, k, kind, params, counts, numel = event
            name = self._fn_name(hook, fname, k)
            entry = self.entries.get(name) or self._fn_entry(name, fname, kind, params)
        entry.calls += 1
        if counts is not None:
            self._add_counts(entry, counts, numel)

    # -- reading ---------------------------------------------------------------------------------

    def ordered_entries(self) -> list[Entry]:
        """Entries in first-forward order; modules never called come last, in definition order."""
        if self._ordered is None:  # it only changes when an entry is first seen
            seen = sorted(self.entries.values(), key=lambda e: e.order)
            unseen = [e for e in self.module_entries.values() if e.order is None]
            self._ordered = seen + unseen
        return self._ordered

    def take(self) -> Taken:
        """Everything gathered since the last call, in forward order, and reset for the next."""
        entries = [e for e in self.ordered_entries() if e.seen]
        index = {e: i for i, e in enumerate(entries)}
        signal_owner = [index[e] for e in self._signal_entries]
        # (offset, entry index, units, elements per unit), in the order of the count slots
        segments = sorted(
            (start, i, units, rows)
            for i, e in enumerate(entries)
            for units, (start, rows) in e.segments.items()
            if rows
        )
        units = [0] * len(entries)
        for _, i, u, _ in segments:
            units[i] += u
        taken = Taken(
            entries=entries,
            calls=[e.calls for e in entries],
            signal=self.signal_slots.take(),
            signal_owner=signal_owner,
            signal_count=[e.signal_count for e in entries],
            elems=[e.elems for e in entries],
            units=units,
            counts=self.count_slots.take(),
            rows=None,
            owner=None,
            input=self._take_input(),
            unit_owners=tuple((i, u) for _, i, u, _ in segments),
        )
        if taken.counts is not None:
            key = tuple((i, u, r) for _, i, u, r in segments)
            taken.rows, taken.owner = self._segment_index(key, taken.counts.device)
        if self._traced_hooked:  # else the accumulators are zero: no copy for eager steps
            self._take_traced_signal(entries, taken)
        self._signal_entries.clear()
        for e in entries:
            e.reset()
        return taken

    def _take_traced_signal(self, entries: list[Entry], taken: Taken) -> None:
        owned = [(i, e.signal_acc) for i, e in enumerate(entries) if e.signal_acc is not None]
        if owned:
            device = owned[0][1].device
            taken.traced_signal = torch.stack([acc.to(device, torch.float64) for _, acc in owned])
            taken.traced_owner = [i for i, _ in owned]
        accs = [e.signal_acc for e in self.module_entries.values() if e.signal_acc is not None]
        if accs:
            torch._foreach_zero_(accs)
        self._traced_hooked = False
        self.prepare_traced()

    def _segment_index(self, segments: tuple, device: torch.device) -> tuple:
        """Per unit, its element count and its entry index, as device tensors; the layout is the
        same step after step, so they are built (and copied to the device) once."""
        key = (segments, device)
        if self._index_cache is None or self._index_cache[0] != key:
            owner, units, rows = (torch.tensor(col, dtype=torch.int64) for col in zip(*segments))
            # non_blocking: a blocking host-to-device copy synchronises the stream (which
            # torch.cuda.set_sync_debug_mode reports); from pageable memory CUDA has taken the
            # bytes when the call returns, so the temporaries may go at once
            self._index_cache = (
                key,
                torch.repeat_interleave(rows, units).to(device, torch.float32, non_blocking=True),
                torch.repeat_interleave(owner, units).to(device, non_blocking=True),
            )
        return self._index_cache[1], self._index_cache[2]

    def _take_input(self) -> torch.Tensor | None:
        if not self._inputs:
            return None
        values = stats.sumsq_count_absmax(torch.stack(self._inputs), self._input_count)
        self._inputs.clear()
        self._input_count = 0
        return values
