"""A tiny random-init GPT-2 trained by the Hugging Face Trainer on CPU, with or without the
gradwatch callback, in one process or as one rank of several (gloo)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

SEQ, VOCAB = 12, 50


def data(n: int = 32) -> list[dict]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def train(callback, out: str | Path, world: int = 1, **overrides):
    """Train for a few steps (4 samples a step in all, two micro-batches, clipping at a norm
    below every step's): the Trainer and the model."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    settings = dict(
        per_device_train_batch_size=4 // world, gradient_accumulation_steps=2, max_steps=6,
        logging_steps=2, learning_rate=1e-3, max_grad_norm=0.05, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, disable_tqdm=True, train_sampling_strategy="sequential",
    )  # fmt: skip
    settings.update(overrides)
    if world > 1:
        settings["ddp_backend"] = "gloo"
    args = TrainingArguments(str(out), **settings)
    callbacks = [callback] if callback is not None else []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="transformers|accelerate|torch")
        trainer = Trainer(model=model, args=args, train_dataset=data(), callbacks=callbacks)
        trainer.train()
    return trainer, model


def worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a DDP Trainer run: its report and the Trainer's log, as JSON."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from gradwatch import GradWatchTrainerCallback

    callback = GradWatchTrainerCallback()
    trainer, _ = train(callback, out, world=world, max_steps=4)
    result = {"report": callback.report.to_dict(), "log": trainer.state.log_history}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
