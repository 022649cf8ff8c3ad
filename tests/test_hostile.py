"""The setups that broke other gradient tools: gradwatch must measure right and never break the run."""

import contextlib
import copy
import gc
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import GradWatch, NonFiniteError

from .helpers.nets import reference_signals


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        yield


def own_grad_norm(module):
    grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
    return math.sqrt(sum(g.pow(2).sum().item() for g in grads))


# -- model shapes ----------------------------------------------------------------------------------


class DenseBlock(nn.Module):
    """DenseNet-style: each conv sees the concatenation of everything before it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(7, 4, 3, padding=1)
        self.r2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(11, 5)

    def forward(self, x):
        h = torch.cat([x, self.r1(self.c1(x))], 1)
        h = torch.cat([h, self.r2(self.c2(h))], 1)
        return self.head(h.mean((2, 3)))


def test_densenet_concatenation_with_inplace_relu():
    model = DenseBlock()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    twin = copy.deepcopy(model)  # retain_grad before an in-place op would see the op's output
    twin.r1.inplace = twin.r2.inplace = False
    want, _ = reference_signals(twin, x, y)
    with GradWatch(model, every_n_steps=1) as gw:
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    for name in ("c1", "c2", "head"):
        # the conv's output is overwritten by the in-place ReLU; the signal is still dL/d(conv out)
        assert report.layers[name].signal == pytest.approx(want[name], rel=1e-5)
        assert report.layers[name].grad_norm == pytest.approx(
            own_grad_norm(getattr(model, name)), rel=1e-5
        )


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight  # weight tying

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(3):  # a shared block called 3 times
            h = torch.tanh(self.block(h))
        return self.out(h)


def test_weight_tying_and_a_shared_block_use_the_accumulated_grad():
    model = TiedLM()
    tokens = torch.randint(0, 20, (4, 6))
    with GradWatch(model, every_n_steps=1) as gw:
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        report = gw.step()
    assert report.layers["block"].calls == 3
    assert report.layers["block"].grad_norm == pytest.approx(own_grad_norm(model.block), rel=1e-5)
    tied = model.embed.weight.grad.norm().item()
    assert report.layers["embed"].grad_norm == pytest.approx(tied, rel=1e-5)
    assert report.layers["out"].grad_norm == pytest.approx(tied, rel=1e-5)
    everything = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert report.global_grad_norm == pytest.approx(everything, rel=1e-5)  # the tie counted once


class Structured(nn.Module):
    """LSTM/GRU tuples, MultiheadAttention's (out, None), a dict with a bool mask, kwargs only."""

    class DictHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, *, features):
            return {"logits": self.fc(features), "mask": features[..., 0] > 0, "n": 3}

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = self.DictHead()

    def forward(self, x):
        h, (hn, cn) = self.lstm(x)
        h, _ = self.gru(h)
        a, weights = self.attn(h, h, h, need_weights=False)
        assert weights is None
        return self.head(features=a.mean(1))


def test_structured_outputs_and_keyword_only_calls():
    model = Structured()
    x, y = torch.randn(3, 5, 4), torch.randint(0, 3, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)  # and nothing to complain of
        with GradWatch(model, every_n_steps=1) as gw:
            out = model(x)
            F.cross_entropy(out["logits"], y).backward()
            report = gw.step()
    for name in ("lstm", "gru", "attn", "head.fc"):
        s = report.layers[name]
        assert s.calls == 1 and s.signal is not None and s.signal > 0, name
        assert s.grad_norm == pytest.approx(own_grad_norm(model.get_submodule(name)), rel=1e-5)


