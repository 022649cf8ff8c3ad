"""One logging step's device numbers, gathered into a :class:`StepMessage`: the gradient and
weight norms, the next update's size and what the hooks reduced, each as its statistic is
declared; combined over the ranks when asked, then copied to the host in one transfer."""

from __future__ import annotations

from typing import Any

import torch

from ..measure import stats
from ..measure.statistics import (
    ADAM_HEALTH,
    ATTENTION,
    FLAT_AND_DEAD,
    GRAD,
    INPUT,
    INPUT_ABSMAX,
    LAYER_STATISTICS,
    LOSS_SCALE,
    LOSSES,
    SHARED_SIGNAL,
    SIGNAL,
    UNIT_ELEMENTS,
    UNIT_FLAT,
    UPDATE,
    WEIGHT,
)
from ..measure.stats import segment_totals
from ..measure.updates import update_norms
from ..probes import Entry, Taken
from .distributed import Exchange, local_shard
from .message import Header, LayerFacts, StepMessage


class Layers:
    """The :class:`LayerFacts` of the watched layers, made again only when the layers or the
    parameters change (a deep net's are thousands of objects)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._facts: tuple[LayerFacts, ...] = ()
        self._position: dict[Entry, int] = {}

    def facts(
        self, entries: list[Entry], params: list[torch.Tensor]
    ) -> tuple[tuple[LayerFacts, ...], dict[Entry, int]]:
        """Every watched layer's facts in forward order, and each entry's position there."""
        key = self._key
        if key is None or key[0] is not entries or key[1] is not params:
            where = {id(p): i for i, p in enumerate(params)}
            self._facts = tuple(_facts(e, where) for e in entries)
            self._position = {e: k for k, e in enumerate(entries)}
            self._key = (entries, params)
        return self._facts, self._position


def _facts(e: Entry, where: dict[int, int]) -> LayerFacts:
    params = tuple(where[id(p)] for p in e.params if id(p) in where)
    matrix = next((p for p in e.params if p.dim() >= 2 and id(p) in where), None)
    return LayerFacts(
        name=e.name,
        module_type=e.module_type,
        kind=e.kind,
        fan_in=e.fan_in,
        fan_out=e.fan_out,
        sequence=e.time_axis is not None,
        params=params,
        matrix=where[id(matrix)] if matrix is not None else None,
        matrix_numel=matrix.numel() if matrix is not None else 0,
        numel=sum(p.numel() for p in e.params if id(p) in where),
    )


def recurrent_facts(entries: list[Entry]) -> dict[str, tuple]:
    """What the theory reads off each sequence module's weights (0-d tensors: weighed steps)."""
    return {
        e.name: stats.recurrent_facts(e.module)
        for e in entries
        if e.time_axis is not None and e.params
    }


def gather(
    taken: Taken,
    entries: list[Entry],
    layers: Layers,
    params: list[torch.Tensor],
    weigh: bool,
    optimizer: Any,
    skipped: bool,
    across: Exchange | None,
    scaler: Any,
    losses: list[tuple[int, Any]] = (),
    spare_weights: bool = False,
) -> StepMessage:
    """The step as a message; ``weigh``: read the weights too; ``spare_weights``: read them
    though the step is not to report them (``header.weighed`` stays False): for a new finding
    that quotes them, on a worker that cannot read them later; ``optimizer``: an Adam-family
    one's next update is measured (its size and health); ``across``: the exchange that combines
    it over the ranks (``message.header.combined`` says whether they agreed); ``losses``: (step,
    loss) of the steps since the last logging step, each loss a number or a 0-d tensor."""
    facts, position = layers.facts(entries, params)
    header = Header(
        layers=facts,
        pooled=[e.one_per_unit for e in entries],
        seen=[position[e] for e in taken.entries],
        calls=taken.calls,
        elements=[float(n) for n in taken.elems],
        units=taken.units,
        unit_owners=taken.unit_owners,
        weighed=weigh,
        mesh_size=taken.mesh_size,
        weights=taken.weights,
        input_weight=taken.input_weight,
    )
    if across and (taken.unit_blocks or taken.head_blocks or taken.splits):
        spread_blocks(taken, header)
    message = StepMessage(header)
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    grad_parts = [local_shard(params[i].grad) for i in with_grad]
    read_weights = weigh or spare_weights
    weight_parts = [local_shard(p) for p in params] if read_weights else []
    with torch.no_grad():  # one pass over gradients and weights, recording no graph
        norms = stats.norms([t for t, _ in grad_parts] + [t for t, _ in weight_parts])
    grad_norms, weight_norms = norms[: len(grad_parts)], norms[len(grad_parts) :]
    if across:  # how many ranks hold each FSDP shard: it matters only when ranks combine
        grad_copies, weight_copies = [c for _, c in grad_parts], [c for _, c in weight_parts]
    else:
        grad_copies = weight_copies = None
    partials = {k: t for k, (t, c) in enumerate(grad_parts) if c < 0} if across else None
    message.add(GRAD, grad_norms, with_grad, grad_copies, partials)
    if read_weights:  # an SVD: after the norm kernels are queued
        header.recurrent = recurrent_facts(entries)
        message.add(WEIGHT, weight_norms, None, weight_copies)
    if optimizer is not None and not skipped:  # the next update, by its own rule
        numel = sum(params[i].grad.numel() for i in with_grad)
        with torch.no_grad():  # the model's RMS gradient, on the device
            grad_rms = grad_norms.double().square().sum().div(max(numel, 1)).sqrt()
            norms, health = update_norms(optimizer, params, grad_rms if with_grad else 0.0)
        # measured only where no parameter is a shard: every rank holds the same whole
        message.add(UPDATE, norms, None, [0] * len(params) if across else None)
        message.add(ADAM_HEALTH, health)
    message.add(SIGNAL, taken.signal)
    message.add_rows(SHARED_SIGNAL, [(i, g.reshape(1, -1)) for i, g in taken.shared])
    for statistic in LAYER_STATISTICS:
        if statistic is not SIGNAL:
            message.add_rows(statistic, taken.sums.get(statistic.name, []))
    message.add(UNIT_FLAT, taken.counts)
    message.add(UNIT_ELEMENTS, taken.rows)
    message.add(INPUT, taken.input)
    message.add(INPUT_ABSMAX, taken.input_absmax)
    if losses:
        header.loss_steps = tuple(k for k, _ in losses)
        device = next((v.device for _, v in losses if isinstance(v, torch.Tensor)), None)
        values = [torch.as_tensor(v, dtype=torch.float64, device=device) for _, v in losses]
        message.add_rows(LOSSES, [(0, torch.stack([v.reshape(()) for v in values]))])
    if across is not None:
        message.combine_across_ranks(across)
    if SHARED_SIGNAL in message:
        shared_signals(message, len(taken.entries))
    if UNIT_FLAT in message:  # per layer: flat elements, dead and active units, combined
        flat, dead, active = segment_totals(
            message.tensor(UNIT_FLAT),
            message.tensor(UNIT_ELEMENTS),
            taken.owner,
            len(taken.entries),
        )
        message.add(FLAT_AND_DEAD, FLAT_AND_DEAD.pack_rows(flat=flat, dead=dead, active=active))
    scale = loss_scale(scaler)
    if isinstance(scale, torch.Tensor):
        message.add(LOSS_SCALE, scale.reshape(1).float())
    else:
        header.loss_scale = scale
    return message


