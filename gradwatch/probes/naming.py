"""Which module calls a functional activation or an attention, and the entry that call fills
(``<caller>:<function>#<k>``): a mixin of :class:`~gradwatch.probes.core.Probes`."""

from __future__ import annotations

from typing import Any

from .buffers import Entry
from .hooks import ProbeHook


class Naming:
    """The naming half of the probes' eager bookkeeping (a mixin: one object)."""

    _pre_hooks: dict[str, ProbeHook]
    _fn_callers: set[str]
    place: Any

    def caller(self, stack: list[ProbeHook]) -> ProbeHook:
        """The pre-hook of the module that calls a functional activation: the innermost module
        being run, or the model itself."""
        return stack[-1] if stack else self._pre_hooks[""]

    @staticmethod
    def fn_index(caller: ProbeHook, fname: str) -> int:
        """This call's index among the caller's calls of ``fname`` in its current forward."""
        k = caller.fn_counts.get(fname, 0)
        caller.fn_counts[fname] = k + 1
        return k

    def fn_name(self, caller: ProbeHook, fname: str, k: int) -> str:
        """The entry name of a functional call, marking its caller as one (eager code only)."""
        if not caller.calls_fn:
            caller.calls_fn = True
            self._fn_callers.add(caller.name)
        return f"{caller.name}:{fname}#{k}"

    def fn_entry(self, name: str, fname: str, kind: str | None, params: dict[str, float]) -> Entry:
        """A new functional entry, placed."""
        entry = Entry(name=name, module_type=fname, kind=kind, act_params=params)
        self.place(entry)
        return entry
