"""What gradwatch costs a training step, against no monitoring and against the alternatives.

python benchmarks/overhead.py                 # the full run (about 20 minutes on 2 CPU cores)
python benchmarks/overhead.py --quick --json  # the smoke test the test suite runs

Every variant trains the same model on the same fixed synthetic batch (forward, backward, SGD
step). Rounds are interleaved and their order shuffled; each round times every variant for
``--steps`` steps after a warm-up, and the ratio to "none" is taken within the round. The table
gives the median ratio and its spread (min..max) over rounds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.measure import stats as gwstats

# -- models ----------------------------------------------------------------------------------------


def deep_mlp(quick: bool):
    width, depth, batch = (64, 8, 32) if quick else (256, 20, 128)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    return model, lambda m: F.cross_entropy(m(x), y)


def small_cnn(quick: bool):
    size, batch = (16, 8) if quick else (32, 64)
    blocks: list[nn.Module] = []
    c = 3
    for out in (16, 32, 32, 64):
        blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return model, lambda m: F.cross_entropy(m(x), y)


def transformer(quick: bool):
    d, seq, batch = (32, 16, 4) if quick else (128, 64, 16)
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False))
    head = nn.Linear(d, 10)
    model.append(head)
    x, y = torch.randn(batch, seq, d), torch.randint(0, 10, (batch, seq))
    return model, lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())


class _LSTM(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(32, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm(quick: bool):
    hidden, seq, batch = (32, 10, 4) if quick else (256, 100, 32)
    model = _LSTM(hidden)
    x, y = torch.randn(batch, seq, 32), torch.randint(0, 10, (batch,))
    return model, lambda m: F.cross_entropy(m(x), y)


def mlp_1000(quick: bool):
    depth, batch = (100, 16) if quick else (1000, 128)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(64, 64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    return model, lambda m: F.cross_entropy(m(x), y)


MODELS = {
    "deep sigmoid MLP": deep_mlp,
    "small CNN": small_cnn,
    "transformer": transformer,
    "LSTM": lstm,
}

# -- variants --------------------------------------------------------------------------------------
# A variant is set up once per (model, round) and returns (step_hook, teardown), or (step_hook,
# teardown, drain). step_hook runs after backward and before the optimizer step; drain, timed
# with the steps, waits for work a variant left on another thread (gradwatch's worker).


def v_none(model, logdir):
    return (lambda step: None), (lambda: None)


def v_gradwatch(every: int, background: bool | str = "auto"):
    def make(model, logdir):
        gw = gradwatch.GradWatch(
            model, log_dir=logdir, every_n_steps=every, warn=False, background=background
        )
        return (lambda step: gw.step()), gw.close, (lambda: gw.report)  # the report waits

    return make


def v_floor(model, logdir):
    """Hand-written minimum: fused per-parameter norms, one reduction per activation output,
    one host copy per step. No names, no diagnosis, no output."""
    acts = [m for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.ReLU, nn.Tanh, nn.GELU))]
    sums: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda m, a, out: sums.append(out.detach().abs().sum()))
        for m in acts
    ]
    params = [p for p in model.parameters()]

    def step(_):
        norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
        torch.cat([torch.stack(norms), torch.stack(sums) if sums else torch.zeros(0)]).tolist()
        sums.clear()

    def teardown():
        for h in handles:
            h.remove()

    return step, teardown


def v_statistics(model, logdir):
    """gradwatch's own statistics, hand-written with its kernels and nothing else: per-unit flat
    counts of every activation module's output, the norm of the gradient reaching each
    parameterised module's output (a tensor hook), fused per-parameter gradient norms, one host
    copy per step. No names, functional activations, diagnosis, safety net or output: what
    measuring these numbers with hooks costs by itself, the least gradwatch could cost."""
    kinds = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu", nn.GELU: "gelu"}
    counts: list[torch.Tensor] = []
    signals: list[torch.Tensor] = []

    def signal(grad):
        signals.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def activation(kind, module, args, out):
        flat = gwstats.flat_mask(kind, out, args[0])
        counts.append(gwstats.flat_counts(flat, gwstats.unit_axis(flat.dim(), flat.dim() == 4)))

    def parameterised(module, args, out):
        out = out if isinstance(out, torch.Tensor) else out[0]
        if out.requires_grad:
            out.register_hook(signal)

    handles = []
    for m in model.modules():
        if type(m) in kinds:
            hook = functools.partial(activation, kinds[type(m)])
            handles.append(m.register_forward_hook(hook))
        elif next(m.parameters(recurse=False), None) is not None:
            handles.append(m.register_forward_hook(parameterised))
    params = list(model.parameters())

    def step(_):
        norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
        values = torch.cat([torch.stack(norms), *counts, torch.stack(signals)]).tolist()
        counts.clear()
        signals.clear()
        return values  # grad norms, per-unit flat counts, signal norms (backward order)

    def teardown():
        for h in handles:
            h.remove()

    return step, teardown


def v_lightning(model, logdir):
    """Lightning's documented recipe: grad_norm() + log_dict in on_before_optimizer_step, written
    by a TensorBoardLogger (the Trainer around it costs the same with and without it)."""
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning.pytorch.utilities import grad_norm
    except ImportError:
        return None
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub

    # As in a process without gradwatch: TensorBoard's own pure-Python checksum, not the C one
    # gradwatch swaps in for every writer of the process.
    fast = stub.crc32c
    stub.crc32c = lambda data: stub.crc_finalize(stub.crc_update(stub.CRC_INIT, data))
    logger = TensorBoardLogger(logdir, name="", version="")

    def step(i):
        logger.log_metrics(grad_norm(model, norm_type=2), step=i)

    def teardown():
        logger.finalize("success")
        stub.crc32c = fast

    return step, teardown


def v_wandb(model, logdir):
    try:
        import wandb
    except ImportError:
        return None
    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(dir=logdir, mode="offline", reinit=True)
    wandb.watch(model, log="gradients", log_freq=1)

    def step(i):
        run.log({"step": i})

    return step, run.finish


VARIANTS: dict[str, Callable] = {
    "none": v_none,
    "gradwatch default (every 50)": v_gradwatch(50),
    "gradwatch every step": v_gradwatch(1),
    "gradwatch every step, background thread": v_gradwatch(1, background=True),
    "floor (fused norms + 1 reduction/activation)": v_floor,
    "gradwatch's statistics, hand-written": v_statistics,
    "Lightning grad_norm + TensorBoardLogger": v_lightning,
    "wandb.watch(log='gradients', log_freq=1)": v_wandb,
}

# -- timing ----------------------------------------------------------------------------------------


def time_variant(build, make_variant, steps: int, warmup: int) -> float | None:
    torch.manual_seed(0)
    model, loss_fn = build
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = make_variant(model, logdir)
        if made is None:
            return None
        hook, teardown, *drain = made
        try:
            for i in range(warmup):
                loss_fn(model).backward()
                hook(i)
                opt.step()
                opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for i in range(warmup, warmup + steps):
                loss_fn(model).backward()
                hook(i)
                opt.step()
                opt.zero_grad(set_to_none=True)
            for wait in drain:
                wait()
            return (time.perf_counter() - start) / steps
        finally:
            teardown()


def measure(builders, rounds: int, steps: int, warmup: int, quick: bool) -> dict:
    results: dict[str, dict[str, list[float]]] = {}
    for name, builder in builders.items():
        models = {v: builder(quick) for v in VARIANTS}  # one fresh model per variant
        per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            order = list(VARIANTS)
            random.shuffle(order)
            times = {v: time_variant(models[v], VARIANTS[v], steps, warmup) for v in order}
            for v, t in times.items():
                if t is not None and times["none"]:
                    per_round[v].append(t / times["none"])
                    seconds[v].append(t)
        results[name] = {
            v: {
                "median": statistics.median(r),
                "min": min(r),
                "max": max(r),
                "ms_per_step": 1e3 * statistics.median(seconds[v]),
            }
            for v, r in per_round.items()
            if r
        }
    return results


def host_time_per_layer(quick: bool, rounds: int, device: torch.device | None = None) -> dict:
    """The host time gradwatch adds per hooked module on a logging step, on a model whose kernels
    cost next to nothing: 200 x (Linear 8, ReLU) + a head, batch 2 (401 hooked modules). A plain
    copy of the model is the baseline, timed in alternation, block by block: a block of watched
    steps ends when the background worker has finished them all, so its time counts whatever the
    worker takes from the training thread. The step boundary (``gw.step()``, the hand-over) is
    also timed apart. On an accelerator the device is synchronised before each reading of the
    clock."""
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    depth = 20 if quick else 200
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (nn.Linear(8, 8), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(8, 1)).to(device)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 8, device=device)
    steps = 5 if quick else 40
    out: dict[str, float] = {}
    for background in (False, True):
        times: dict[str, list[float]] = {"plain": [], "watched": [], "boundary": []}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gw = gradwatch.GradWatch(model, every_n_steps=1, warn=False, background=background)
            for _ in range(rounds):
                for name, m in (("plain", plain), ("watched", model)):
                    for i in range(steps + 3):
                        if i == 3:
                            gw.report  # noqa: B018  (the warm-up's steps finished)
                            sync()
                            start = time.perf_counter()
                        t1 = time.perf_counter()
                        m(x).sum().backward()
                        if m is model:
                            sync()
                            t1 = time.perf_counter()
                            gw.step()
                            sync()
                            if i >= 3:
                                times["boundary"].append(time.perf_counter() - t1)
                        m.zero_grad(set_to_none=True)
                    gw.report  # noqa: B018  (waits for the worker)
                    sync()
                    times[name].append((time.perf_counter() - start) / steps)
            hooked = len(gw.report.layers)
            gw.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        added = med["watched"] - med["plain"]
        key = "background_" if background else ""
        out.update(
            {
                f"{key}plain_step_ms": 1e3 * med["plain"],
                f"{key}logging_step_ms": 1e3 * med["watched"],
                f"{key}boundary_ms": 1e3 * med["boundary"],
                f"{key}added_over_plain": added / med["plain"],
                f"{key}us_per_module": 1e6 * added / hooked,
            }
        )
    out["hooked_modules"] = hooked
    return out


def handoff_cost(quick: bool, rounds: int) -> dict:
    """A thread or a process for the worker? What each costs the training thread on one logging
    step of the deep sigmoid MLP: a thread takes the step as it is (its copy already made), a
    process must be sent it (the header and the numbers, pickled, through a pipe). And what the
    worker itself spends on a step (read, readout, diagnosis; no sink), which a thread takes from
    the GIL the training thread also needs."""
    import multiprocessing
    import pickle

    from gradwatch import closing

    model, loss_fn = deep_mlp(quick)
    kept = []
    finish = closing.StepClosing._finish
    gw = gradwatch.GradWatch(model, every_n_steps=1, warn=False, background=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        closing.StepClosing._finish = lambda self, c, *a, **k: (
            kept.append(c),
            finish(self, c, *a, **k),
        )[1]
        try:
            for _ in range(3):
                loss_fn(model).backward()
                gw.step()
                model.zero_grad(set_to_none=True)
        finally:
            closing.StepClosing._finish = finish
    collected = kept[-1]
    host = collected.copy.read()
    receiver, sender = multiprocessing.Pipe(duplex=False)
    worker = gradwatch.step.worker.Worker()
    times: dict[str, list[float]] = {"thread": [], "process": [], "finish": []}
    for _ in range(rounds * 20):
        t0 = time.perf_counter()
        worker.submit(lambda: None)
        t1 = time.perf_counter()
        sender.send_bytes(pickle.dumps((host.header, host._values, host._layouts), protocol=5))
        t2 = time.perf_counter()
        receiver.recv_bytes()
        worker.wait()
        t3 = time.perf_counter()
        finish(gw, collected)
        t4 = time.perf_counter()
        times["thread"].append(t1 - t0)
        times["process"].append(t2 - t1)
        times["finish"].append(t4 - t3)
    worker.stop()
    gw.close()
    return {k + "_ms": 1e3 * statistics.median(v) for k, v in times.items()}


def curvature_cost(quick: bool, rounds: int) -> dict:
    """What the opt-in curvature probe adds to a logging step, in plain training steps of the
    same model (forward, backward, SGD step), with gradwatch logging every step with and without
    it, timed in alternation. The first measurement starts from a random vector (cold); the
    later ones from the last eigenvector (warm). Off, no code of the probe runs at all."""
    out = {}
    for name in ("deep sigmoid MLP", "small CNN", "transformer"):
        built = {v: MODELS[name](quick) for v in ("plain", "gradwatch", "curvature")}
        watchers, opts, products = {}, {}, []
        for v, (model, loss_fn) in built.items():
            opts[v] = torch.optim.SGD(model.parameters(), lr=1e-3)
            if v != "plain":
                extra = {"curvature_every": 1, "curvature_loss": functools.partial(loss_fn, model)}
                # synchronous (a curvature step always is): a step's own cost, comparable
                watchers[v] = gradwatch.GradWatch(
                    model,
                    every_n_steps=1,
                    warn=False,
                    background=False,
                    **(extra if v == "curvature" else {}),
                )
        times: dict[str, list[float]] = {v: [] for v in built}
        cold = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in range(rounds * (2 if quick else 5) + 1):
                for v, (model, loss_fn) in built.items():
                    t0 = time.perf_counter()
                    loss_fn(model).backward()
                    report = watchers[v].step() if v in watchers else None
                    opts[v].step()
                    opts[v].zero_grad(set_to_none=True)
                    elapsed = time.perf_counter() - t0
                    if v == "curvature" and k == 0:
                        cold = (elapsed, report.curvature.iterations)
                    elif k > 0:
                        times[v].append(elapsed)
                        if v == "curvature":
                            products.append(report.curvature.iterations)
        for w in watchers.values():
            w.close()
        med = {v: statistics.median(t) for v, t in times.items()}
        out[name] = {
            "plain_step_ms": 1e3 * med["plain"],
            "logging_step_steps": med["gradwatch"] / med["plain"],
            "with_curvature_steps": med["curvature"] / med["plain"],
            "warm_products": statistics.median(products),
            "cold_steps": cold[0] / med["plain"],
            "cold_products": cold[1],
        }
    return out


def logging_step_cost(quick: bool, rounds: int) -> dict:
    """The 1,000-layer MLP: one logging step against a plain training step of an unwatched twin
    timed right after it, for gradwatch, the floor and Lightning's recipe in shuffled order
    within each round; gradwatch's off-schedule steps the same way; and gradwatch's tag count.
    "statistics" is :func:`v_statistics`: the same numbers measured by minimal hand-written
    hooks, the least a logging step can cost here. The median is the typical logging step; the
    mean ratio (total logging time over total plain time) also counts the garbage collector's
    occasional full passes. One logging step in ``weight_norm_every`` (10) also reads every
    weight: "gradwatch" times the others, "weighing" that one."""
    model, loss_fn = mlp_1000(quick)
    twin = copy.deepcopy(model)  # the floor and Lightning train this one: no gradwatch hooks
    sparse = copy.deepcopy(model)  # watched at the default schedule: its steps are off-schedule
    optimizers = {m: torch.optim.SGD(m.parameters(), lr=1e-4) for m in (model, twin, sparse)}

    def train_step(m: nn.Module, after_backward: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        loss_fn(m).backward()
        after_backward()
        optimizers[m].step()
        optimizers[m].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    names = {
        "gradwatch": "gradwatch",
        "weighing": "gradwatch, a step that also reads the weights",
        "floor": "floor (fused norms + 1 reduction/activation)",
        "statistics": "gradwatch's statistics, hand-written",
        "lightning": "Lightning grad_norm + TensorBoardLogger",
        "idle": "gradwatch off-schedule step (hooks kept at 2)",
        "off": "gradwatch off-schedule step (every 50: off)",
    }
    pairs: dict[str, list[tuple[float, float]]] = {v: [] for v in names}
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # every_n_steps=2: each logging step (even) is followed by an off-schedule one (odd),
        # timed too; both are compared with a plain step of the twin, which has no gradwatch.
        # At 2 the hooks stay on between logging steps (re-adding them would cost more).
        gw = gradwatch.GradWatch(model, log_dir=logdir, every_n_steps=2, warn=False)
        # the default schedule: after its logging step 0, every timed step is off-schedule
        # (fewer than 50 of them), with the per-module hooks taken off
        gw_sparse = gradwatch.GradWatch(
            sparse, log_dir=os.path.join(logdir, "every50"), every_n_steps=50, warn=False
        )
        lightning = v_lightning(twin, os.path.join(logdir, "lightning"))
        for _ in range(4):
            train_step(model, gw.step)
            train_step(twin, lambda: None)
            train_step(sparse, gw_sparse.step)
        for r in range(rounds):
            order = [v for v in names if v != "lightning" or lightning is not None]
            random.shuffle(order)
            for v in order:
                if v in ("gradwatch", "weighing"):
                    # weighing: the 1 logging step in weight_norm_every that reads every weight
                    gw._weighing.next = v == "weighing"
                    gw._arm()
                    # the worker's time counts (it would slow the steps after it otherwise)
                    logged = train_step(model, lambda: (gw.step(), gw.report))
                    idle = train_step(model, gw.step)
                    plain = train_step(twin, lambda: None)
                    pairs[v].append((logged, plain))
                    if v == "gradwatch":
                        pairs["idle"].append((idle, plain))
                    continue
                if v == "idle":
                    continue  # timed with "gradwatch"
                if v == "off":
                    off = train_step(sparse, gw_sparse.step)
                    pairs[v].append((off, train_step(twin, lambda: None)))
                    continue
                if v in ("floor", "statistics"):
                    step, teardown = (v_floor if v == "floor" else v_statistics)(twin, logdir)
                    try:
                        logged = train_step(twin, functools.partial(step, r))
                    finally:
                        teardown()
                else:
                    logged = train_step(twin, functools.partial(lightning[0], r))
                pairs[v].append((logged, train_step(twin, lambda: None)))
        gw.close()
        gw_sparse.close()
        if lightning is not None:
            lightning[1]()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(logdir)
        acc.Reload()
        tags = len(acc.Tags()["scalars"])
    out: dict = {"layers": len(gw.report.layers), "scalar_tags": tags}
    for v, timed in pairs.items():
        if timed:
            ratios = [a / b for a, b in timed]
            out[names[v]] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "mean": sum(a for a, _ in timed) / sum(b for _, b in timed),
            }
    return out


def compiled_overhead(quick: bool, rounds: int, steps: int) -> dict:
    """Under ``torch.compile``: each model with gradwatch logging every step against the same
    model compiled without it, in interleaved rounds (shuffled order, ratio within each round).
    gradwatch's hooks are traced into the graph, so what is left of its cost is the boundary
    (the host copy, the diagnosis and the TensorBoard write). The four models are compiled with
    inductor; the 1,000-layer MLP with aot_eager, as inductor's own lowering of it exceeds
    Python's recursion limit with or without gradwatch. Not the LSTM: dynamo does not trace
    ``nn.LSTM`` (it runs it eager). ``--quick`` uses dynamo's eager backend: tracing without code
    generation, to keep the smoke test short."""
    builders = {k: v for k, v in MODELS.items() if v is not lstm}  # dynamo runs nn.LSTM eager
    builders["1,000-layer MLP, logging step"] = mlp_1000
    out: dict = {}
    for name, build in builders.items():
        backend = "eager" if quick else "aot_eager" if build is mlp_1000 else "inductor"
        n = max(1, steps // 10) if build is mlp_1000 else steps
        torch._dynamo.reset()  # the models share Sequential.forward: no recompile limit across
        ratios, layers, breaks = _compiled_ratios(build(quick), backend, rounds, n)
        out[name] = {
            "backend": backend,
            # a break would leave part of the model eager: gradwatch must add none
            "graph_breaks": breaks,
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "layers": layers,
        }
    torch._dynamo.reset()
    return out


def _compiled_ratios(built, backend: str, rounds: int, steps: int) -> tuple[list, int, dict]:
    model, loss_fn = built
    twin = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gw = gradwatch.GradWatch(model, log_dir=logdir, every_n_steps=1, warn=False)
        runs = {  # variant: (compiled model, its parameters' owner, after backward)
            "plain": (torch.compile(twin, backend=backend), twin, lambda: None),
            "gradwatch": (torch.compile(model, backend=backend), model, gw.step),
        }
        optimizers = {v: torch.optim.SGD(m.parameters(), lr=1e-4) for v, (_, m, _) in runs.items()}

        def train(v: str, k: int) -> float:
            compiled, _, after = runs[v]
            t0 = time.perf_counter()
            for _ in range(k):
                loss_fn(compiled).backward()
                after()
                optimizers[v].step()
                optimizers[v].zero_grad(set_to_none=True)
            return (time.perf_counter() - t0) / k

        breaks = {}
        for v in runs:  # compile and warm up, counting the graph breaks of each
            before = sum(torch._dynamo.utils.counters["graph_break"].values())
            train(v, 3)
            breaks[v] = sum(torch._dynamo.utils.counters["graph_break"].values()) - before
        ratios = []
        for _ in range(rounds):
            order = list(runs)
            random.shuffle(order)
            times = {v: train(v, steps) for v in order}
            ratios.append(times["gradwatch"] / times["plain"])
        gw.close()
    return ratios, len(gw.report.layers), breaks


def memory(quick: bool) -> dict:
    """Memory in use at step 100 and at step 500 with gradwatch measuring every step: malloc's
    heap in use after a garbage collection (the process's peak RSS where malloc cannot say; it
    only grows, so an earlier, larger workload hides any growth there)."""
    model, loss_fn = deep_mlp(quick)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = 120 if quick else 500
    in_use = _heap_in_use()
    unit = "heap_in_use_kib" if in_use else "peak_rss_kib"
    marks = {}
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.GradWatch(model, log_dir=logdir, every_n_steps=1, warn=False) as gw:
            for i in range(steps + 1):
                loss_fn(model).backward()
                gw.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i in (100, steps):
                    gc.collect()
                    used = in_use() // 1024 if in_use else None
                    marks[i] = used or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {f"{unit}_at_100": marks[100], f"{unit}_at_{steps}": marks[steps]}


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes malloc has handed out and not yet got back (glibc's ``mallinfo2``), or None where
    that is not available. PyTorch's CPU allocator takes every tensor's memory from malloc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class Info(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            ).split()
        ]

    mallinfo2.restype = Info

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # heap chunks in use + mmapped chunks

    return in_use


def step_peak_memory(quick: bool) -> dict:
    """Per model: the peak heap use of a logging step and of a plain step, above what was in use
    when the step began, sampled after every aten op (forward, backward, hooks, boundary,
    optimizer), so hooks' temporaries count too. The smallest of 3 steps each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    in_use = _heap_in_use()
    if in_use is None:
        return {"unavailable": "needs glibc's mallinfo2"}

    class Peak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.start = self.peak = in_use()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    out = {}
    for name, builder in MODELS.items():
        model, loss_fn = builder(quick)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        peaks: dict[bool, list[int]] = {True: [], False: []}
        with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gradwatch.GradWatch(model, log_dir=logdir, every_n_steps=2, warn=False) as gw:
                for i in range(8):  # even steps log, odd ones are plain (hooks idle)
                    with Peak() as mode:
                        loss_fn(model).backward()
                        gw.step()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    if i >= 2:
                        peaks[i % 2 == 0].append(mode.peak - mode.start)
        logging, plain = min(peaks[True]), min(peaks[False])
        out[name] = {
            "logging_step_kib": logging // 1024,
            "plain_step_kib": plain // 1024,
            "ratio": logging / plain,
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 5)
    # 50 timed steps after a warm-up of 5: the default schedule's window holds exactly one
    # logging step (step 50), as in a long run.
    steps = args.steps or (3 if args.quick else 50)
    random.seed(0)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), torch {torch.__version__}, python {sys.version.split()[0]}",
        "overhead": measure(MODELS, rounds, steps, warmup=2 if args.quick else 5, quick=args.quick),
        "mlp_1000_logging_step": logging_step_cost(args.quick, rounds=3 if args.quick else 15),
        "host_time_per_layer": host_time_per_layer(args.quick, rounds=1 if args.quick else 5),
        "handoff": handoff_cost(args.quick, rounds=1 if args.quick else 5),
        "curvature": curvature_cost(args.quick, rounds=1 if args.quick else 3),
        "memory": memory(args.quick),
        "step_peak_memory": step_peak_memory(args.quick),
        "compiled": compiled_overhead(args.quick, rounds=1 if args.quick else 5, steps=steps),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return result


