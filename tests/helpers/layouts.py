"""Workers for the parallel-layout tests: a small transformer block trained one step on 2 or 4
CPU ranks over gloo under each layout, every rank writing its report as JSON.

Every layout must report what one process reports for the same model, unsharded, on the global
batch: ranks of a tensor-parallel mesh get the same samples (sequence parallelism: the same
samples, each rank a slice of the sequence), ranks that differ in any other mesh dimension get
their share of the global batch.
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

BATCH, SEQ, DIM, HEADS, CLASSES = 8, 6, 16, 4, 4


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # no attribute names its heads: under tensor parallelism that they are split follows
        # from the query being computed from a split projection
        self.wq, self.wk, self.wv = (nn.Linear(DIM, DIM) for _ in range(3))
        self.wo = nn.Linear(DIM, DIM)
        with torch.no_grad():  # the last head attends sharply: heads differ, split or not
            self.wq.weight[-DIM // HEADS :] *= 6

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            w(x).view(b, t, -1, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        y = F.scaled_dot_product_attention(q * 1.5, k, v, is_causal=True)  # q * 1.5: no view
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, 4 * DIM)
        self.act = nn.ReLU()
        self.w2 = nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals, then an output head over the classes. ReLU
    units are dead on part of the batch only, so dead units need every rank's samples. The
    position embedding's output is shared by every sample: its signal is that of the whole
    batch, however the batch is split."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(SEQ, DIM)  # its output is every sample's: batch size 1
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn, self.mlp = Attention(), MLP()
        self.head = nn.Linear(DIM, CLASSES)
        with torch.no_grad():
            self.mlp.w1.bias.sub_(0.6)  # some units dead on some samples

    def forward(self, x):
        x = x + plain(self.attn(self.norm1(x)))  # norm1 reads the input itself (see sp)
        x = x + plain(self.pos(torch.arange(SEQ)[None]))
        x = x + plain(self.mlp(self.norm2(x)))
        return plain(self.head(x))


def plain(t):
    """A DTensor output (``use_local_output=False``) as the plain tensor the residual adds."""
    return t.to_local() if hasattr(t, "to_local") else t


def make_block() -> Block:
    torch.manual_seed(0)
    return Block()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randint(
        0, CLASSES, (BATCH, SEQ), generator=g
    )


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1))


def reference() -> dict:
    """One process, the unsharded model, the global batch."""
    model = make_block()
    return _step(model, model, *global_batch(), steps=1)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "barrier")


def _step(model, watched, x, y, micro_batches: int = 1, steps: int = 5, then=None) -> dict:
    """``steps`` steps on the same batch without an update, logging every other one: the first
    report, and how many collectives each ``gw.step()`` made; ``then()`` runs right after
    attaching (a model split after ``GradWatch(model)``)."""
    calls = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    reports, counts = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(watched, every_n_steps=2) as gw:
            if then is not None:
                then()
            for _ in range(steps):
                model.zero_grad()
                for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                    loss = loss_of(model(xs), ys) / micro_batches
                    loss.backward()
                calls.clear()
                for name in COLLECTIVES:
                    setattr(dist, name, counting(name))
                try:
                    report = gw.step(loss=loss)
                finally:
                    for name, original in originals.items():
                        setattr(dist, name, original)
                counts.append(len(calls))
                if report is not None:
                    reports.append(report.to_dict())
    return {
        "report": reports[0],
        "collectives": counts,
        "warnings": [str(w.message) for w in caught if w.category is gradwatch.GradWatchWarning],
    }


def tp_plan(local_mlp: bool = True, sequence: bool = False) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    if not sequence:
        return {
            **{f"attn.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")},
            "attn.wo": RowwiseParallel(),
            "mlp.w1": ColwiseParallel(use_local_output=local_mlp),
            "mlp.w2": RowwiseParallel(use_local_output=local_mlp),
        }
    # sequence parallel, as torchtitan lays out a block: norms and residuals hold a slice of the
    # sequence, projections gather it, the head hands every rank the whole logits
    return {
        "pos": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm1": SequenceParallel(),
        "norm2": SequenceParallel(),
        **{f"attn.{w}": ColwiseParallel(input_layouts=Shard(1)) for w in ("wq", "wk", "wv")},
        "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
        "mlp.w1": ColwiseParallel(input_layouts=Shard(1)),
        "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
        "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


def _layout(rank: int, world: int, layout: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    x, y = global_batch()
    model = make_block()
    if layout == "tp_after_attach":  # parallelize_module after GradWatch(model)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        return _step(model, model, x, y, then=lambda: parallelize_module(model, mesh, tp_plan()))
    if layout in ("tp", "tp_dtensor", "sp"):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, tp_plan(layout != "tp_dtensor", layout == "sp"))
        if layout == "sp":  # this rank's slice of the sequence
            x = x.chunk(world, dim=1)[rank]
        return _step(model, model, x, y)
    if layout == "fsdp_tp":  # 2 x 2: data parallel over the rows, tensor parallel in each row
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan())
        fully_shard(model.attn, mesh=mesh["dp"])
        fully_shard(model.mlp, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        part = mesh["dp"].get_local_rank()
        x, y = x.chunk(2)[part], y.chunk(2)[part]
        return _step(model, model, x, y)
    if layout == "hsdp":  # replicate x shard: every rank its own quarter of the batch
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.attn, mesh=mesh)
        fully_shard(model.mlp, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return _step(model, model, x.chunk(world)[rank], y.chunk(world)[rank])
    if layout == "llama_tp":
        model = llama()
        parallelize_module(model, init_device_mesh("cpu", (world,)), llama_plan())
        return llama_step(model)
    if layout == "accumulate":  # one process, four micro-batches
        return _step(model, model, x, y, micro_batches=4)
    if layout == "ddp_accumulate":  # DDP, each rank two micro-batches of its half
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        return _step(ddp, ddp, x.chunk(world)[rank], y.chunk(world)[rank], micro_batches=2)
    raise ValueError(layout)


def llama():
    """A Hugging Face Llama, random init, grouped-query attention with rotary embeddings; one
    head of each layer sharpened (its attention statistics differ from the others')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[16:24] *= 8
    return model


def llama_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(2):
        prefix = f"model.layers.{i}"
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[f"{prefix}.{name}"] = ColwiseParallel()
        plan[f"{prefix}.self_attn.o_proj"] = plan[f"{prefix}.mlp.down_proj"] = RowwiseParallel()
    return plan


def llama_step(model) -> dict:
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1) as gw:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            report = gw.step(loss=loss)
    return {
        "report": report.to_dict(),
        "warnings": [str(w.message) for w in caught if w.category is gradwatch.GradWatchWarning],
    }


def worker(rank: int, world: int, init_file: str, out_dir: str, layout: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _layout(rank, world, layout)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
