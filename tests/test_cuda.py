"""The CUDA lane: what only a GPU shows (cuDNN's fused RNN kernels, CUDA autocast and GradScaler,
host synchronisations, inductor's GPU code). Skipped without CUDA, so CI (no GPU) skips them; on
a machine with a GPU run them alone with ``python -m pytest -m cuda``."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch
from gradwatch.measure import stats

from .test_amp import OVERFLOW, OVERFLOW_CASES, _net, check_overflow_steps
from .test_hostile import _keep_output_grads, _rms, own_grad_norm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class RNNNet(nn.Module):
    """A two-layer RNN whose loss reads the last time step only: cuDNN's backward then hands
    the unused outputs (h_n, and c_n for an LSTM) a None gradient."""

    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(16, 32, num_layers=2, batch_first=True), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_cudnn_rnns_are_measured_like_a_brute_force_reference(cell):
    torch.manual_seed(0)
    model = RNNNet(cell).cuda()
    x, y = torch.randn(8, 20, 16, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    ref = copy.deepcopy(model)
    outs = _keep_output_grads(ref, ["rnn", "head"])
    F.cross_entropy(ref(x), y).backward()
    assert "Cudnn" in type(outs["rnn"].grad_fn).__name__  # the fused kernel is what runs
    with GradWatch(model, every_n_steps=1) as gw:  # a warning would fail the test
        for step in range(3):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            report = gw.step()
            assert report is not None and report.step == step and report.unmeasured == {}
            for name in ("rnn", "head"):
                s = report.layers[name]
                assert s.signal == pytest.approx(_rms(outs[name].grad), rel=1e-4), name
                want = own_grad_norm(ref.get_submodule(name))
                assert s.grad_norm == pytest.approx(want, rel=1e-4), name


@OVERFLOW_CASES
def test_an_fp16_overflow_on_the_gpu_is_a_skipped_step_in_both_modes(every, overflow_at):
    check_overflow_steps(every, overflow_at, "cuda")


def test_bf16_autocast_norms_and_signal_equal_a_brute_force_reference():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).cuda()
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    ref = copy.deepcopy(model)
    outs = _keep_output_grads(ref, ["0", "2", "4"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(ref(x), y)
    loss.backward()
    with GradWatch(model, every_n_steps=1) as gw:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        report = gw.step()
    for name in ("0", "2", "4"):
        s = report.layers[name]
        assert s.signal == pytest.approx(_rms(outs[name].grad.float()), rel=1e-5), name
        assert s.grad_norm == pytest.approx(own_grad_norm(ref.get_submodule(name)), rel=1e-5)
    assert report.layers["3"].saturation is not None and not report.findings


def _syncs(fn):
    """How many times ``fn`` made the host wait for the GPU (torch.cuda.set_sync_debug_mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _loop(mode, watched):
    """One training step as a function of its index, for ``mode``: "fp32" (explicit
    ``gw.step()``), "fp16-explicit" or "fp16-optimizer" (GradScaler; steps 7 and 9 overflow)."""
    model = _net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if mode != "fp32" else None
    gw = None
    if watched:
        optimizer = opt if mode == "fp16-optimizer" else None
        gw = GradWatch(model, every_n_steps=3, optimizer=optimizer, scaler=scaler)
    x = torch.randn(8, 16, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")

    def step(i):
        with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
            loss = F.cross_entropy(model(x).float(), y)
        if scaler is None:
            loss.backward()
            if gw is not None:
                gw.step()
            opt.step()
        else:
            if i in (7, 9):
                loss = loss * OVERFLOW
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if gw is not None and mode == "fp16-explicit":
                gw.step()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, gw


@pytest.mark.parametrize("mode", ["fp32", "fp16-explicit", "fp16-optimizer"])
def test_one_host_sync_per_logging_step_and_none_off_schedule(mode):
    """Against the same loop unwatched (GradScaler syncs once a step by itself): gradwatch adds
    one sync on each logging step (6, 9, 12; 9 overflows) and none on the others (7 overflows)."""
    plain, _ = _loop(mode, watched=False)
    watched, gw = _loop(mode, watched=True)
    for i in range(6):  # warm-up, the last step counted and dropped: the first counted step of a
        # process had one more sync on an H200 (plain or watched, on or off schedule)
        _syncs(lambda i=i: (plain(i), watched(i)))
    torch.cuda.synchronize()
    added = [_syncs(lambda i=i: watched(i)) - _syncs(lambda i=i: plain(i)) for i in range(6, 15)]
    assert added == [1, 0, 0, 1, 0, 0, 1, 0, 0]  # steps 6..14
    gw.close()


def test_a_compiled_model_on_the_gpu_is_one_graph_and_measures_like_eager():
    """inductor's GPU code, with every hook traced into it: no graph break (torch 2.11's dynamo
    broke the graph at every module over a bool() of a dict), and eager's numbers."""
    from torch._dynamo.utils import counters

    def train(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        ).cuda()
        run = torch.compile(model, backend="inductor") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator(device="cuda").manual_seed(1)
        reports = []
        with GradWatch(model, every_n_steps=2) as gw:
            for _ in range(6):
                x = torch.randn(16, 32, device="cuda", generator=gen)
                F.mse_loss(run(x), torch.zeros(16, 1, device="cuda")).backward()
                if (report := gw.step()) is not None:
                    reports.append(report)
                opt.step()
                opt.zero_grad()
        return reports

    torch._dynamo.reset()
    eager = train(False)
    counters.clear()
    compiled = train(True)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert breaks == 0 and graphs == 2  # measuring, and not (the hooks idle off schedule)
    for a, b in zip(eager, compiled, strict=True):
        for name, s in a.layers.items():
            t = b.layers[name]
            for field in ("grad_norm", "signal", "saturation", "calls"):
                want, got = getattr(s, field), getattr(t, field)
                assert (want is None) == (got is None), (name, field)
                if want is not None:
                    assert got == pytest.approx(want, rel=1e-3, abs=1e-7), (name, field)


def test_the_lightning_callback_under_16_mixed_reports_an_overflow_step_as_skipped(tmp_path):
    pytest.importorskip("lightning")
    from gradwatch import GradWatchCallback
    from tests.helpers import lit
    from tests.test_lightning import fit

    pl, LitNet, Probe = lit.PACKAGES["lightning.pytorch"]
    gw = GradWatchCallback(every_n_steps=1)
    probe = Probe(gw)
    module = LitNet(lr=0.0, blowup_step=1)
    fit(pl, tmp_path, module, [gw, probe], accelerator="gpu", precision="16-mixed", max_steps=3)
    assert sorted(probe.logged) == [0, 1, 2]
    assert probe.logged[1]["skipped"] and not probe.logged[1]["findings"]
    for step in (0, 2):
        report = probe.logged[step]
        assert not report["skipped"] and not report["findings"]
        assert report["global_grad_norm"] == pytest.approx(probe.pre_clip[step], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_and_silu_masks_on_the_gpu_equal_the_cpus(dtype):
    """On a GPU the derivative kernel gets a broadcast unit gradient (a contiguous one on CPU)."""
    x = (torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    for kind in ("gelu", "silu"):
        cpu = stats.flat_mask(kind, x, x)
        gpu = stats.flat_mask(kind, x.cuda(), x.cuda()).cpu()
        assert cpu.any() and (cpu != gpu).sum() <= 3, kind  # rounding at the threshold only


def test_attention_on_the_gpu_under_bf16_autocast_matches_the_cpu_in_fp32():
    """The fused SDPA kernel runs as it would (bf16, flash or memory-efficient); the statistics,
    reduced in fp32 from the call's own bf16 q and k, match the same q and k on the CPU; log Z
    too, and the Adam statistics are measured on the device."""
    from tests.helpers.lm import TinyLM

    torch.manual_seed(0)
    model = TinyLM(50).cuda()
    ids = torch.randint(0, 50, (4, 32), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keep = {}
    hook = model.blocks[0].qkv.register_forward_hook(
        lambda m, a, out: keep.__setitem__("qkv", out.detach())
    )
    with GradWatch(model, every_n_steps=1, warn=False) as gw:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)
            loss = F.cross_entropy(logits.float().reshape(-1, 50), ids.reshape(-1))
        loss.backward()
        report = gw.step(opt, loss=loss)
    hook.remove()
    q, k, _ = keep["qkv"].float().cpu().split(64, dim=-1)
    q, k = (t.view(4, 32, 4, 16).transpose(1, 2) for t in (q, k))
    z = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~torch.ones(32, 32).bool().tril(), -1e30)
    p = z.softmax(-1)
    row = report.layers["blocks.0:attention#0"]
    assert row.attention_max_logit == pytest.approx(z.tril().abs().max().item(), rel=1e-3)
    h = -(torch.special.xlogy(p, p)).sum(-1)
    assert row.attention_entropy == pytest.approx(h.mean().item(), rel=1e-3)
    assert report.layers["lm_head"].log_z_mean is not None
    assert report.layers["lm_head"].adam_step_rms is not None
    assert report.loss == pytest.approx(loss.item())
