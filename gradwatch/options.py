"""The options that :class:`~gradwatch.GradWatch` and the Lightning callback share, declared once:
each with its default, its documentation and, where a terminal can give it, its command-line
type. The constructors' signatures and docstrings, the CLI's flags and the table in
``docs/usage.md`` are made from these declarations; the options are checked once, when made, with
errors that name the argument, the value and what is allowed."""

from __future__ import annotations

import inspect
import textwrap
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .diagnosis.thresholds import Thresholds

Schedule = int | Callable[[int], bool]
NAN_STRATEGIES = ("warn", "raise")


def _option(default: Any, doc: str, cli: Callable[[str], Any] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "cli": cli})


@dataclass(frozen=True)
class Options:
    """What to measure, when, and what to do with the findings.

    Example::

        >>> Options(every_n_steps=10).weight_norm_every
        10
        >>> Options(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: every_n_steps must be a positive int, got 0
    """

    every_n_steps: Schedule = _option(
        50, "measure steps 0, n, 2n, ...; or a callable ``step -> bool``", int
    )
    thresholds: Thresholds | None = _option(
        None, "a :class:`Thresholds`; defaults documented there (None: ``Thresholds()``)"
    )
    include: list[str] | None = _option(None, "glob patterns of module names to watch")
    exclude: list[str] | None = _option(None, "glob patterns of module names to leave out")
    through_time: dict[str, int] | None = _option(
        None,
        "``{module name pattern: time axis}``: other modules whose first input is a sequence, "
        "measured like ``nn.RNN``/``GRU``/``LSTM`` (which need not be named): the gradient "
        "reaching each time step of the input (``LayerStats.time_signal``)",
    )
    logits_layer: str | None = _option(
        "auto",
        "the module whose outputs are the model's logits, where log Z is measured "
        '(``LayerStats.log_z_mean``): ``"auto"`` takes ``get_output_embeddings()`` (Hugging '
        "Face) or a last Linear named ``lm_head``/``classifier``/``score``/``head``/``fc``/"
        "``output``; None: no head",
    )
    warn: bool = _option(
        True, "emit findings as :class:`GradWatchWarning` (once per layer and kind)"
    )
    nan_strategy: str = _option(
        "warn",
        'what a ``nonfinite`` finding does besides being reported: ``"warn"`` (training goes '
        'on) or ``"raise"``: ``step()`` (or, in optimizer mode, ``optimizer.step()`` before it '
        "updates anything) raises :class:`NonFiniteError` naming the first affected layer",
        str,
    )
    sync_dist: bool = _option(
        True,
        "under ``torch.distributed`` (DDP, FSDP, HSDP, tensor parallel), combine the ranks' "
        "numbers on logging steps (one all-reduce), so every rank reports the unsharded model "
        "on the global batch; ``step()`` must then be called on every rank. False: rank-local "
        "numbers, no communication. Only rank 0 writes to TensorBoard and warns either way",
    )
    background: bool | str = _option(
        "auto",
        "finish logging steps on a background thread: the training thread only starts the "
        "step's one copy to the host (no wait for the device), and the readout, the diagnosis "
        "and the sinks run there (the returned report fills in when read; warnings arrive at "
        'the next gradwatch call). ``"auto"``: when the model is on an accelerator (a CPU step '
        "has no device to overlap with, and the thread would contend for the GIL: measured "
        "slower there). False: all on the training thread, before ``step()`` returns (for "
        'debugging). ``nan_strategy="raise"`` and the curvature probe\'s steps are always '
        "synchronous",
    )
    weight_norm_every: int = _option(
        10,
        "measure the weight norms (and the weight gain) on the first logging step and then on "
        "every n-th one; the reports in between carry the last measured values "
        "(``Report.weight_step`` says from when). Weights move by one learning-rate step at a "
        "time, and reading them costs as much as reading the gradients. 1: every logging step",
        int,
    )
    curvature_every: int | None = _option(
        None,
        "opt-in: on every n-th logging step, call ``curvature_loss`` and measure the Hessian's "
        "top eigenvalue and the optimizer's stability ratio (``Report.curvature``): a ravine or "
        "a plateau. A measurement costs a forward and 1-40 double backwards (the first, up to a "
        "few hundred); RNG streams and buffers are restored after it, ``.grad`` is untouched",
    )  # no command-line flag: it needs a loss function

    def __post_init__(self) -> None:
        _check(self)
        if self.thresholds is None:
            object.__setattr__(self, "thresholds", Thresholds())

    def as_kwargs(self) -> dict[str, Any]:
        """The options as ``GradWatch`` keyword arguments (the objects themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arguments(cls, owner: str, given: dict[str, Any]) -> Options:
        """The options among a constructor's keyword arguments; a name that is none of them is
        a TypeError that lists them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {unknown[0]!r}; its options are "
                f"{', '.join(f.name for f in fields(cls))}"
            )
        return cls(**given)