def test_frozen_layers_inputs_without_grad_and_unused_parameters():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(4, 8).requires_grad_(False)
            self.body = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)  # gets no gradient on this step
            self.head = nn.Linear(8, 2)

        def forward(self, x, use_branch=False):
            h = torch.relu(self.body(self.frozen(x)))
            if use_branch:
                h = self.unused(h)
            return self.head(h)

    model = Branchy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, every_n_steps=1) as gw:
            model(torch.randn(16, 4)).sum().backward()  # the input does not require grad
            report = gw.step()
    assert not [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert report.layers["frozen"].grad_norm is None
    assert report.layers["frozen"].weight_norm == pytest.approx(
        math.hypot(model.frozen.weight.norm().item(), model.frozen.bias.norm().item()), rel=1e-5
    )
    assert report.layers["unused"].grad_norm is None and report.layers["unused"].calls == 0
    assert report.layers["body"].grad_norm == pytest.approx(own_grad_norm(model.body), rel=1e-5)
    assert report.findings == []


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_double_backward_gradient_penalty_works_and_memory_stays_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    counts = []
    with quiet(), GradWatch(model, every_n_steps=1) as gw:
        for step in range(60):
            x = torch.randn(8, 4, requires_grad=True)
            out = model(x).sum()
            (gx,) = torch.autograd.grad(out, x, create_graph=True)
            loss = out + gx.pow(2).sum()  # WGAN-GP style penalty: a second backward
            loss.backward()
            report = gw.step()
            opt.step()
            opt.zero_grad()
            if step in (10, 59):
                counts.append(live_tensors())
    assert report.layers["0"].grad_norm > 0 and report.layers["0"].signal > 0
    assert counts[1] <= counts[0]


def test_no_memory_growth_over_hundreds_of_logged_steps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    counts = {}
    with quiet(), GradWatch(model, every_n_steps=1) as gw:
        for step in range(300):
            F.cross_entropy(model(x), y).backward()
            gw.step()
            opt.step()
            opt.zero_grad()
            if step in (20, 299):
                counts[step] = live_tensors()
    assert counts[299] <= counts[20]


# -- NaN / Inf -------------------------------------------------------------------------------------


def test_nan_in_one_layers_gradient_names_that_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].weight.register_hook(lambda g: g * float("nan"))
    with quiet(), GradWatch(model, every_n_steps=1) as gw:
        model(torch.randn(8, 4)).sum().backward()
        report = gw.step()
    nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
    assert [f.layer for f in nonfinite] == ["2"]
    assert nonfinite[0].severity == "error" and nonfinite[0].remedies[0].id == "check-nonfinite"


def test_nan_strategy_raise_stops_before_the_update():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(8, 4)
    with quiet(), GradWatch(model, every_n_steps=1, nan_strategy="raise") as gw:
        (model(x).sum() * float("nan")).backward()
        with pytest.raises(NonFiniteError, match="non-finite") as info:
            gw.step()
        assert any(f.kind == "nonfinite" for f in info.value.report.findings)
        assert gw.current_step == 1  # the step was counted; training may go on after a fix

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with quiet(), GradWatch(model, optimizer=opt, every_n_steps=1, nan_strategy="raise"):
        (model(x).sum() * float("inf")).backward()
        with pytest.raises(NonFiniteError):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied

    with quiet(), GradWatch(model, every_n_steps=1) as gw:  # the default: report, go on
        model.zero_grad()
        (model(x).sum() * float("nan")).backward()
        assert any(f.kind == "nonfinite" for f in gw.step().findings)


