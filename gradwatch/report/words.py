"""Plain words for what the messages name: lists of layers without jargon."""

from __future__ import annotations


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