def targets(result: dict) -> list[str]:
    """The cost targets (issue 36), judged on this run's own ratios."""
    mlp = result["overhead"].get("deep sigmoid MLP", {})
    h = result["host_time_per_layer"]
    rows = [
        ("deep sigmoid MLP, every step", mlp.get("gradwatch every step", {}).get("median"), 1.15),
        ("200 x (Linear 8, ReLU): added / plain", h["added_over_plain"], 0.5),
    ]
    for model, variants in result["overhead"].items():
        ratio = variants.get("gradwatch default (every 50)", {}).get("median")
        rows.append((f"{model}, default schedule", ratio, 1.01))
    lines = ["targets (median of this run's rounds):"]
    for name, value, limit in rows:
        if value is not None:
            verdict = "met" if value <= limit else "NOT met"
            lines.append(f"  {name:<46} {value:6.3f}  target <= {limit}  {verdict}")
    return lines


def format_table(result: dict) -> str:
    lines = [f"machine: {result['machine']}", ""]
    for model, variants in result["overhead"].items():
        lines.append(f"{model}:")
        for v, r in variants.items():
            lines.append(
                f"  {v:<46} {r['median']:6.3f}x  ({r['min']:.3f}..{r['max']:.3f})"
                f"  {r['ms_per_step']:8.2f} ms/step"
            )
    m = result["mlp_1000_logging_step"]
    lines.append(
        f"\n{m['layers']}-layer MLP, one logging step against a plain step "
        f"(gradwatch writes {m['scalar_tags']} scalar tags):"
    )
    for v, r in m.items():
        if isinstance(r, dict):
            lines.append(
                f"  {v:<46} {r['median']:6.3f}x  ({r['min']:.3f}..{r['max']:.3f})"
                f"  mean {r['mean']:.3f}x"
            )
    h = result["host_time_per_layer"]
    lines.append(
        f"{h['hooked_modules']} hooked modules (Linear 8, ReLU; batch 2), every step logged: "
        f"plain step {h['plain_step_ms']:.2f} ms; watching adds {h['added_over_plain']:.2f} of it "
        f"({h['us_per_module']:.1f} us a module; gw.step() itself {h['boundary_ms']:.2f} ms); "
        f"with the background thread: adds {h['background_added_over_plain']:.2f} "
        f"({h['background_us_per_module']:.1f} us a module, gw.step() "
        f"{h['background_boundary_ms']:.2f} ms)"
    )
    c = result["handoff"]
    lines.append(
        f"handing a logging step of the deep sigmoid MLP to the worker: as a thread "
        f"{c['thread_ms']:.3f} ms, to a process (pickle + pipe) {c['process_ms']:.3f} ms; "
        f"the worker's own time for it {c['finish_ms']:.2f} ms"
    )
    lines += targets(result)
    lines.append(
        "the curvature probe on a logging step (SGD), in plain steps of the same model; "
        "Hessian-vector products per measurement:"
    )
    for model, r in result["curvature"].items():
        lines.append(
            f"  {model:<20} plain {r['plain_step_ms']:.1f} ms; gradwatch logging "
            f"{r['logging_step_steps']:.2f} steps, with curvature {r['with_curvature_steps']:.1f} "
            f"steps ({r['warm_products']:.0f} products); the first (cold) "
            f"{r['cold_steps']:.1f} steps ({r['cold_products']} products)"
        )
    lines.append(f"memory with gradwatch every step, KiB: {result['memory']}")
    lines.append("peak heap of one step above its start, logging / plain:")
    for model, r in result["step_peak_memory"].items():
        if model == "unavailable":
            lines.append(f"  unavailable: {r}")
        else:
            lines.append(
                f"  {model:<20} {r['ratio']:.4f}x  ({r['logging_step_kib']} KiB / "
                f"{r['plain_step_kib']} KiB)"
            )
    lines.append("under torch.compile, gradwatch every step against the same model compiled:")
    for model, r in result["compiled"].items():
        lines.append(
            f"  {model:<30} {r['median']:6.3f}x  ({r['min']:.3f}..{r['max']:.3f})  "
            f"{r['backend']}, graph breaks {r['graph_breaks']['plain']} plain, "
            f"{r['graph_breaks']['gradwatch']} watched"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
