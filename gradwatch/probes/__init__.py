"""Hooks on the model and the handles that remove them.

A plain boolean ``armed`` switches the hooks' work on for logging steps. Between logging steps
that are several steps apart the per-module hooks come off (:meth:`Probes.install`): idle, they
still cost ``nn.Module`` its slow call path. Once dynamo starts compiling anything in the process,
every hook goes back on and stays (compiled code does not see hooks added later).

Every hook reduces what it sees at once, in one to three tensor ops, writing the result into a
growing buffer on the model's device (:class:`Slots`); sizes and counts are Python integers. No
activation or gradient tensor is kept, and nothing is copied to the host before the optimizer
boundary.

Hook objects hold only a weak reference to the :class:`Probes`: a deep copy of the model (an EMA
copy) gets inert hooks, and ``torch.save(model)`` pickles them as inert hooks too.

Stage 2 of the pipeline. One job a file, bottom up: ``kinds`` (the activations), ``compat`` (torch
internals, guarded), ``buffers`` (device buffers, one :class:`Entry` per report row, what a step
took), ``recorder`` (the interface the hooks call), ``hooks`` (the hook objects), ``batched``
(small activations counted together), ``rows`` (the statistics an activation call adds, eager
and traced alike), ``through_time`` (sequence inputs), ``traced`` (forwards
that dynamo traces), ``placements`` (which piece of a tensor a rank holds under tensor
parallelism), ``naming`` (the entries of functional calls), ``reading`` (the step boundary's
read), ``compiling`` (the compile watch) and ``core`` (:class:`Probes`, which owns it all, and
the eager bookkeeping). A hook adds rows of the statistics declared in
:mod:`gradwatch.measure.statistics` to its entry.
"""

from .buffers import Entry, Slots, Taken
from .compat import unwrap
from .core import INPUTS, SURVEY_EVERY, Probes
from .kinds import FUNCTION_KINDS, activation_kind

__all__ = [
    "FUNCTION_KINDS",
    "INPUTS",
    "SURVEY_EVERY",
    "Entry",
    "Probes",
    "Slots",
    "Taken",
    "activation_kind",
    "unwrap",
]
