"""A small pre-LN transformer language model on real text (a frozen copy of this project's usage
and rules pages, by character),
for the transformer instabilities: attention through ``F.scaled_dot_product_attention``, optional
qk-layernorm, an ``lm_head``."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.md"


def corpus() -> tuple[torch.Tensor, int]:
    """The text as character ids, and the vocabulary size (frozen: the docs keep changing)."""
    text = CORPUS.read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        norm = (lambda: nn.LayerNorm(width // heads)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width=64, heads=4, layers=2, context=32, qk_norm=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, qk_norm) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln(x))


def train_lm(
    steps: int,
    lr: float,
    qk_norm: bool = False,
    every: int = 10,
    batch: int = 16,
    context: int = 32,
    seed: int = 0,
    **options,
) -> tuple[list[gradwatch.Report], list[float]]:
    """AdamW (beta2 0.95, no weight decay) on the docs; the reports of the logging steps and
    every step's loss. Findings do not warn."""
    data, vocab = corpus()
    torch.manual_seed(seed)
    model = TinyLM(vocab, context=context, qk_norm=qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def loss_of(step: int) -> torch.Tensor:
        start = torch.randint(0, len(data) - context - 1, (batch,))
        x = torch.stack([data[s : s + context] for s in start])
        y = torch.stack([data[s + 1 : s + context + 1] for s in start])
        return F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))

    return watched_run(model, opt, loss_of, steps, every_n_steps=every, **options)


def watched_run(
    model: nn.Module, opt: torch.optim.Optimizer, loss_of, steps: int, **options
) -> tuple[list[gradwatch.Report], list[float]]:
    """``steps`` steps of ``loss_of(step) -> loss``, ``gw.step(opt, loss=loss)`` before each
    optimizer step; the reports of the logging steps and every step's loss (findings do not
    warn)."""
    reports, losses = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, **options) as gw:
            for step in range(steps):
                loss = loss_of(step)
                opt.zero_grad()
                loss.backward()
                report = gw.step(opt, loss=loss)
                opt.step()
                losses.append(loss.item())
                if report is not None:
                    reports.append(report)
    return reports, losses
