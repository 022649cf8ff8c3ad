"""gradwatch in a Hugging Face Trainer: a small GPT-2 trained at a learning rate too high for it.

A character-level language model learns this very file. At a learning rate of 3e-2 with Adam and
no weight decay, nothing holds the query and key projections back: the attention logits grow
step after step, the heads' attention turns one-hot, and gradwatch names the layer and the fixes
(qk-layernorm, QK-clip, a lower learning rate). ``--lr 3e-3`` trains the same model quietly.

python examples/hf_trainer.py                 # TensorBoard: tensorboard --logdir runs/hf/runs
python examples/hf_trainer.py --lr 3e-3
python examples/hf_trainer.py --steps 60 --out none
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

try:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
except ImportError:
    raise SystemExit(
        'this example needs Hugging Face transformers: pip install -e ".[hf]"'
    ) from None

from gradwatch import GradWatchTrainerCallback

CONTEXT = 32


def characters(seed: int = 0, samples: int = 4096) -> tuple[list[dict], int]:
    """Windows of this file's bytes, each a causal-LM sample (labels = inputs)."""
    text = torch.tensor(list(Path(__file__).read_bytes()))
    vocab = int(text.max()) + 1
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - CONTEXT, (samples,), generator=g)
    windows = torch.stack([text[s : s + CONTEXT] for s in starts.tolist()])
    return [{"input_ids": w, "labels": w} for w in windows], vocab


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/hf", help='Trainer output dir ("none": a temporary one)')
    a = p.parse_args(argv)

    data, vocab = characters()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=CONTEXT,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    out = tempfile.mkdtemp() if a.out == "none" else a.out
    args = TrainingArguments(
        out, per_device_train_batch_size=16, max_steps=a.steps, learning_rate=a.lr,
        adam_beta2=0.95, weight_decay=0.0, warmup_steps=0, lr_scheduler_type="constant",
        logging_steps=5, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    callback = GradWatchTrainerCallback()  # measures the steps the Trainer logs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="transformers|accelerate|torch")
        trainer = Trainer(
            model=GPT2LMHeadModel(config), args=args, train_dataset=data, callbacks=[callback]
        )
        trainer.train()
    report = callback.report
    print(report)
    return report


if __name__ == "__main__":
    main()