class _TwoOutputs(torch.autograd.Function):
    """Two outputs, gradients not materialised: an unused output's tensor hook gets None, as
    cuDNN's RNN backward gives the h_n and c_n that a loss does not use."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w)
        y = x @ w
        return y, 2 * y

    @staticmethod
    def backward(ctx, gy, g2y):
        x, w = ctx.saved_tensors
        g = gy if g2y is None else gy + 2 * g2y
        return g @ w.T, x.T @ g


class TwoOutputLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) / 8**0.5)

    def forward(self, x):
        return _TwoOutputs.apply(x, self.w)


class UsesOneOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.two, self.act, self.head = (
            nn.Linear(4, 8),
            TwoOutputLayer(),
            nn.Tanh(),
            nn.Linear(8, 3),
        )

    def forward(self, x):
        y, _unused = self.two(self.inp(x))
        return self.head(self.act(y))


def _keep_output_grads(model, names):
    """Forward hooks that keep, by name, each module's output (the first, of several) with its
    gradient retained: the brute-force backward signal where the loss uses only that one."""
    outs = {}

    def keep(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            t.retain_grad()
            outs[name] = t

        return hook

    for name in names:
        model.get_submodule(name).register_forward_hook(keep(name))
    return outs


def _rms(t):
    return t.pow(2).mean().sqrt().item()


def test_an_output_no_gradient_reaches_is_left_out_and_the_step_is_measured():
    """A None gradient at an output means none reached it: the layer's signal is that of its
    other outputs, and every other layer of the step is measured (it used to lose the step)."""
    model = UsesOneOutput()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(model)
    outs = _keep_output_grads(ref, ["inp", "two", "head"])
    F.cross_entropy(ref(x), y).backward()
    with GradWatch(model, every_n_steps=1) as gw:  # a warning would fail the test
        for step in range(3):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            report = gw.step()
            assert report.step == step and report.unmeasured == {}
            for name in ("inp", "two", "head"):
                assert report.layers[name].signal == pytest.approx(_rms(outs[name].grad), rel=1e-5)
                want = own_grad_norm(ref.get_submodule(name))
                assert report.layers[name].grad_norm == pytest.approx(want, rel=1e-5)
            assert report.layers["act"].saturation is not None


class LSTMLastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 12, num_layers=2, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_an_lstm_whose_final_states_go_unused_is_measured_like_a_brute_force_reference():
    """The loss reads the sequence output only: an nn.LSTM's signal is that output's gradient,
    whichever backward kernel runs (cuDNN's gives h_n and c_n None, as in the test above)."""
    model = LSTMLastStep()
    x, y = torch.randn(5, 7, 6), torch.randint(0, 3, (5,))
    ref = copy.deepcopy(model)
    outs = _keep_output_grads(ref, ["lstm"])
    F.cross_entropy(ref(x), y).backward()
    with GradWatch(model, every_n_steps=1) as gw:
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    assert report.layers["lstm"].signal == pytest.approx(_rms(outs["lstm"].grad), rel=1e-5)
    assert report.layers["lstm"].grad_norm == pytest.approx(own_grad_norm(ref.lstm), rel=1e-5)


# -- lifecycle -------------------------------------------------------------------------------------


def test_attaching_twice_is_a_clear_error_until_the_first_is_closed_or_gone():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    first = GradWatch(model)
    with pytest.raises(RuntimeError, match="already watched"):
        GradWatch(model)
    first.close()
    second = GradWatch(model)  # fine after close
    del second
    gc.collect()
    # The dropped watcher's hooks stay on the model, inert (it never closed): one set of them.
    assert _hooks(model) == [("", 2, 2), ("0", 1, 1), ("1", 1, 1)]
    with GradWatch(model, every_n_steps=1) as third:  # attaching again works, measured once
        assert _hooks(model) == [("", 4, 4), ("0", 2, 2), ("1", 2, 2)]
        model(torch.randn(3, 2)).sum().backward()
        report = third.step()
    assert report.layers["0"].calls == 1 and report.layers["1"].calls == 1
    assert _hooks(model) == [("", 2, 2), ("0", 1, 1), ("1", 1, 1)]


def _hooks(model):
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("where", ["a file", "under a file", "refused"])
def test_an_unusable_log_dir_is_a_value_error_naming_it_and_the_model_stays_as_it_was(
    tmp_path, monkeypatch, where
):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    before = _hooks(model)
    file = tmp_path / "events"
    file.write_text("not a directory")
    log_dir, why = {
        "a file": (file, "is a file"),
        "under a file": (file / "run1", "is a file"),
        "refused": (tmp_path / "run1", r"Permission denied \(PermissionError\)"),
    }[where]
    with monkeypatch.context() as patch:
        if where == "refused":  # the file system says no only when the writer makes the files
            import torch.utils.tensorboard as tb

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            patch.setattr(tb, "SummaryWriter", refuse)
        with pytest.raises(ValueError, match=rf"log_dir='{re.escape(str(log_dir))}'.*{why}"):
            GradWatch(model, log_dir=log_dir)
    assert _hooks(model) == before
    with GradWatch(model, log_dir=tmp_path / "run") as gw:  # a second watcher: hooks once
        once = _hooks(model)
        model(torch.randn(3, 2)).sum().backward()
        assert gw.step().layers["0"].calls == 1
    assert once == [("", 2, 2), ("0", 1, 1), ("1", 1, 1), ("2", 1, 1)]
    assert _hooks(model) == before


def test_a_constructor_that_fails_after_attaching_removes_every_hook():
    class Refuses(torch.optim.SGD):
        def register_step_pre_hook(self, hook):
            raise RuntimeError("no hooks on this optimizer")

    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    before = _hooks(model)
    with pytest.raises(RuntimeError, match="no hooks on this optimizer"):
        GradWatch(model, optimizer=Refuses(model.parameters(), lr=0.1))
    assert _hooks(model) == before
    GradWatch(model).close()  # not "already watched"


def test_a_watcher_pickles_to_a_detached_copy_with_its_history():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)
    with quiet(), GradWatch(model, every_n_steps=1, weight_norm_every=4) as gw:
        for _ in range(2):
            model(x).sum().backward()
            gw.step()
        copy = pickle.loads(pickle.dumps(gw))
    assert copy.report.to_dict() == gw.report.to_dict()
    # step 1 does not read the weights (every 4th); its saturation finding is not new
    assert copy.weight_norm_every == 4 and copy.report.weight_step == 0
    assert copy.first_seen == gw.first_seen == {"1|saturation": 0}
    assert copy.current_step == 2
    with pytest.raises(RuntimeError, match="after close"):
        copy.step()


