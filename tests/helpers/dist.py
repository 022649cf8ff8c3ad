"""Workers for the multi-process tests: two CPU ranks over gloo, each writing its report as JSON.

A rank's batch is half of a global batch; the reference is one process training on the whole
global batch, which DDP and FSDP (mean loss, averaged gradients) must reproduce exactly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gradwatch

WORLD = 2
PER_RANK = 8


class Net(nn.Module):
    """An identity gate with a ReLU whose units are alive on one rank's half of the batch only,
    then functional tanh and GELU layers (functional entries must line up across ranks)."""

    def __init__(self, extra_on_rank: int | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.hidden = nn.Linear(4, 16)
        self.body = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)
        self.extra_on_rank = extra_on_rank
        with torch.no_grad():
            self.gate.weight.copy_(torch.eye(4))
            self.gate.bias.zero_()

    def forward(self, x):
        h = self.relu(self.gate(x))
        h = torch.tanh(self.hidden(h))
        if self.extra_on_rank is not None and dist.get_rank() == self.extra_on_rank:
            h = torch.sigmoid(h)  # a layer only this rank sees: layouts differ
        h = F.gelu(self.body(h))
        return self.out(h)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's half: only input feature r is positive, so ReLU unit r is alive on rank r only;
    rank 1's inputs are 5x larger, so the global max |x| comes from rank 1."""
    g = torch.Generator().manual_seed(100 + rank)
    x = -torch.rand(PER_RANK, 4, generator=g) - 0.1
    x[:, rank] = torch.rand(PER_RANK, generator=g) + 0.1
    x = x * (1 + 4 * rank)
    y = torch.randint(0, 3, (PER_RANK,), generator=g)
    return x, y


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(r) for r in range(WORLD)))
    return torch.cat(xs), torch.cat(ys)


def make_net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs)


