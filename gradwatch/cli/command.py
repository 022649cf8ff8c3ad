"""The ``gradwatch`` command."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ..options import Options, cli_options


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _plain(doc: str) -> str:
    """An option's documentation as a terminal shows it: no reST markup, % escaped."""
    return doc.replace("``", "").replace(":class:", "").replace("`", "").replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Which layers of a PyTorch model have stopped learning, and why.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a broken deep sigmoid net and its remedied version on synthetic data",
        description="Train the classic broken network (deep sigmoid MLP, default init) and its "
        "remedied version side by side on built-in synthetic data, print gradwatch's diagnosis "
        "and write both runs for TensorBoard. The demo measures every 10 steps and reads the "
        "weights on each; the GradWatch options below change that.",
    )
    demo.add_argument("--steps", type=_positive, default=300, help="SGD steps per network (300)")
    demo.add_argument("--depth", type=_positive, default=20, help="hidden layers (20)")
    demo.add_argument("--width", type=_positive, default=128, help="hidden width (128)")
    demo.add_argument("--logdir", default="runs", help="where to write the runs (runs/)")
    demo.add_argument("--no-logdir", action="store_true", help="write no TensorBoard files")
    demo.add_argument("--seed", type=int, default=0)
    for flag, kind, default, doc in cli_options():  # GradWatch's own, declared in Options
        demo.add_argument(
            flag, type=kind, default=None, help=f"{_plain(doc)} (GradWatch's default: {default!r})"
        )

    report = sub.add_parser(
        "report",
        help="summarise gradwatch's TensorBoard runs in the terminal",
        description="Read gradwatch's TensorBoard event files under LOGDIR and print, per run, "
        "each layer's latest numbers with their trend since the first logged step, and the "
        "findings with remedies. Exit status: 0, or 1 when --fail-on finds a finding that "
        "severe, or 2 when LOGDIR holds nothing to read.",
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a run directory or a parent of runs")
    report.add_argument("--json", action="store_true", help="print JSON instead of tables")
    report.add_argument(
        "--fail-on",
        choices=("warning", "error"),
        default=None,
        help="exit 1 if any run's latest findings include one this severe (for CI jobs)",
    )
    report.add_argument(
        "--max-rows",
        type=_positive,
        default=40,
        help="layers shown per run (40): both ends, then flagged ones",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        chosen = {
            flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
            for flag, *_ in cli_options()
        }
        options = {name: value for name, value in chosen.items() if value is not None}
        try:
            Options(**options)  # checked before anything trains
        except (TypeError, ValueError) as e:
            print(f"gradwatch demo: {e}", file=sys.stderr)
            return 2
        logdir = None if args.no_logdir else args.logdir
        run_demo(args.steps, args.depth, args.width, logdir, args.seed, options)
        return 0
    if args.command == "report":
        return _report(args)
    return 0


_SEVERITY = {"warning": 1, "error": 2}


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..output import logreader

    logdir = Path(args.logdir)
    if not logdir.is_dir():
        print(f"gradwatch report: LOGDIR {str(logdir)!r} is not a directory", file=sys.stderr)
        return 2
    paths = logreader.find_runs(logdir)
    if not paths:
        print(
            f"gradwatch report: no TensorBoard event files (events.out.tfevents.*) under "
            f"{str(logdir)!r}",
            file=sys.stderr,
        )
        return 2
    runs = [
        logreader.read_run(p, str(p.relative_to(logdir)) if p != logdir else ".") for p in paths
    ]
    found = [r for r in runs if r.has_data]
    for r in runs:
        if not r.has_data:
            print(
                f"gradwatch report: {r.name}: event files without gradwatch data", file=sys.stderr
            )
    if not found:
        print(f"gradwatch report: no gradwatch data under {str(logdir)!r}", file=sys.stderr)
        return 2
    summaries = [logreader.summarize(r) for r in found]
    try:
        if args.json:
            print(json.dumps({"runs": summaries}, indent=2))
        else:
            print("\n\n".join(_format_run(s, args.max_rows) for s in summaries))
        sys.stdout.flush()
    except BrokenPipeError:  # `gradwatch report runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    if args.fail_on:
        tripped = _tripped(summaries, _SEVERITY[args.fail_on])
        if tripped:
            print(f"gradwatch report: --fail-on {args.fail_on}: {tripped}", file=sys.stderr)
            return 1
    return 0


def _tripped(summaries: list[dict], level: int) -> str:
    """What makes ``--fail-on`` fail, in words: each run, kind and layer at that severity."""
    parts = []
    for s in summaries:
        bad = [f for f in s["findings"] if _SEVERITY.get(f["severity"], 0) >= level]
        by_kind: dict[str, list[dict]] = {}
        for f in bad:
            by_kind.setdefault(f"{f['kind']} {f['severity']}", []).append(f)
        for what, found in by_kind.items():
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            parts.append(f"run {s['run']}: {what} at `{found[0]['layer'] or '(root)'}`{more}")
    return "; ".join(parts)


def _ratio(log10_ratio: float) -> str:
    """A signal ratio read back from its log10 tag: a zero signal was written as the floor."""
    from ..output.dashboard import FLOOR
    from ..report.words import number

    return "0" if log10_ratio == FLOOR else number(10**log10_ratio)


def _format_run(s: dict, max_rows: int) -> str:
    from ..report import Finding, Remedy
    from ..report.text import WIDTH, findings_text
    from ..report.words import (
        MARK,
        MARK_LEGEND,
        change,
        close_single_gaps,
        dead,
        factor,
        more_layers,
        number,
        percent,
        with_gaps,
    )

    flagged = {f["layer"] for f in s["findings"]}
    rows = s["layers"]
    if len(rows) > max_rows:  # both ends, then flagged layers (all named in the findings)
        ends = set(range(max_rows // 2)) | set(range(len(rows) - max_rows // 4, len(rows)))
        marked = [k for k, r in enumerate(rows) if r["layer"] in flagged and k not in ends]
        kept = sorted(ends | set(marked[: max(0, max_rows - len(ends))]))
        rows = [rows[k] for k in close_single_gaps(kept)]
    width = max([5] + [len(r["layer"] or "(root)") for r in rows])
    kind = max([4] + [len(r.get("type") or "-") for r in rows])
    lines = [
        f"== run {s['run']}: steps {s['first_step']}..{s['latest_step']} "
        f"({s['logged_steps']} logged), global grad norm {number(s['global_grad_norm'])}",
        f"{'layer':<{width}}  {'type':<{kind}} {'grad_norm':>9} {'x first':>8}  "
        f"{'signal/out':>10} {'dlog10':>7}  {'saturation':>13}  {'dead':>5}",
    ]
    position = {r["layer"]: k for k, r in enumerate(s["layers"])}
    by_position = {position[r["layer"]]: r for r in rows}
    for k, hidden in with_gaps(list(by_position), len(s["layers"])):
        if hidden:  # where rows are left out, not at the bottom
            lines.append(f"{'':<{width}}  … {more_layers(hidden)} (--max-rows)")
        if k is None:
            break
        r = by_position[k]
        g, g0 = r.get("grad_norm"), r.get("grad_norm_first")
        trend = factor(g / g0) if g is not None and g0 else "-"
        q, q0 = r.get("log10_signal_ratio"), r.get("log10_signal_ratio_first")
        ratio = "-" if q is None else _ratio(q)
        moved = change(q - q0) if q is not None and q0 is not None else "-"
        sat = "-"
        if r.get("saturation") is not None:
            sat = f"{percent(r.get('saturation_first'))} -> {percent(r['saturation'])}"
        mark = f" {MARK}" if r["layer"] in flagged else ""
        lines.append(
            f"{r['layer'] or '(root)':<{width}}  {r.get('type') or '-':<{kind}} {number(g):>9} "
            f"{trend:>8}  {ratio:>10} {moved:>7}  {sat:>13}  "
            # the log keeps the type's name only (`Tanh`, `sigmoid`): the kind, lowercased
            f"{dead(r.get('dead_units'), (r.get('type') or '').lower()):>5}{mark}"
        )
    legend = (
        "signal/out: the layer's backward signal norm over the output side's; x first: its "
        "gradient norm over the first logged step's; dlog10: how signal/out moved since then, in "
        "powers of ten" + (f"; {MARK_LEGEND}" if flagged & {r["layer"] for r in rows} else "")
    )
    lines += textwrap.wrap(legend, WIDTH)
    if s["findings"] and s["findings_step"] != s["latest_step"]:
        lines.append(
            f"findings as last written, at step {s['findings_step']} (unchanged since then):"
        )
    findings = [
        Finding(**{**f, "remedies": tuple(Remedy(**r) for r in f["remedies"])})
        for f in s["findings"]
    ]
    types = {r["layer"]: r["type"] for r in s["layers"] if r.get("type")}
    lines += findings_text(findings, s["latest_step"], types)
    for p in s["problems"]:
        lines.append(f"note: {p}")
    return "\n".join(lines)
