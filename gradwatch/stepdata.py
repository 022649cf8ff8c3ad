"""One logging step's data on its way to the host: a declared list of fields, each with its name,
its device tensor and how ranks combine it. The distributed reduction and the one host copy both
walk that list, so adding a statistic means adding one field.

How ranks combine a field (``across``):

- ``SUM``: add (element counts, per-unit flat counts, sums of squares). Exact in fp64.
- ``NORM``: the tensor holds L2 norms of parts of a whole spread over the ranks: the result is
  ``sqrt(sum over ranks of norm**2 / copies)``. ``copies[i]`` says how many ranks hold the same
  part (a replicated FSDP shard); ``copies[i] == 0`` marks a norm every rank already agrees on
  (a DDP gradient), which is left alone.
- ``MAX``: the largest value (one element: the input's absmax).
- ``NONE``: each rank keeps its own (the loss scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributed import local_shard, sum_across_ranks
from .stats import norms

SUM, NORM, MAX, NONE = "sum", "norm", "max", "none"


@dataclass
class Field:
    """A named device tensor of the step, how ranks combine it, and whether the host reads it."""

    name: str
    tensor: torch.Tensor
    across: str
    copies: list[int] | None = None  # NORM only, needed when ranks combine
    to_host: bool = True


@dataclass
class StepData:
    """The fields of one step, in the order they were added."""

    fields: dict[str, Field] = field(default_factory=dict)

    def add(
        self,
        name: str,
        tensor: torch.Tensor | None,
        across: str,
        copies: list[int] | None = None,
        to_host: bool = True,
    ) -> None:
        """Add a field (nothing when ``tensor`` is None: the step has no such data)."""
        if tensor is not None:
            self.fields[name] = Field(name, tensor, across, copies, to_host)

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def tensor(self, name: str) -> torch.Tensor:
        return self.fields[name].tensor

    def combine_across_ranks(self, layout: tuple) -> bool:
        """Combine every field over the ranks of the default process group, in place: one SUM
        all-reduce of one flat fp64 vector, and the MAX in the header exchange. Ranks whose
        ``layout`` (and fields) differ keep their own numbers: returns False then."""
        parts, places = [], []
        absmax = None
        for f in self.fields.values():
            if f.across == MAX:
                assert absmax is None and f.tensor.numel() == 1, "one MAX field of one element"
                absmax = f
            elif f.across == SUM:
                parts.append(f.tensor.reshape(-1).double())
                places.append((f, None))
            elif f.across == NORM:
                assert f.copies is not None, f"NORM field {f.name!r} combined without copies"
                index = [i for i, c in enumerate(f.copies) if c]
                if not index:
                    continue
                copies = torch.tensor(
                    [float(f.copies[i]) for i in index],
                    dtype=torch.float64,
                    device=f.tensor.device,
                )
                parts.append(f.tensor[index].double().square() / copies)
                places.append((f, index))
        device = next(iter(self.fields.values())).tensor.device
        payload = (
            torch.cat([p.to(device) for p in parts])
            if parts
            else torch.zeros(0, dtype=torch.float64, device=device)
        )
        key = (layout, tuple((f.name, f.tensor.numel()) for f, _ in places))
        summed, top = sum_across_ranks(payload, repr(key), absmax.tensor if absmax else None)
        if summed is None:
            return False
        if absmax is not None and top is not None:
            absmax.tensor = top.reshape(1).to(absmax.tensor)
        out = iter(torch.split(summed, [p.numel() for p in parts]))
        for f, index in places:
            value = next(out)
            if index is None:  # SUM
                f.tensor = value.reshape(f.tensor.shape)
            else:
                f.tensor[index] = value.sqrt().to(f.tensor.dtype)
        return True

    def to_host(self) -> dict[str, list[float]]:
        """The fields the host reads, by name, in one device-to-host copy."""
        wanted = [f for f in self.fields.values() if f.to_host and f.tensor.numel()]
        if not wanted:
            return {}
        device = wanted[0].tensor.device
        flat = [f.tensor.reshape(-1) for f in wanted]
        # cat promotes to the widest dtype: fp32 values reach the host exactly
        values = (
            flat[0].cpu().tolist()
            if len(flat) == 1
            else torch.cat([t.to(device) for t in flat]).cpu().tolist()
        )
        out, pos = {}, 0
        for f, t in zip(wanted, flat):
            out[f.name] = values[pos : pos + t.numel()]
            pos += t.numel()
        return out


def weight_norms(params: list[torch.Tensor], combine: bool) -> list[float]:
    """Each parameter's L2 norm on the host, read now (one copy); ``combine``: over the ranks,
    FSDP shards put together (every rank must call it then)."""
    parts = [local_shard(p) for p in params]
    with torch.no_grad():
        values = norms([t for t, _ in parts])
    data = StepData()
    data.add("weight", values, NORM, copies=[c for _, c in parts])
    if combine:
        data.combine_across_ranks(("weights", len(parts)))
    return data.to_host().get("weight", [])
