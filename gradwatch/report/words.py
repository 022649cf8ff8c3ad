"""Plain words for what the messages name: lists of layers without jargon, and the one way every
output (the terminal, ``table()``, the notebook, ``gradwatch report``, the demo) writes a number."""

from __future__ import annotations

import math

from .records import BOUNDED_KINDS

# What a table's mark means, written under every table that shows one.
MARK = "!"
MARK_LEGEND = f"{MARK} the layer is named in a finding"


def number(x: float | None) -> str:
    """A measured value: ``-`` when there is none, ``0`` when it is exactly zero, else three
    significant digits (``1.23e-04``): no ``0.00e+00``, no ``-0``."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.2e}"


def percent(x: float | None) -> str:
    """A fraction as a percentage: ``0%`` only when it is zero (a sliver is ``<1%``), ``100%``
    only when it is whole (``>99%`` short of it)."""
    if x is None:
        return "-"
    if x == 0 or x == 1:
        return f"{100 * x:.0f}%"
    if x < 0.005:
        return "<1%"
    if x > 0.995:
        return ">99%"
    return f"{100 * x:.0f}%"


def dead(x: float | None, kind: str | None) -> str:
    """A dead-units fraction, as :func:`percent`; ``-`` for a bounded activation (``kind``:
    sigmoid, tanh, ...), whose units flat for every sample are saturated, not dead."""
    return "-" if kind in BOUNDED_KINDS else percent(x)


def factor(x: float | None) -> str:
    """How many times another value: ``x2.5``, ``x0.031``; ``0`` when it fell to zero."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"x{x:.2g}"


def change(x: float | None) -> str:
    """A signed difference with one decimal: ``+1.5``, ``-0.3``, and ``0.0`` (never ``-0.0``)."""
    if x is None:
        return "-"
    if round(x, 1) == 0:
        return "0.0"
    return f"{x:+.1f}"


def severity_counts(severities: list[str]) -> str:
    """``12 errors, 4 warnings``: every severity present, most severe first."""
    order = ("error", "warning", "info")
    counts = [(s, severities.count(s)) for s in order if severities.count(s)]
    return ", ".join(f"{n} {s}{'s' * (n != 1)}" for s, n in counts)


def layer_list(names: list[str], module_type: str | None = None, limit: int = 24) -> str:
    """``the 21 Linear layers `0`, `2`, … `40``` (all names up to ``limit``, else both ends)."""
    shown = names if len(names) <= limit else names[:4] + [None] + names[-2:]
    quoted = ["…" if n is None else f"`{n or '(root)'}`" for n in shown]
    listed = ", ".join(quoted)
    if len(names) == 1:
        return f"layer {listed}" + (f" ({module_type})" if module_type else "")
    what = f"{module_type} layers" if module_type else "layers"
    return f"the {len(names)} {what} {listed}"


def more_layers(n: int) -> str:
    """``3 more layers``, ``1 more layer``."""
    return f"{n} more layer{'s' * (n != 1)}"


def close_single_gaps(kept: list[int]) -> list[int]:
    """Sorted row positions, with every gap of exactly one row filled: showing that row takes
    no more room than the line that would say it is left out."""
    out: list[int] = []
    for k in sorted(kept):
        if out and k == out[-1] + 2:
            out.append(k - 1)
        out.append(k)
    return out


def with_gaps(positions: list[int], total: int) -> list[tuple[int | None, int]]:
    """``(position, rows left out just before it)`` for each shown row of a table of ``total``
    rows, then ``(None, rows left out at the end)``: where a table marks what it hides."""
    out: list[tuple[int | None, int]] = []
    last = -1
    for k in positions:
        out.append((k, k - last - 1))
        last = k
    out.append((None, total - 1 - last))
    return out
