"""Tiny LightningModules and a ground-truth probe, for both Lightning packages.

``PACKAGES`` maps a package name to (module class, probe class); classes are module-level so that
``ddp_spawn`` can pickle them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 8


def data(n: int = 64, seed: int = 0, features: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x, y)


def loader(n: int = 64, seed: int = 0, batch_size: int = BATCH) -> DataLoader:
    return DataLoader(data(n, seed), batch_size=batch_size, shuffle=False)


def net(depth: int, act: type[nn.Module], width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def own_grad_norms(module: nn.Module) -> dict[str, float]:
    out = {}
    for name, m in module.named_modules():
        grads = [p.grad for p in m.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name] = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
            out[name] = out[name].item()
    return out


def total_grad_norm(module: nn.Module) -> float:
    grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)).item()


def _make(package: str):
    pl = importlib.import_module(package)

    class LitNet(pl.LightningModule):
        def __init__(
            self, depth=3, act=nn.Tanh, lr=0.05, blowup_step=None, fail_step=None, adam=False
        ):
            super().__init__()
            self.adam = adam
            torch.manual_seed(0)
            self.net = net(depth, act)
            self.lr = lr
            self.blowup_step = blowup_step
            self.fail_step = fail_step

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)  # never calls self(x): the callback must cope
            if self.global_step == self.blowup_step:
                loss = loss * 1e38  # times any loss scale: inf gradients, the scaler skips
            if self.global_step == self.fail_step:
                raise RuntimeError("boom")
            return loss

        def configure_optimizers(self):
            if self.adam:
                return torch.optim.Adam(self.parameters(), lr=self.lr)
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class Probe(pl.Callback):
        """Computes the true numbers itself, and reads the gradwatch callback's report."""

        def __init__(self, watched=None, out_dir: str | None = None):
            self.watched = watched
            self.out_dir = out_dir
            self.pre_clip: dict[int, float] = {}
            self.layer_norms: dict[int, dict[str, float]] = {}
            self.post_clip: dict[int, float] = {}
            self.logged: dict[int, dict] = {}
            self.hook_counts: list[int] = []
            self.losses: dict[int, list[float]] = {}  # step -> its micro-batches' losses

        def on_before_backward(self, trainer, pl_module, loss):
            self.losses.setdefault(trainer.global_step, []).append(loss.item())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.global_step
            self.pre_clip[step] = total_grad_norm(pl_module)
            self.layer_norms[step] = own_grad_norms(pl_module)
            report = self.watched.report if self.watched is not None else None
            if report is not None and report.step == step:
                self.logged[step] = report.to_dict()
            self.hook_counts.append(len(pl_module.net[0]._forward_hooks))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # The first batch end after global_step moved on: the stepped (clipped) gradients.
            # (An optimizer step pre-hook would be too early: Lightning runs the training step
            # as the closure inside optimizer.step().)
            if trainer.global_step - 1 not in self.post_clip and trainer.global_step:
                self.post_clip[trainer.global_step - 1] = total_grad_norm(pl_module)

        def on_train_end(self, trainer, pl_module):
            if self.out_dir is not None:
                Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(
                    json.dumps({"logged": self.logged, "pre_clip": self.pre_clip})
                )

    LitNet.__name__ = LitNet.__qualname__ = f"LitNet_{package.replace('.', '_')}"
    Probe.__name__ = Probe.__qualname__ = f"Probe_{package.replace('.', '_')}"
    globals()[LitNet.__name__] = LitNet
    globals()[Probe.__name__] = Probe
    return pl, LitNet, Probe


PACKAGES = {}
for _package in ("lightning.pytorch", "pytorch_lightning"):
    try:
        PACKAGES[_package] = _make(_package)
    except ImportError:
        pass
