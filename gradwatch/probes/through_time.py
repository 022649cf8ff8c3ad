"""Through time: the gradient that reaches each time step of a recurrent module's input.

The gradient of a recurrent module's *output* at time step t holds only the loss terms read at t;
what flows back through the recurrence from later steps never appears there (with the loss on the
last output, every earlier output's gradient is zero). The gradient of its *input* at t has passed
back through every later step of the recurrence, so its size over t is what vanishes or explodes
through time. On a logging step the input is given a tensor hook that reduces its gradient to one
sum of squares per time step, on the device; an input that needs no gradient (raw features) is
replaced by a detached copy that does, which adds the input-gradient matmul to that step's backward
and leaves every parameter's gradient as it was.
"""

from __future__ import annotations

import fnmatch
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..measure import stats
from ..measure.statistics import STATE_DERIVATIVE, TIME_SIGNAL

if TYPE_CHECKING:
    from .buffers import Entry
    from .recorder import Recorder

RECURRENT = -1  # Entry.time_axis of nn.RNN/GRU/LSTM: the axis follows batch_first


def time_axis(module: nn.Module, name: str, named: dict[str, int] | None) -> int | None:
    """The time axis of a module's first input: from the user's patterns first, then
    :data:`RECURRENT` for torch's recurrent modules; None for other modules."""
    for pattern, axis in (named or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return axis
    return RECURRENT if isinstance(module, nn.RNNBase) else None


def hook_sequence(probes: Recorder, entry: Entry, args: tuple) -> tuple | None:
    """Hook the sequence input of ``entry``'s module: the arguments to call it with instead
    (when the input had to be made to need a gradient), else None."""
    x = args[0] if args else None
    sizes = None
    if isinstance(x, PackedSequence):
        data, sizes = x.data, x.batch_sizes
    elif isinstance(x, torch.Tensor):
        data = x
    else:
        return None
    if not data.is_floating_point() or data.dim() < 2:
        return None
    axis = entry.time_axis
    if sizes is not None:
        axis = 0
    elif axis == RECURRENT:  # (T, N, F), (N, T, F) when batch_first, or unbatched (T, F)
        axis = 1 if data.dim() == 3 and getattr(entry.module, "batch_first", False) else 0
    if not -data.dim() <= axis < data.dim():
        return None
    replaced = not data.requires_grad
    if replaced:
        data = data.detach().requires_grad_()
    data.register_hook(TimeHook(entry, probes, axis % data.dim(), sizes))
    if not replaced:
        return None
    new = x._replace(data=data) if sizes is not None else data
    return (new, *args[1:])


class TimeHook:
    """Tensor hook on a sequence input: its gradient's sum of squares per time step, added to the
    entry's accumulator (row 0), with the element counts behind them (row 1)."""

    __slots__ = ("entry", "_ref", "axis", "sizes")

    def __init__(
        self, entry: Entry, probes: Recorder, axis: int, sizes: torch.Tensor | None
    ) -> None:
        self.entry = entry
        self._ref = weakref.ref(probes)
        self.axis = axis
        self.sizes = sizes

    def __call__(self, grad: torch.Tensor | None) -> None:
        probes = self._ref()
        if grad is None or probes is None:
            return
        try:
            with probes.signals.lock:
                add_time_profile(self.entry, grad, self.axis, self.sizes)
        except Exception as e:  # never break the user's backward
            probes.fail(e, self.entry.name)


def add_time_profile(
    entry: Entry, grad: torch.Tensor, axis: int, sizes: torch.Tensor | None
) -> None:
    sums = stats.time_sumsq(grad, axis, sizes)
    steps = sums.numel()
    if sizes is None:
        count = torch.full_like(sums, grad.numel() // steps)
    else:
        per_row = grad.numel() // max(grad.shape[0], 1)
        count = (sizes.double() * per_row).to(sums.device, non_blocking=True)
    entry.add(TIME_SIGNAL, TIME_SIGNAL.pack(sumsq=sums, count=count))


def add_state_derivative(entry: Entry, module: nn.Module, output: Any) -> None:
    """For a tanh RNN, the sum of tanh' = 1 - h**2 over its output and how many values: the
    derivative that multiplies the signal at every step of its last layer."""
    if getattr(module, "mode", None) != "RNN_TANH":
        return
    out = output[0] if isinstance(output, tuple) else output
    h = out.data if isinstance(out, PackedSequence) else out
    if not isinstance(h, torch.Tensor) or not h.numel():
        return
    h = h.detach()
    total = (1 - h.float().square()).sum(dtype=torch.float64)
    entry.add(STATE_DERIVATIVE, STATE_DERIVATIVE.pack(sum=total, count=h.numel()))
