"""Tensor parallel, sequence parallel, 2-D FSDP2 x TP, HSDP, gradient accumulation and DDP on 1, 2
and 4 CPU ranks (gloo), a Hugging Face Llama under tensor parallelism and Lightning's
ModelParallelStrategy: every figure of every layer must be the unsharded model's on the global
batch, on every rank, with one all-reduce a logging step."""

from __future__ import annotations

import json
import math
import socket
import tempfile
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import layouts

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

# Every number of a layer row that a layout could get wrong (None where the layer has none).
FIGURES = (
    "grad_norm",
    "weight_norm",
    "signal",
    "signal_norm",
    "output_elements",
    "saturation",
    "dead_units",
    "active_units",
    "units",
    "samples_per_unit",
    "attention_max_logit",
    "attention_entropy",
    "attention_entropy_min",
    "log_z_mean",
    "log_z_max",
    "logit_mean",
)
TOLERANCE = 1e-5


def run_layout(layout: str, world: int, tmp_path: Path) -> list[dict]:
    init_file = tempfile.mktemp(dir=tmp_path, prefix="pg")
    files = [tmp_path / f"rank{r}.json" for r in range(world)]
    try:
        mp.spawn(
            layouts.worker, args=(world, init_file, str(tmp_path), layout), nprocs=world, join=True
        )
    except mp.ProcessExitedException:
        # gloo's teardown on a loaded 2-core machine once killed a worker by a signal after every
        # rank had written its result (see test_distributed): the measurement was done
        if not all(f.exists() for f in files):
            raise
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def reference() -> dict:
    return layouts.reference()


def rows(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["layers"]}


def relative_errors(got: dict, want: dict) -> dict[tuple[str, str], float]:
    """(layer, figure) -> relative error of every figure the reference reports; the layers and
    which figures are reported must be the same."""
    assert list(rows(got)) == list(rows(want))
    errors = {}
    for name, row in rows(want).items():
        for figure in FIGURES:
            a, b = rows(got)[name].get(figure), row.get(figure)
            assert (a is None) == (b is None), (name, figure, a, b)
            if b is not None:
                errors[name, figure] = abs(a - b) / max(abs(b), 1e-12)
    for key in ("global_grad_norm", "input_rms", "input_absmax"):
        assert (got[key] is None) == (want[key] is None), key
        if want[key] is not None:
            errors["(step)", key] = abs(got[key] - want[key]) / abs(want[key])
    return errors


@pytest.mark.parametrize(
    ("layout", "world"),
    [
        ("accumulate", 1),
        ("ddp_accumulate", 2),
        ("tp", 2),
        ("tp_after_attach", 2),
        ("tp_dtensor", 2),
        ("sp", 2),
        ("tp", 4),
        ("fsdp_tp", 4),
        ("hsdp", 4),
    ],
)
def test_every_figure_is_the_unsharded_models(tmp_path, reference, layout, world):
    ranks = run_layout(layout, world, tmp_path)
    want = reference["report"]
    assert reference["warnings"] == []
    for result in ranks:
        errors = relative_errors(result["report"], want)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE, (worst, errors[worst], result["report"])
        assert [f["kind"] for f in result["report"]["findings"]] == [
            f["kind"] for f in want["findings"]
        ]
        assert result["warnings"] == []
        # one all-reduce a logging step (two on the first: the ranks learn each other's
        # lengths), none between them; one process has nothing to combine
        assert result["collectives"] == ([2, 0, 1, 0, 1] if world > 1 else [0] * 5)
    # the figures that needed the mesh: split heads, split units, replicas counted once
    assert rows(want)["attn.wq"]["output_elements"] == layouts.BATCH * layouts.SEQ * layouts.DIM
    assert not math.isclose(rows(want)["mlp.act"]["dead_units"], 0.0)
    assert rows(want)["pos"]["output_elements"] == layouts.SEQ * layouts.DIM  # once, not per sample


def test_a_hugging_face_llama_under_tensor_parallelism(tmp_path):
    # nobody here wrote it: rotary embeddings make the queries new tensors, no attribute names
    # the heads, and its MLP multiplies a SiLU of one split projection by another
    pytest.importorskip("transformers")
    want = layouts.llama_step(layouts.llama())["report"]
    for result in run_layout("llama_tp", 2, tmp_path):
        errors = relative_errors(result["report"], want)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE, (worst, errors[worst])
        assert result["warnings"] == []


@pytest.mark.parametrize(("world", "data_parallel"), [(2, 1), (4, 2)])
def test_lightning_model_parallel_strategy_gives_the_unsharded_figures(
    tmp_path, reference, world, data_parallel
):
    pytest.importorskip("lightning")
    from tests.helpers import lit_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        lit_parallel.worker,
        args=(world, port, data_parallel, str(tmp_path)),
        nprocs=world,
        join=True,
    )
    want = reference["report"]
    for r in range(world):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())["report"]
        for row in got["layers"]:  # the LightningModule holds the block as .block
            row["name"] = row["name"].removeprefix("block.")
        errors = relative_errors(got, want)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE, (worst, errors[worst])


def test_gpt2s_position_embedding_reads_the_same_however_the_batch_is_split():
    # the case: wpe's output is [1, T, D], added to every sample of the batch
    transformers = pytest.importorskip("transformers")
    import torch

    import gradwatch

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))

    def run(parts: int):
        with gradwatch.GradWatch(model, every_n_steps=1) as gw:
            model.zero_grad()
            for chunk in ids.chunk(parts):
                (model(input_ids=chunk, labels=chunk).loss / parts).backward()
            return gw.step().layers

    whole, split = run(1), run(4)
    for name in ("transformer.wpe", "transformer.wte", "transformer.h.0.attn.c_attn"):
        assert split[name].signal == pytest.approx(whole[name].signal, rel=1e-5), name
        assert split[name].output_elements == whole[name].output_elements, name
    assert whole["transformer.wpe"].output_elements == 16 * 32  # once, not once per sample
