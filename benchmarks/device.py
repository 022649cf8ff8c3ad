"""What gradwatch costs a training step on an accelerator, against no monitoring and Lightning's
recipe: issue 23's table, as one command.

python benchmarks/device.py --device cuda          # GPT-2 small, ResNet-50, the MLP; eager and compiled
python benchmarks/device.py --device cpu --quick   # tiny stand-ins, seconds (the test suite runs it)

Every variant trains a copy of the same model on the same fixed batch (AdamW, fused on CUDA; bf16
autocast for GPT-2 and ResNet-50), rounds interleaved in shuffled order, and the ratio to "none" is
taken within each round; the table gives the median. GPT-2 small comes from ``transformers`` and
ResNet-50 from ``torchvision`` when they are installed, else a stand-in of the same shape (said in
the output). Also measured on the device: the host time per hooked module of a logging step
(``overhead.py``'s 200 x (Linear 8, ReLU)), and, on CUDA, the synchronising calls per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import runpy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

VARIANTS = (
    "none",
    "gradwatch default (every 50)",
    "gradwatch every step",
    "gradwatch every step, synchronous",  # background=False: the worker's A/B on the same card
    "Lightning grad_norm",
)


@dataclass
class Case:
    """A model, its batch and loss, whether it trains under bf16 autocast, and what it is."""

    model: nn.Module
    batch: Callable
    loss: Callable
    autocast: bool
    what: str


def mlp(quick: bool, device: torch.device) -> Case:
    width, depth, batch = (64, 8, 16) if quick else (256, 20, 128)
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), nn.Sigmoid())]
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    what = f"{depth} x (Linear {width}, Sigmoid), fp32, batch {batch}"
    return Case(model, lambda: x, lambda out: F.cross_entropy(out.float(), y), False, what)


class _LM(nn.Module):
    """A GPT-2-shaped stand-in: token and position embeddings, pre-norm GELU blocks, a head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        block = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.head(self.blocks(h, mask=mask, is_causal=True))


class _HFLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def gpt2(quick: bool, device: torch.device) -> Case:
    layers, d, heads, vocab, seq, batch = (
        (2, 64, 4, 500, 32, 2) if quick else (12, 768, 12, 50257, 512, 8)
    )
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=layers,
            n_embd=d,
            n_head=heads,
            vocab_size=vocab,
            n_positions=seq,
            use_cache=False,  # no KV cache in training: a compiled model would recompile
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
        model, source = _HFLoss(GPT2LMHeadModel(config)), "transformers GPT-2"
    except ImportError:
        model, source = _LM(vocab, d, layers, heads, seq), "a GPT-2-shaped stand-in"

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    what = f"{source} ({layers} x {d}), bf16 autocast, batch {batch}, seq {seq}"
    return Case(model, lambda: ids, loss, True, what)


def resnet50(quick: bool, device: torch.device) -> Case:
    size, batch = (32, 2) if quick else (224, 64)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    try:
        import torchvision

        model, source = torchvision.models.resnet50(), "torchvision ResNet-50"
    except ImportError:
        model, source = _bottleneck_stand_in(), "a ResNet-50-shaped stand-in (conv, BN, ReLU)"
    what = f"{source}, bf16 autocast, batch {batch}, {size} px"
    return Case(model, lambda: x, lambda out: F.cross_entropy(out.float(), y), True, what)


def _bottleneck_stand_in() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3), nn.BatchNorm2d(64), nn.ReLU()]
    c = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for _ in range(blocks):
            for k, out in ((1, width), (3, width), (1, 4 * width)):
                layers += [nn.Conv2d(c, out, k, padding=k // 2), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        layers.append(nn.MaxPool2d(2) if width != 512 else nn.Identity())
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000))


def _own_code(model: nn.Module) -> nn.Module:
    """``model`` behind a forward with a code object of its own. Dynamo keeps compiled code per
    code object and does not guard on hooks: the variants' copies of one class would share the
    first one's compiled graph, hooks or none (see docs/limits.md)."""
    namespace: dict = {}
    exec("def forward(self, *args):\n    return self.inner(*args)\n", namespace)
    wrapper = type("Variant", (nn.Module,), {"forward": namespace["forward"]})()
    wrapper.inner = model
    return wrapper


def lightning_recipe(model: nn.Module) -> None:
    """Lightning's ``grad_norm`` and a read of every value, as ``log_dict`` ends up doing."""
    try:
        from lightning.pytorch.utilities import grad_norm
    except ImportError:
        from pytorch_lightning.utilities import grad_norm
    for value in grad_norm(model, norm_type=2).values():
        float(value)