def shared_signals(message: StepMessage, rows: int) -> None:
    """The SIGNAL rows of outputs shared by every sample, from their gradients added over the
    micro-batches and the ranks: the same whether or not the batch was split."""
    field = message.fields[SHARED_SIGNAL.name]
    grads = torch.split(field.tensor, list(field.widths))
    if SIGNAL in message:
        signal = message.tensor(SIGNAL)
    else:
        signal = torch.zeros(rows, 2, dtype=torch.float64, device=field.tensor.device)
        message.add(SIGNAL, signal)
    for i, grad in zip(field.index, grads):
        signal[i, 0] = grad.double().square().sum()
        signal[i, 1] = grad.numel()


def spread_blocks(taken: Taken, header: Header) -> None:
    """Tensor parallelism: an activation whose units (an attention whose heads, an output shared
    by every sample) are split over the mesh gets rows as wide as the whole, this rank's block in
    its place and zeros elsewhere, so that adding the ranks' rows puts the blocks side by side."""
    for k, (i, grad) in enumerate(taken.shared):  # a shared output split over the mesh
        if len(taken.splits.get(i, ())) == 1:
            ((dim, offset, size),) = taken.splits[i]
            taken.shared[k] = (i, _widened(grad, dim, offset, size))
    rows = taken.sums.get(ATTENTION.name, [])
    for k, (i, row) in enumerate(rows):
        if i in taken.head_blocks:
            block, blocks = taken.head_blocks[i]
            width = row.shape[-1]
            rows[k] = (i, _widened(row, -1, block * width, width * blocks))
    if not taken.unit_blocks or taken.counts is None:
        return
    counts, elements, owners, segments, start = [], [], [], [], 0
    for i, units in taken.unit_owners:
        part = slice(start, start + units)
        start += units
        offset, total = taken.unit_blocks.get(i, (0, units))
        if units >= total or offset + units > total:  # not a block of this width
            offset, total = 0, units
        counts.append(_widened(taken.counts[part], 0, offset, total))
        elements.append(_widened(taken.rows[part], 0, offset, total))
        owners.append(taken.owner[part].new_full((total,), i))
        segments.append((i, total))
        taken.units[i] += total - units
    taken.counts, taken.rows, taken.owner = (
        torch.cat(counts),
        torch.cat(elements),
        torch.cat(owners),
    )
    taken.unit_owners = header.unit_owners = tuple(segments)


def _widened(t: torch.Tensor, dim: int, offset: int, size: int) -> torch.Tensor:
    """``t`` in its place (from ``offset``) along ``dim`` of zeros ``size`` long there."""
    dim %= t.dim()
    whole = t.new_zeros(*t.shape[:dim], size, *t.shape[dim + 1 :])
    whole.narrow(dim, offset, t.shape[dim]).copy_(t)
    return whole


def weight_norms(params: list[torch.Tensor], combine: Exchange | None) -> dict[int, float]:
    """Position in ``params`` -> that parameter's L2 norm, on the host, read now (one copy);
    ``combine``: over the ranks, FSDP shards put together (every rank must call it then)."""
    parts = [local_shard(p) for p in params]
    with torch.no_grad():
        values = stats.norms([t for t, _ in parts])
    no_layers = Header(
        layers=(), pooled=[], seen=[], calls=[], elements=[], units=[], unit_owners=()
    )
    message = StepMessage(no_layers)  # a message of one statistic
    message.add(WEIGHT, values, None, [c for _, c in parts])
    if combine is not None:
        message.combine_across_ranks(combine)
    return message.to_host().values(WEIGHT, "norm")


def loss_scale(scaler: Any) -> torch.Tensor | float | None:
    """A ``GradScaler``'s current scale: its device tensor when it has one (no host sync)."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale
    return float(scaler.get_scale())
