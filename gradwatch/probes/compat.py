"""Where gradwatch leans on torch internals that may move between versions: each use is guarded,
and falls back to the public path (or to doing less) when the internals are not there."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def mode_on_top(mode: TorchFunctionMode) -> bool:
    try:
        depth = torch._C._len_torch_function_stack()
        return depth > 0 and torch._C._get_function_stack_at(depth - 1) is mode
    except AttributeError:  # private API gone: never pop at a module boundary
        return False


def in_backward() -> bool:
    # Non-reentrant activation checkpointing re-runs forward hooks inside backward. Traced code
    # gets False: the call is opaque to dynamo and would break the graph at every module.
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def add_grad_hook(t: torch.Tensor, hook: Callable[[torch.Tensor | None], None]) -> None:
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