def _has_lightning() -> bool:
    for package in ("lightning.pytorch.utilities", "pytorch_lightning.utilities"):
        try:
            __import__(package)
            return True
        except ImportError:
            pass
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, device: torch.device, compiled: bool, rounds: int, steps: int) -> dict:
    variants = [v for v in VARIANTS if v != "Lightning grad_norm" or _has_lightning()]
    runs, watchers = {}, []
    for variant in variants:
        model = copy.deepcopy(case.model).to(device)
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
        gw = None
        if variant.startswith("gradwatch"):
            gw = gradwatch.GradWatch(
                model,
                every_n_steps=1 if "every step" in variant else 50,
                warn=False,
                background="auto" if "synchronous" not in variant else False,
            )
            watchers.append(gw)
        run = torch.compile(_own_code(model)) if compiled else model

        def step(model=model, run=run, opt=opt, gw=gw, variant=variant) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.autocast):
                loss = case.loss(run(case.batch()))
            loss.backward()
            if gw is not None:
                gw.step()
            if variant == "Lightning grad_norm":
                lightning_recipe(model)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # warm-up (and compilation)
            step()
        runs[variant] = step
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for variant in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                runs[variant]()
            for gw in watchers:  # gradwatch's worker finishes inside the timed block
                gw.report  # noqa: B018  (waits for it)
            _sync(device)
            times[variant].append((time.perf_counter() - t0) / steps)
    for gw in watchers:
        gw.close()
    out = {"model": case.what, "ms_none": 1e3 * statistics.median(times["none"])}
    for variant in variants[1:]:
        out[variant] = statistics.median(a / b for a, b in zip(times[variant], times["none"]))
    return out


def syncs_per_step(device: torch.device, quick: bool) -> dict | None:
    """CUDA's synchronising calls on the training thread per step, gradwatch every 4 steps: none
    (the logging step's copy to the host is non-blocking; the worker thread waits for it)."""
    if device.type != "cuda":
        return None
    case = mlp(quick, device)
    model = case.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    counts = []
    with gradwatch.GradWatch(model, every_n_steps=4, warn=False) as gw:
        for _ in range(8):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    case.loss(model(case.batch())).backward()
                    gw.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return {"logging_steps": counts[::4], "other_steps": [c for k, c in enumerate(counts) if k % 4]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny stand-in sizes, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 20)
    random.seed(0)
    torch.manual_seed(0)
    cases = {}
    for name, build in (("MLP", mlp), ("GPT-2 small", gpt2), ("ResNet-50", resnet50)):
        for compiled in (False,) if args.no_compile else (False, True):
            key = f"{name}, compiled" if compiled else name
            try:
                cases[key] = time_case(build(args.quick, device), device, compiled, rounds, steps)
            except Exception as e:  # one model failing (memory, a compiler) leaves the others
                cases[key] = f"error: {type(e).__name__}: {e}"[:300]
    overhead = runpy.run_path(str(Path(__file__).with_name("overhead.py")))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cases": cases,
        "host_time_per_layer": overhead["host_time_per_layer"](
            args.quick, 1 if args.quick else 5, device
        ),
        "syncs_per_step": syncs_per_step(device, args.quick),
    }
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}", ""]
    lines.append(
        f"{'model':<22} {'plain step':>10}  " + "  ".join(f"{v:>28}" for v in VARIANTS[1:])
    )
    for name, r in result["cases"].items():
        if isinstance(r, str):
            lines.append(f"{name:<22} {r}")
            continue
        ratios = "  ".join(f"{r[v]:>27.3f}x" if v in r else f"{'-':>28}" for v in VARIANTS[1:])
        lines.append(f"{name:<22} {r['ms_none']:>8.2f}ms  {ratios}")
    lines += [
        "",
        "models: "
        + "; ".join(
            f"{k}: {r['model']}"
            for k, r in result["cases"].items()
            if isinstance(r, dict) and "compiled" not in k
        ),
    ]
    h = result["host_time_per_layer"]
    lines.append(
        f"host time per hooked module, every step logged: {h['us_per_module']:.1f} us "
        f"(with the background thread {h['background_us_per_module']:.1f} us); watching adds "
        f"{h['added_over_plain']:.2f} of the plain step"
    )
    if result["syncs_per_step"] is not None:
        lines.append(f"synchronising calls per step: {result['syncs_per_step']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