def positional_options(owner: str, args: tuple, names: tuple[str, ...], given: dict) -> None:
    """Options passed by position (as the constructors once took them) into ``given``, with a
    DeprecationWarning: they go by keyword from the next release."""
    if not args:
        return
    if len(args) > len(names):
        raise TypeError(
            f"{owner}() takes at most {len(names)} options by position, got {len(args)}"
        )
    for name, value in zip(names, args):
        if name in given:
            raise TypeError(f"{owner}() got multiple values for argument {name!r}")
        given[name] = value
    warnings.warn(
        f"{owner}(): pass {', '.join(names[: len(args)])} by keyword; by position goes in the next "
        "release",
        DeprecationWarning,
        stacklevel=3,
    )


def takes_options(cls: type) -> type:
    """A class decorator for a constructor that takes ``**options``: the options join its
    signature (for ``help()``, notebooks and IDEs that ask at run time), and their documentation
    replaces ``{options}`` in the class docstring."""
    init = cls.__init__
    signature = inspect.signature(init)
    # *args only takes the options once passed by position (deprecated): not shown
    own = [
        p for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    hints = typing.get_type_hints(Options)  # real types, not strings only this module can read
    extra = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in fields(Options)
    ]
    init.__signature__ = signature.replace(parameters=own + extra)
    if cls.__doc__ and "{options}" in cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("{options}", options_doc())
    return cls


def options_doc(indent: int = 8) -> str:
    """The options as a docstring's ``Args:`` lines."""
    pad, out = " " * indent, []
    for f in fields(Options):
        text = textwrap.fill(
            f"{f.name}: {f.metadata['doc']}.",
            width=100,
            initial_indent=pad,
            subsequent_indent=pad + "    ",
        )
        out.append(text)
    return "\n".join(out).lstrip()


def options_markdown() -> str:
    """The options as the markdown table of ``docs/usage.md`` (a test keeps the two equal)."""
    rows = ["| option | default | what it does |", "| --- | --- | --- |"]
    for f in fields(Options):
        doc = f.metadata["doc"].replace(":class:", "").replace("``", "`")
        rows.append(f"| `{f.name}` | `{f.default!r}` | {doc} |")
    return "\n".join(rows)


def cli_options() -> list[tuple[str, Callable[[str], Any], Any, str]]:
    """(flag, type, default, help) of the options a command line can give."""
    return [
        (f"--{f.name.replace('_', '-')}", f.metadata["cli"], f.default, f.metadata["doc"])
        for f in fields(Options)
        if f.metadata["cli"] is not None
    ]


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
    if o.logits_layer is not None and not isinstance(o.logits_layer, str):
        raise TypeError(
            f'logits_layer must be a module name (str), "auto" or None, got {o.logits_layer!r}'
        )
    if o.background not in (True, False, "auto"):
        raise ValueError(f'background must be True, False or "auto", got {o.background!r}')
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