def worker(rank: int, init_file: str, out_dir: str, scenario: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = SCENARIOS[scenario](rank, Path(out_dir))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def _one_step(model, watched, rank, log_dir=None, steps=1, every=1, **kwargs) -> dict:
    """``steps`` steps on the same batch (no update between them), logging every ``every``-th:
    the first report, and the others under "later"."""
    x, y = batch(rank)
    if kwargs.pop("nan_on_rank", None) == rank:
        x[0, 0] = float("nan")
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(watched, log_dir=log_dir, every_n_steps=every, **kwargs)
        for _ in range(steps):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if (report := gw.step()) is not None:
                reports.append(report.to_dict())
        gw.close()
    return {
        "report": reports[0],
        "later": reports[1:],
        "warnings": [str(w.message) for w in caught if w.category is gradwatch.GradWatchWarning],
    }


def _ddp(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    return _one_step(model, model, rank, log_dir=str(out / "tb"))


def _ddp_compiled(rank: int, out: Path, backend: str = "aot_eager") -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    # fullgraph: the signal reaches the ranks' sum from the compiled backward's accumulators
    compiled = torch.compile(model.module, fullgraph=True, backend=backend)
    model.module = compiled  # DDP's own hooks stay outside the graph; gradwatch's are inside
    return _one_step(model, model, rank, steps=2)


def _ddp_curvature(rank: int, out: Path, wrapped: bool = False) -> dict:
    """Three SGD steps with the curvature probe on every one, its loss on the rank's own batch
    through the unwrapped module (no all-reduce), or through DDP itself (``wrapped``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    x, y = batch(rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    through = model if wrapped else model.module
    curvatures = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(
            model,
            every_n_steps=1,
            curvature_every=1,
            curvature_loss=lambda: F.cross_entropy(through(x), y),
        )
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            report = gw.step(optimizer=opt)
            curvatures.append(report.curvature.to_dict() if report.curvature else None)
            opt.step()
            opt.zero_grad()
        gw.close()
    return {
        "curvatures": curvatures,
        "weights": [p.detach().sum().item() for p in model.parameters()],
        "warnings": [str(w.message) for w in caught if w.category is gradwatch.GradWatchWarning],
    }


def _sharded(model: nn.Module) -> nn.Module:
    """``make_net()``'s model under FSDP2: each block sharded, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in (model.gate, model.hidden, model.body, model.out):
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp(rank: int, out: Path) -> dict:
    model = _sharded(make_net())
    # the second step carries the first one's weight norms: no weight pieces in the collective
    return _one_step(model, model, rank, steps=2, weight_norm_every=2)


def _fsdp_compiled(rank: int, out: Path) -> dict:
    model = _sharded(make_net())
    compiled = torch.compile(model, backend="aot_eager")
    return _one_step(compiled, model, rank, steps=2, weight_norm_every=2)


def _fsdp_hooks_off_between_logging_steps(rank: int, out: Path) -> dict:
    model = _sharded(make_net())
    # logging steps 0 and 4: gradwatch's hooks come off after step 0, beside FSDP's own, and go
    # back on (after them) for step 4
    return _one_step(model, model, rank, steps=5, every=4)


def _fsdp_attached_before_sharding(rank: int, out: Path) -> dict:
    model = make_net()
    x, y = batch(rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(model, every_n_steps=1)
        _sharded(model)  # replaces the parameters gradwatch saw at attach time
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
        gw.close()
    return {"report": report.to_dict(), "warnings": []}


def _fsdp_local(rank: int, out: Path) -> dict:
    model = _sharded(make_net())
    return _one_step(model, model, rank, sync_dist=False)


def _ddp_layouts_differ(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net(extra_on_rank=1))
    return _one_step(model, model, rank)


def _ddp_nan_on_one_rank(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    return _one_step(model, model, rank, nan_on_rank=1)


class AttentionNet(nn.Module):
    """Causal self-attention (two heads) over short sequences, then an output head whose log Z
    is measured: the attention and log Z statistics must combine over ranks exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 48)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in self.qkv(x).split(16, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).reshape(b, t, 16))


def attention_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 1's inputs are 3x larger: its logits hold the global largest."""
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(4, 6, 8, generator=g) * (1 + 2 * rank)
    return x, torch.randint(0, 3, (4, 6), generator=g)


def attention_step(model, watched, x, y) -> dict:
    """One Adam-watched step of AttentionNet on (x, y): its report as a dict."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(watched, every_n_steps=1) as gw:
            loss = F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
            loss.backward()
            return gw.step(opt, loss=loss).to_dict()


def _ddp_attention(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(AttentionNet())
    return {"report": attention_step(model, model, *attention_batch(rank))}


def _fsdp_attention(rank: int, out: Path) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = AttentionNet()
    fully_shard(model)
    return {"report": attention_step(model, model, *attention_batch(rank))}


def _ddp_loss_on_rank0(rank: int, out: Path) -> dict:
    """Only rank 0 gives its loss: the losses are each rank's own, so the rest still combines."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    x, y = batch(rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1) as gw:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            report = gw.step(loss=loss if rank == 0 else None)
    return {"report": report.to_dict(), "loss": loss.item()}


SCENARIOS = {
    "ddp_loss_on_rank0": _ddp_loss_on_rank0,
    "ddp_attention": _ddp_attention,
    "fsdp_attention": _fsdp_attention,
    "ddp_curvature": _ddp_curvature,
    "ddp_curvature_wrapped": lambda rank, out: _ddp_curvature(rank, out, wrapped=True),
    "ddp": _ddp,
    "ddp_compiled": _ddp_compiled,
    "ddp_inductor": lambda rank, out: _ddp_compiled(rank, out, backend="inductor"),
    "fsdp": _fsdp,
    "fsdp_compiled": _fsdp_compiled,
    "fsdp_local": _fsdp_local,
    "fsdp_attached_before_sharding": _fsdp_attached_before_sharding,
    "fsdp_hooks_off_between_logging_steps": _fsdp_hooks_off_between_logging_steps,
    "ddp_layouts_differ": _ddp_layouts_differ,
    "ddp_nan_on_one_rank": _ddp_nan_on_one_rank,
}
