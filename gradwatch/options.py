"""The options that :class:`~gradwatch.GradWatch` and the Lightning callback share: declared once,
checked once when made, with errors that name the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .thresholds import Thresholds

Schedule = int | Callable[[int], bool]
NAN_STRATEGIES = ("warn", "raise")


@dataclass(frozen=True)
class Options:
    """What to measure, when, and what to do with the findings (see ``GradWatch``'s arguments).

    Example::

        >>> Options(every_n_steps=10).weight_norm_every
        10
        >>> Options(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: every_n_steps must be a positive int, got 0
    """

    every_n_steps: Schedule = 50
    thresholds: Thresholds | None = None  # None: Thresholds()
    include: list[str] | None = None
    exclude: list[str] | None = None
    through_time: dict[str, int] | None = None
    warn: bool = True
    nan_strategy: str = "warn"
    sync_dist: bool = True
    weight_norm_every: int = 10
    curvature_every: int | None = None

    def __post_init__(self) -> None:
        _check(self)
        if self.thresholds is None:
            object.__setattr__(self, "thresholds", Thresholds())

    def as_kwargs(self) -> dict[str, Any]:
        """The options as ``GradWatch`` keyword arguments (the objects themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check(o: Options) -> None:
    n = o.every_n_steps
    if isinstance(n, bool) or not (isinstance(n, int) or callable(n)):
        raise TypeError(
            f"every_n_steps must be a positive int or a callable step -> bool, got "
            f"{n!r} ({type(n).__name__})"
        )
    if isinstance(n, int) and n < 1:
        raise ValueError(f"every_n_steps must be a positive int, got {n}")
    if o.thresholds is not None and not isinstance(o.thresholds, Thresholds):
        raise TypeError(
            f"thresholds must be a gradwatch.Thresholds or None, got {type(o.thresholds).__name__}"
        )
    for name, pats in (("include", o.include), ("exclude", o.exclude)):
        if pats is not None and (
            isinstance(pats, str) or not all(isinstance(p, str) for p in pats)
        ):
            raise TypeError(f"{name} must be a list of glob patterns (str), got {pats!r}")
    axes = o.through_time
    if axes is not None and (
        not isinstance(axes, dict)
        or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in axes.items()
        )
    ):
        raise TypeError(
            f"through_time must be a dict of module name pattern (str) -> time axis (int), "
            f"got {axes!r}"
        )
    for flag, value in (("warn", o.warn), ("sync_dist", o.sync_dist)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if o.nan_strategy not in NAN_STRATEGIES:
        raise ValueError(f"nan_strategy must be one of {NAN_STRATEGIES}, got {o.nan_strategy!r}")
    w = o.weight_norm_every
    if isinstance(w, bool) or not isinstance(w, int):
        raise TypeError(
            f"weight_norm_every must be a positive int (in logging steps), got "
            f"{w!r} ({type(w).__name__})"
        )
    if w < 1:
        raise ValueError(f"weight_norm_every must be a positive int, got {w}")
    c = o.curvature_every
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ValueError(
            f"curvature_every must be None (off) or a positive int (in logging steps), got {c!r}"
        )
