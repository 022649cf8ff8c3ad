"""torch.compile support outside the traced code itself: every watcher's hooks go on before dynamo
compiles anything, and dynamo never compiles a hook as a frame of its own."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from .hooks import FunctionalMode, PostHook, PreHook, RootPostHook, RootPreHook

if TYPE_CHECKING:
    from .recorder import Recorder

log = logging.getLogger("gradwatch")

# Every live Probes, for the compile callback below.
LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _on_compile_start(*args: Any) -> None:
    # Compiled code keeps the hooks it was traced with, and a module compiled while they are off
    # would not see them come back (dynamo does not guard on a submodule's hooks): before dynamo
    # compiles anything in this process, every watcher's hooks go on, and stay on.
    for probes in list(LIVE):
        probes.compile_started()


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
        for hook in (PreHook, PostHook, RootPreHook, RootPostHook):
            set_code_exec_strategy(hook.__call__.__code__, skip)
        set_code_exec_strategy(FunctionalMode.__torch_function__.__code__, skip)
    except Exception:  # another torch's private API must never stop an attach
        log.debug("dynamo frame strategies unavailable", exc_info=True)
