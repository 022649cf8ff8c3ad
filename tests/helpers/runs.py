"""Whole training runs of a few hundred steps, healthy and broken, for the diagnosis over time.

Each run trains on data it makes (or the repository's own text) and returns every report a
``GradWatch`` produced, so tests can assert what was found at each logging step."""

import glob
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def train(
    model,
    optimizer,
    batches,
    steps,
    every=1,
    scheduler=None,
    on_step=None,
    watch_optimizer=False,
    **watch,
):
    """Plain loop: forward, backward, ``gw.step(loss=loss)``, optimizer step (or optimizer mode,
    which reads the learning rate); the reports by step. Stops at the first non-finite loss (after
    measuring that step)."""
    reports = {}
    mode = {"optimizer": optimizer} if watch_optimizer else {}
    with GradWatch(model, every_n_steps=every, warn=False, **mode, **watch) as gw:
        for step in range(steps):
            if on_step is not None:
                on_step(step, optimizer)
            loss = batches(model, step)
            optimizer.zero_grad()
            loss.backward()
            report = None if watch_optimizer else gw.step(loss=loss)
            optimizer.step()
            if watch_optimizer and gw.report is not None and gw.report.step == step:
                report = gw.report
            if scheduler is not None:
                scheduler.step()
            if report is not None:
                reports[step] = report
            if not math.isfinite(loss.item()):
                break
    return reports


def kinds(reports, kind=None):
    """Step -> the finding kinds of that step (only ``kind`` when given), steps with any only."""
    out = {}
    for step, r in reports.items():
        found = [f.kind for f in r.findings if kind is None or f.kind == kind]
        if found:
            out[step] = found
    return out


def minibatches(x, y, seed, size=32):
    """A ``batches`` function for :func:`train`: cross-entropy on ``size`` random rows."""
    g = torch.Generator().manual_seed(seed)

    def batch(m, step):
        i = torch.randint(0, len(x), (size,), generator=g)
        return F.cross_entropy(m(x[i]), y[i])

    return batch


# -- healthy runs --------------------------------------------------------------------------------


def mlp_adam(steps=300, every=1, seed=0, **watch):
    torch.manual_seed(seed)
    x, w = torch.randn(512, 20), torch.randn(20, 3)
    y = (x @ w).argmax(1)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return train(model, opt, minibatches(x, y, seed), steps, every, **watch)


def bn_cnn_one_cycle(steps=300, every=1, seed=0, **watch):
    torch.manual_seed(seed)
    x = torch.randn(256, 3, 12, 12)
    y = (x[:, 0, :6].mean((1, 2)) > x[:, 1, 6:].mean((1, 2))).long() + 2 * (
        x[:, 2].mean((1, 2)) > 0
    )
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=steps)
    return train(model, opt, minibatches(x, y, seed), steps, every, scheduler=sched, **watch)


def repo_bytes():
    """The repository's own docs as training text (always there, no download)."""
    paths = sorted(glob.glob(str(ROOT / "docs" / "*.md"))) + [str(ROOT / "README.md")]
    return torch.tensor(list(b"".join(open(p, "rb").read() for p in paths)), dtype=torch.long)


class ByteLM(nn.Module):
    """A small pre-norm transformer language model over bytes."""

    def __init__(self, d=64, layers=2, context=64, norm_first=True):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))


def byte_lm(steps=300, every=1, seed=0, lr=3e-3, warmup=50, on_step=None, **watch):
    """The byte LM with AdamW and linear warm-up over ``warmup`` steps (None: a constant rate);
    ``on_step(step, optimizer)`` may break it."""
    torch.manual_seed(seed)
    data = repo_bytes()
    model = ByteLM()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = None
    if warmup is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    batch = byte_batches(data, seed, context=64, size=16)
    return train(model, opt, batch, steps, every, scheduler=sched, on_step=on_step, **watch)


def byte_batches(data, seed, context, size):
    """A ``batches`` function for :func:`train`: next-byte cross-entropy on ``size`` random
    windows of ``context`` bytes."""
    g = torch.Generator().manual_seed(seed)

    def batch(m, step):
        i = torch.randint(0, len(data) - context - 1, (size,), generator=g)
        xb = torch.stack([data[j : j + context] for j in i])
        yb = torch.stack([data[j + 1 : j + context + 1] for j in i])
        return F.cross_entropy(m(xb).reshape(-1, 256), yb.reshape(-1))

    return batch