# -- torch.compile ---------------------------------------------------------------------------------


def test_attaching_after_the_first_compiled_call_warns_instead_of_going_silent():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))
    run = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 8)
    run(x).sum().backward()  # compiled without hooks
    with GradWatch(model, every_n_steps=1) as gw:
        run(x).sum().backward()
        with pytest.warns(gradwatch.GradWatchWarning, match="compiled before gradwatch attached"):
            report = gw.step()
            gw.flush()  # the worker's warnings: at the next call, or here
    torch._dynamo.reset()
    assert report.layers["0"].grad_norm is not None  # .grad is still read at the boundary
    assert report.layers["0"].signal is None


# -- crash durability ------------------------------------------------------------------------------


def test_a_killed_run_leaves_its_findings_on_disk(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, warnings, torch
        from torch import nn
        import gradwatch
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
        gw = gradwatch.GradWatch(model, log_dir={str(tmp_path / "run")!r}, every_n_steps=1)
        x = 1e5 + 3e4 * torch.randn(64, 1)
        model(x).sum().backward()
        r = gw.step()
        print("FOUND" if r.findings else "NONE", flush=True)
        time.sleep(600)  # still running, nothing else written: only the finding's flush saved it
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert line == "FOUND"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert "gradwatch/findings/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("gradwatch/findings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "saturation" in text
    out = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "report", str(tmp_path), "--fail-on", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "saturation" in out.stdout


def test_watcher_lets_the_model_go_after_close_and_del():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    ref = weakref.ref(model)
    gw = GradWatch(model, every_n_steps=1)
    model(torch.randn(3, 2)).sum().backward()
    with quiet():
        gw.step()
    gw.close()
    del model
    gc.collect()
    assert ref() is None
