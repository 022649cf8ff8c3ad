"""One logging step's device numbers, gathered: the gradient and weight norms, the next
update's size, what the hooks reduced, combined over the ranks when asked, then copied to the host
in one transfer."""

from __future__ import annotations

from typing import Any

import torch

from . import stats
from .distributed import local_shard
from .optimizer_mode import loss_scale
from .probes import IN_ABSMAX
from .probes.buffers import Taken
from .stats import segment_totals
from .stepdata import MAX, NONE, NORM, SUM, StepData
from .updates import update_norms


def gather(
    taken: Taken,
    params: list[torch.Tensor],
    weigh: bool,
    optimizer: Any,
    skipped: bool,
    across: bool,
    scaler: Any,
) -> tuple[dict[str, list[float]], list[int], bool, Any]:
    """``(host values by field, positions of params with a .grad, combined over the ranks,
    the loss scale as read)``; ``weigh``: read the weights too (and the next update's size)."""
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    grad_parts = [local_shard(params[i].grad) for i in with_grad]
    weight_parts = [local_shard(p) for p in params] if weigh else []
    with torch.no_grad():  # one pass over gradients and weights, recording no graph
        norms = stats.norms([t for t, _ in grad_parts] + [t for t, _ in weight_parts])
    grad_norms, weight_norms = norms[: len(grad_parts)], norms[len(grad_parts) :]
    n = len(taken.entries)
    data = StepData()
    if across:  # how many ranks hold each FSDP shard: it matters only when ranks combine
        grad_copies, weight_copies = [c for _, c in grad_parts], [c for _, c in weight_parts]
    else:
        grad_copies = weight_copies = None
    data.add("grad", grad_norms, NORM, copies=grad_copies)
    data.add("weight", weight_norms, NORM, copies=weight_copies)
    if weigh and optimizer is not None and not skipped:  # the next update, by its own rule
        with torch.no_grad():
            data.add("update", update_norms(optimizer, params), NORM, copies=weight_copies)
    data.add("signal", taken.signal, SUM)  # per entry: sum of squares, elements
    for name, parts in (("time", taken.time), ("derivs", taken.derivs), ("dphi2", taken.dphi2)):
        if parts:  # sums (of squares) and counts, per time step or per activation
            data.add(name, torch.cat([t.reshape(-1) for _, t in parts]), SUM)
    data.add("counts", taken.counts, SUM, to_host=False)  # per unit: flat elements...
    data.add("rows", taken.rows, SUM, to_host=False)  # ... and all its elements
    if taken.input is not None:
        data.add("input", taken.input[:IN_ABSMAX], SUM)  # sum of squares, count
        data.add("input_absmax", taken.input[IN_ABSMAX:], MAX)
    combined = False
    if across:
        f64 = {"dtype": torch.float64, "device": norms.device}
        data.add("elems", torch.tensor(taken.elems, **f64), SUM)
        combined = data.combine_across_ranks(taken.layout())
    if "counts" in data:  # flat elements, dead and active units of each entry, combined
        totals = segment_totals(data.tensor("counts"), data.tensor("rows"), taken.owner, n)
        data.add("flat_dead", totals.reshape(-1), NONE)
    scale = loss_scale(scaler)
    if isinstance(scale, torch.Tensor):
        data.add("scale", scale.reshape(1).float(), NONE)
    host = data.to_host()  # the one device-to-host copy of the step
    return host, with_grad, combined, scale