class SeqClassifier(nn.Module):
    def __init__(self, cell=nn.LSTM, d_in=8, hidden=32, classes=4, **kw):
        super().__init__()
        self.rnn = cell(d_in, hidden, batch_first=True, **kw)
        directions = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(directions * hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequence_classifier(
    cell=nn.LSTM, length=30, steps=300, every=1, seed=0, hidden=32, watch_optimizer=False, **kw
):
    """A recurrent classifier whose label needs every time step (the sign of a sum over the
    whole sequence) and the last five; the loss is on the last output."""
    torch.manual_seed(seed)
    x = torch.randn(256, length, 8)
    y = (x[:, :, 0].sum(1) > 0).long() + 2 * (x[:, -5:, 1].sum(1) > 0)
    model = SeqClassifier(cell, hidden=hidden, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return train(model, opt, minibatches(x, y, seed), steps, every, watch_optimizer=watch_optimizer)


def lstm(steps=300, every=1, seed=0, length=30, watch_optimizer=False):
    return sequence_classifier(nn.LSTM, length, steps, every, seed, watch_optimizer=watch_optimizer)


HEALTHY_RUNS = {
    "relu mlp, adam": mlp_adam,
    "bn cnn, one-cycle sgd": bn_cnn_one_cycle,
    "pre-norm transformer lm, adamw with warm-up": byte_lm,
    "lstm, adam": lstm,
}


# -- diverging runs --------------------------------------------------------------------------------


def relu_regression_sgd(lr=10.0, steps=6, seed=0):
    """A ReLU MLP regressed with plain SGD at a learning rate far past stable."""
    torch.manual_seed(seed)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return train(model, opt, lambda m, s: F.mse_loss(m(x), y), steps)


class NoNormBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(x)))


def no_norm_transformer(lr=1.0, steps=3, d=64, layers=24, seed=0):
    """A byte-level transformer of ``layers`` residual blocks without layer norm, AdamW at
    ``lr``, in optimizer mode (the update size is measured)."""
    torch.manual_seed(seed)
    data = repo_bytes()
    model = nn.Sequential(
        nn.Embedding(256, d), *[NoNormBlock(d) for _ in range(layers)], nn.Linear(d, 256)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = byte_batches(data, seed, context=32, size=8)
    return train(model, opt, batch, steps, 1, watch_optimizer=True)


def linear_regression_past_stability(
    factor=2.3, steps=400, seed=1, features=20, curvature=False, **watch
):
    """Full-batch gradient descent on least squares at ``lr = factor / lambda_max``: above 2 the
    component along the top eigenvector grows by ``factor - 1`` per step. Returns the reports and
    the first step whose loss was not finite (None if every one was). ``curvature``: the probe
    on every logging step (in optimizer mode, which gives it the optimizer)."""
    torch.manual_seed(seed)
    x = torch.randn(256, features) * torch.linspace(0.2, 3, features)
    y = x @ torch.randn(features, 1) + 0.1 * torch.randn(256, 1)
    lam = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()  # Hessian of the mean square
    model = nn.Linear(features, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=factor / lam)
    if curvature:
        watch.update(curvature_every=1, curvature_loss=lambda: F.mse_loss(model(x), y))
    reports = train(
        model, opt, lambda m, s: F.mse_loss(m(x), y), steps, watch_optimizer=curvature, **watch
    )
    last = max(reports)
    return reports, (last if not math.isfinite(reports[last].global_grad_norm) else None)


# -- the edge of stability and the catapult ---------------------------------------------------------


def full_batch_tanh(
    lr=0.25, steps=1500, every=10, seed=0, width=64, depth=2, momentum=0.0, adam=False
):
    """Full-batch gradient descent on a tanh MLP regressing one-hot labels of random inputs
    (MSE): the sharpness rises to the optimizer's limit (2/lr for plain GD) and hovers there
    while the loss keeps falling (Cohen et al. 2021). The curvature is measured on every
    logging step. Returns every report."""
    torch.manual_seed(seed)
    x = torch.randn(256, 32)
    y = F.one_hot(torch.randint(0, 10, (256,)), 10).float()
    layers, d = [], 32
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, 10))
    if adam:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def loss(m):
        return F.mse_loss(m(x), y, reduction="sum") / (2 * len(x))

    watch = {"curvature_every": 1, "curvature_loss": lambda: loss(model)}
    return _train_with_curvature(model, opt, loss, steps, every, watch)


def wide_relu_catapult(factor=3.0, steps=150, every=1, seed=0, width=512):
    """A wide two-layer ReLU net on random regression, full batch, at ``factor`` over its
    initial sharpness: between 2 and about 4 the loss spikes once while the sharpness drops
    below 2/lr, then it converges (Lewkowycz et al. 2020). Returns (reports, initial sharpness)."""
    from gradwatch.step.curvature import CurvatureProbe

    torch.manual_seed(seed)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 1))

    def loss(m):
        return F.mse_loss(m(x), y) / 2

    sharpness = CurvatureProbe(1, lambda: loss(model)).measure(model, None).top_eigenvalue
    opt = torch.optim.SGD(model.parameters(), lr=factor / sharpness)
    watch = {"curvature_every": 1, "curvature_loss": lambda: loss(model)}
    return _train_with_curvature(model, opt, loss, steps, every, watch), sharpness


def _train_with_curvature(model, opt, loss, steps, every, watch):
    """:func:`train` in optimizer mode, which gives the curvature probe the optimizer."""
    return train(model, opt, lambda m, s: loss(m), steps, every, watch_optimizer=True, **watch)


def small_init_relu():
    """A ReLU MLP (8 hidden layers of 64) at a tenth of PyTorch's default scale, full batch, SGD:
    the init audit speaks on its first logging step, and the chain vanishes."""
    from . import zoo

    torch.manual_seed(0)
    model = zoo.mlp(nn.ReLU, depth=8, width=64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, lambda m, s: F.cross_entropy(m(x), y)
