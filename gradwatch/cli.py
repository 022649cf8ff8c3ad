"""The ``gradwatch`` command."""

from __future__ import annotations

import argparse
import sys


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
        "and write both runs for TensorBoard.",
    )
    demo.add_argument("--steps", type=_positive, default=300, help="SGD steps per network (300)")
    demo.add_argument("--depth", type=_positive, default=20, help="hidden layers (20)")
    demo.add_argument("--width", type=_positive, default=128, help="hidden width (128)")
    demo.add_argument("--logdir", default="runs", help="where to write the runs (runs/)")
    demo.add_argument("--no-logdir", action="store_true", help="write no TensorBoard files")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            args.steps, args.depth, args.width, None if args.no_logdir else args.logdir, args.seed
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
