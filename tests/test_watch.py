"""The GradWatch engine: every number against a hand-computed reference, the schedule, modes,
lifecycle and argument checking."""

import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import GradWatch, Thresholds

from .helpers.nets import DTYPES, Functional, reference_signals, small_net
from .helpers.zoo import classification_batch


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_and_weight_norms_match_hand_computed(dtype):
    model = small_net().to(dtype)
    x, y = torch.randn(8, 16, dtype=dtype), torch.randint(0, 4, (8,))
    with GradWatch(model, every_n_steps=1) as gw:
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    for name in ("0", "2", "4"):
        m = model.get_submodule(name)
        grad = math.sqrt(m.weight.grad.pow(2).sum().item() + m.bias.grad.pow(2).sum().item())
        weight = math.sqrt(m.weight.pow(2).sum().item() + m.bias.pow(2).sum().item())
        assert report.layers[name].grad_norm == pytest.approx(grad, rel=1e-5)
        assert report.layers[name].weight_norm == pytest.approx(weight, rel=1e-5)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert report.global_grad_norm == pytest.approx(total, rel=1e-5)


def test_a_parameter_replaced_between_steps_is_measured_in_its_place():
    # FSDP2 swaps parameters, and so does assigning a new nn.Parameter: the cached parameter
    # list must notice, or the old tensor (with no grad) would be measured
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with GradWatch(model, every_n_steps=1, weight_norm_every=1, warn=False) as gw:
        F.cross_entropy(model(x), y).backward()
        gw.step()
        model.zero_grad()
        model[2].weight = nn.Parameter(torch.full((32, 32), 0.05))
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    m = model[2]
    grad = math.sqrt(m.weight.grad.pow(2).sum().item() + m.bias.grad.pow(2).sum().item())
    weight = math.sqrt(m.weight.pow(2).sum().item() + m.bias.pow(2).sum().item())
    assert report.layers["2"].grad_norm == pytest.approx(grad, rel=1e-5)
    assert report.layers["2"].weight_norm == pytest.approx(weight, rel=1e-5)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert report.global_grad_norm == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_signal_matches_retain_grad_reference(dtype):
    model = small_net().to(dtype)
    x, y = torch.randn(8, 16, dtype=dtype), torch.randint(0, 4, (8,))
    ref, _ = reference_signals(model, x, y)
    with GradWatch(model, every_n_steps=1) as gw:
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    for name, value in ref.items():
        if report.layers[name].activation is None:
            assert report.layers[name].signal == pytest.approx(value, rel=1e-5), name
        else:  # an activation's output gradient is not hooked: its neighbours carry the signal
            assert report.layers[name].signal is None, name
    assert [n for n, s in report.layers.items() if s.signal is not None] == ["0", "2", "4"]
    n_out = 8 * 4
    assert report.layers["4"].signal_norm == pytest.approx(ref["4"] * math.sqrt(n_out), rel=1e-5)
    assert report.input_rms == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-5)


def test_signal_is_exact_before_an_inplace_relu():
    model = small_net(inplace=True)
    twin = small_net(inplace=False)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    ref, _ = reference_signals(twin, x, y)
    with GradWatch(model, every_n_steps=1) as gw:
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    assert report.layers["0"].signal == pytest.approx(ref["0"], rel=1e-5)
    assert report.layers["2"].signal == pytest.approx(ref["2"], rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturation_and_dead_units_match_brute_force(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)
    ).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(8)  # drive some sigmoid units into saturation
        model[2].bias[:2] = -100  # two ReLU units off for every input
    x = torch.randn(64, 4, dtype=dtype)
    with GradWatch(model, every_n_steps=1) as gw:
        model(x).sum().backward()
        report = gw.step()
    h = torch.sigmoid(model[0](x))
    deriv = h * (1 - h)
    flat = deriv < 1e-2 * 0.25
    assert report.layers["1"].saturation == pytest.approx(flat.float().mean().item())
    assert report.layers["1"].dead_units == pytest.approx(flat.all(0).float().mean().item())
    r = torch.relu(model[2](h))
    assert report.layers["3"].saturation == pytest.approx((r <= 0).float().mean().item())
    assert report.layers["3"].dead_units == pytest.approx((r <= 0).all(0).float().mean().item())
    assert report.layers["3"].dead_units >= 2 / 5
    assert report.layers["3"].samples_per_unit == 64
    assert report.layers["1"].activation == "sigmoid" and report.layers["0"].activation is None


def test_dead_units_use_channels_after_a_convolution():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias[1] = -1e3
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 3, 5, 5)
    with GradWatch(model, every_n_steps=1) as gw:
        model(x).sum().backward()
        report = gw.step()
    out = torch.relu(conv(x))
    per_channel = (out <= 0).permute(1, 0, 2, 3).reshape(4, -1).all(1)
    assert report.layers["1"].dead_units == pytest.approx(per_channel.float().mean().item())
    assert report.layers["1"].samples_per_unit == 2 * 5 * 5


def test_schedule_measures_steps_0_n_2n():
    model = small_net()
    x, y = torch.randn(4, 16), torch.randint(0, 4, (4,))
    measured = []
    with GradWatch(model, every_n_steps=3) as gw:
        for i in range(8):
            F.cross_entropy(model(x), y).backward()
            r = gw.step()
            model.zero_grad()
            if r is not None:
                measured.append((i, r.step))
                assert gw.report is r
    assert measured == [(0, 0), (3, 3), (6, 6)]


def test_callable_schedule():
    model = small_net()
    x = torch.randn(4, 16)
    with GradWatch(model, every_n_steps=lambda s: s in (1, 2)) as gw:
        got = []
        for _ in range(4):
            model(x).sum().backward()
            got.append(gw.step() is not None)
    assert got == [False, True, True, False]


def test_accumulation_covers_every_micro_batch():
    model = small_net()
    xs = [torch.randn(4, 16) for _ in range(3)]
    ys = [torch.randint(0, 4, (4,)) for _ in range(3)]
    twin = copy.deepcopy(model)
    with GradWatch(model, every_n_steps=1) as gw:
        for x, y in zip(xs, ys):
            F.cross_entropy(model(x), y).backward()
        report = gw.step()
    for x, y in zip(xs, ys):
        F.cross_entropy(twin(x), y).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]).item()
    assert report.global_grad_norm == pytest.approx(expected, rel=1e-5)
    assert report.layers["0"].calls == 3
    x_all = torch.cat(xs)
    h = torch.tanh(twin[2](torch.relu(twin[0](x_all))))
    assert report.layers["3"].saturation == pytest.approx(
        ((1 - h * h) < 1e-2).float().mean().item()
    )
    assert report.layers["1"].samples_per_unit == 12


def test_optimizer_mode_measures_inside_step_and_forbids_explicit_step():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 16), torch.randint(0, 4, (4,))
    with GradWatch(model, every_n_steps=2, optimizer=opt) as gw:
        seen = []
        for _ in range(5):
            F.cross_entropy(model(x), y).backward()
            grad = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
            opt.step()
            opt.zero_grad()
            if gw.report is not None and gw.report.step not in [s for s, _ in seen]:
                seen.append((gw.report.step, grad))
        with pytest.raises(RuntimeError, match="optimizer mode"):
            gw.step()
    assert [s for s, _ in seen] == [0, 2, 4]
    assert gw.report.global_grad_norm == pytest.approx(seen[-1][1], rel=1e-5)
    assert gw.current_step == 5


class FakeScaler:
    """Stands in for torch.amp.GradScaler: the loss scale the backward pass was run with."""

    def __init__(self, scale):
        self._scale = torch.tensor(float(scale))

    def get_scale(self):
        return float(self._scale)

    def is_enabled(self):
        return True


def test_scaler_signal_is_unscaled_and_overflow_is_a_skipped_step():
    model = small_net()
    x, y = torch.randn(4, 16), torch.randint(0, 4, (4,))
    ref, _ = reference_signals(model, x, y)
    scale = 2.0**16
    with GradWatch(model, every_n_steps=1, scaler=FakeScaler(scale)) as gw:
        (F.cross_entropy(model(x), y) * scale).backward()
        for p in model.parameters():  # what scaler.unscale_(optimizer) does
            p.grad.div_(scale)
        report = gw.step()
        assert report.layers["0"].signal == pytest.approx(ref["0"], rel=1e-4)
        assert not report.skipped
        model.zero_grad()
        model(x).sum().backward()
        model[0].weight.grad[0, 0] = float("inf")
        report = gw.step()
    assert report.skipped and report.findings == []


def test_real_gradscaler_on_cpu_is_accepted():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(4, 16), torch.randint(0, 4, (4,))
    ref, twin = reference_signals(model, x, y)
    with GradWatch(model, every_n_steps=1, optimizer=opt, scaler=scaler) as gw:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)  # unscales, then optimizer.step(): gradwatch measures in between
        scaler.update()
    r = gw.report
    assert r.layers["0"].signal == pytest.approx(ref["0"], rel=1e-4)
    expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]).item()
    assert r.global_grad_norm == pytest.approx(expected, rel=1e-4)


def test_eval_and_no_grad_forwards_change_nothing():
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    twin = copy.deepcopy(model)
    with GradWatch(model, every_n_steps=1) as gw, GradWatch(twin, every_n_steps=1) as gw2:
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model(torch.randn(8, 16) * 100)
        model.eval()
        model(torch.randn(8, 16) * 100)
        model.train()
        r = gw.step()
        F.cross_entropy(twin(x), y).backward()
        r2 = gw2.step()
    assert r.to_dict() == r2.to_dict()


def test_close_removes_every_hook_and_is_idempotent():
    model = Functional()
    before = {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = GradWatch(model, every_n_steps=1, optimizer=opt)
    assert all(m._forward_hooks for m in model.modules())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    gw.close()
    gw.close()
    after = {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    assert before == after
    assert not opt._optimizer_step_pre_hooks
    # the functional mode is gone: torch functions run without gradwatch
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()
    with pytest.raises(RuntimeError, match="after close"):
        gw.step()


def test_context_manager_detaches_on_exception():
    model = small_net()
    with pytest.raises(KeyError):
        with GradWatch(model, every_n_steps=1):
            model(torch.randn(2, 16))
            raise KeyError("the user's loop fails")
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"every_n_steps": "5"}, TypeError, ["every_n_steps", "'5'"]),
        ({"every_n_steps": True}, TypeError, ["every_n_steps", "True"]),
        ({"every_n_steps": 0}, ValueError, ["every_n_steps", "0"]),
        ({"log_dir": "a", "writer": object()}, ValueError, ["log_dir", "writer"]),
        ({"writer": object()}, TypeError, ["writer", "object"]),
        ({"log_dir": 3}, TypeError, ["log_dir", "int"]),
        ({"optimizer": "adam"}, TypeError, ["optimizer", "str"]),
        ({"thresholds": {"vanishing_ratio": 1e-3}}, TypeError, ["thresholds", "dict"]),
        ({"include": "0"}, TypeError, ["include"]),
        ({"scaler": 2.0}, TypeError, ["scaler", "float"]),
        ({"sync_dist": 1}, TypeError, ["sync_dist", "1"]),
        ({"warn": "no"}, TypeError, ["warn", "'no'"]),
        ({"nan_strategy": "ignore"}, ValueError, ["nan_strategy", "'ignore'", "'raise'"]),
        ({"weight_norm_every": 0}, ValueError, ["weight_norm_every", "0"]),
        ({"weight_norm_every": 2.5}, TypeError, ["weight_norm_every", "2.5", "float"]),
        ({"weight_norm_every": True}, TypeError, ["weight_norm_every", "True"]),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        GradWatch(small_net(), **kwargs)
    for w in words:
        assert w in str(info.value)


def test_non_module_and_unknown_keyword_are_rejected_by_name():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        GradWatch([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="every_n_step"):
        GradWatch(small_net(), every_n_step=5)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"vanishing_ratio": 2.0}, ValueError, "vanishing_ratio"),
        ({"exploding_ratio": 0.5}, ValueError, "exploding_ratio"),
        ({"saturation": 1.5}, ValueError, "saturation"),
        ({"saturation": 0.95, "saturation_error": 0.9}, ValueError, "_error"),
        ({"min_chain_length": 1}, ValueError, "min_chain_length"),
        ({"min_chain_length": 4.5}, TypeError, "min_chain_length"),
        ({"dead_units": "half"}, TypeError, "dead_units"),
        ({"input_rms": float("inf")}, ValueError, "input_rms"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ],
)
def test_thresholds_are_validated(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Thresholds(**kwargs)


def test_include_and_exclude_select_layers():
    model = small_net()
    with GradWatch(model, every_n_steps=1, exclude=["3"]) as gw:
        model(torch.randn(2, 16)).sum().backward()
        r = gw.step()
    assert "3" not in r.layers and "2" in r.layers
    with GradWatch(model, every_n_steps=1, include=["0", "1"]) as gw:
        model(torch.randn(2, 16)).sum().backward()
        r = gw.step()
    assert list(r.layers) == ["0", "1"]


def test_warnings_are_emitted_once_per_layer_and_kind():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, every_n_steps=1) as gw:
            for _ in range(3):
                model(x).sum().backward()
                gw.step()
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1 and "saturated" in str(ours[0].message)


def test_missing_forward_and_missing_grad_are_warned_not_silent():
    model = small_net()
    with GradWatch(model, every_n_steps=1) as gw:
        with pytest.warns(gradwatch.GradWatchWarning, match="no training forward"):
            model.eval()
            model(torch.randn(2, 16)).sum().backward()
            gw.step()
            gw.flush()  # the worker's warnings are given at the next call, or here
        model.train()
        model.zero_grad(set_to_none=True)
        with pytest.warns(gradwatch.GradWatchWarning, match="no parameter has a gradient"):
            model(torch.randn(2, 16))
            gw.step()
            gw.flush()


def test_model_without_trainable_parameters_warns_and_still_watches_activations():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    model.requires_grad_(False)
    x = torch.randn(8, 4, requires_grad=True)
    with pytest.warns(gradwatch.GradWatchWarning, match="no trainable parameters"):
        with GradWatch(model, every_n_steps=1) as gw:
            model(x).sum().backward()
            r = gw.step()
    assert r.layers["1"].saturation is not None and r.layers["0"].grad_norm is None


def test_a_failing_sink_warns_and_training_continues():
    class BrokenWriter:
        def add_scalar(self, *a, **k):
            raise OSError("disk full")

        add_text = add_scalar

        def flush(self):
            raise OSError("disk full")

    model = small_net()
    gw = GradWatch(model, every_n_steps=1, writer=BrokenWriter())
    with pytest.warns(gradwatch.GradWatchWarning, match="could not write"):
        model(torch.randn(2, 16)).sum().backward()
        r = gw.step()
        model(torch.randn(2, 16)).sum().backward()
        gw.step()
        gw.close()  # the worker's warnings are given at a later call, and at the latest here
    assert r is not None and r.layers


@pytest.mark.parametrize(
    "owner, where, only, lost",
    [
        ("stats", "flat_mask", None, ["1", "3"]),  # every activation's count
        ("stats", "norm_min_max", None, ["(model input)"]),  # the model input's statistics
        ("Probes", "add_signal", None, ["0", "2", "4"]),  # every backward hook
        ("Probes", "add_signal", "2", ["2"]),  # one layer's backward hook
    ],
)
def test_a_failing_hook_leaves_out_its_layer_alone_warns_once_and_training_continues(
    monkeypatch, owner, where, only, lost
):
    """An error inside gradwatch's hooks must not reach the user's step (the gradients are those
    of an unwatched twin) nor cost the other layers their measurements: the failed layers' hook
    statistics are left out and named in the report and in one warning, everything else is
    measured exactly, and a later step without the failure is measured in full."""
    from gradwatch import probes
    from gradwatch.measure import stats

    target = stats if owner == "stats" else probes.Probes
    model, twin = small_net(), small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    real = getattr(target, where)

    def broken(*args, **kwargs):
        entry = args[1] if where == "add_signal" else None
        if only is not None and entry.name != only:
            return real(*args, **kwargs)
        raise ValueError(f"{where} is broken")

    gw = GradWatch(model, every_n_steps=1)
    monkeypatch.setattr(target, where, broken)
    shown = ", ".join(f"`{name}`" for name in lost)
    with pytest.warns(
        gradwatch.GradWatchWarning, match=re.escape(f"not measure {shown} on step 0")
    ):
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
        gw.flush()
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    ref, _ = reference_signals(model, x, y)
    assert report is not None and report.step == 0
    assert report.unmeasured == dict.fromkeys(lost, f"ValueError: {where} is broken")
    for name, s in report.layers.items():
        assert s.calls == 1
        assert (s.grad_norm is None) == (s.activation is not None)  # from .grad, not a hook
        if name in lost:
            assert s.signal is s.saturation is s.dead_units is None
        elif s.activation is None:
            assert s.signal == pytest.approx(ref[name], rel=1e-5)
        else:
            assert s.saturation is not None
    assert (report.input_rms is None) == ("(model input)" in lost)
    assert "not measured: " + lost[0] in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure again: no second warning
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert gw.step().unmeasured == report.unmeasured
    monkeypatch.setattr(target, where, real)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    report = gw.step()
    assert report.step == 2 and report.unmeasured == {}
    assert report.layers["2"].signal == pytest.approx(ref["2"], rel=1e-5)
    assert report.layers["1"].calls == 1 and report.layers["1"].saturation is not None
    assert report.input_rms is not None
    back = gradwatch.Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.unmeasured == {}
    gw.close()


def test_a_failure_in_gradwatchs_own_bookkeeping_still_drops_only_that_step(monkeypatch):
    """A failure outside any one layer (here: closing a forward) cannot say which numbers it
    spoiled: that step is not reported, with a warning, and the next one is."""
    from gradwatch import probes

    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    real = probes.Probes.end_forward
    calls = []

    def broken(self):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("end_forward is broken")
        return real(self)

    monkeypatch.setattr(probes.Probes, "end_forward", broken)
    with GradWatch(model, every_n_steps=1) as gw:
        with pytest.warns(gradwatch.GradWatchWarning, match="could not measure step 0"):
            F.cross_entropy(model(x), y).backward()
            assert gw.step() is None
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    assert report.step == 1 and report.layers["0"].calls == 1


def test_zoo_batch_helper_is_deterministic():
    a, b = classification_batch(seed=3), classification_batch(seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_one_host_copy_per_logging_step_and_none_off_schedule(monkeypatch):
    model = Functional()
    x = torch.randn(4, 8)
    calls = []
    for name in ("tolist", "item", "__bool__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with GradWatch(model, every_n_steps=2) as gw:
        loss = model(x).sum()
        loss.backward()
        assert calls == []  # the hooks of a logging step never read a value back
        assert gw.step() is not None
        gw.flush()  # the copy is read on the background worker (test_background.py)
        assert calls == ["tolist"]
        calls.clear()
        model(x).sum().backward()
        assert gw.step() is None
        assert calls == []


def test_nothing_is_kept_alive_no_output_no_graph_no_model():
    import gc
    import weakref

    model = small_net()
    gw = GradWatch(model, every_n_steps=1)
    out = model(torch.randn(4, 16))
    out_ref = weakref.ref(out)
    out.sum().backward()
    del out
    gc.collect()
    assert out_ref() is None  # the hooks kept neither the output nor its graph
    gw.step()
    gw.close()
    model_ref, layer_ref = weakref.ref(model), weakref.ref(model[0])
    del model
    gc.collect()
    assert model_ref() is None  # a closed watcher does not pin the model
    assert layer_ref() is None  # nor its layers and their parameters
    assert gw.report is not None  # what was measured stays readable


def test_state_dict_resume_continues_steps_keeps_history_and_purges_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)

    def train(gw, steps):
        for _ in range(steps):
            model(x).sum().backward()
            gw.step()
            model.zero_grad()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gw = GradWatch(model, log_dir=tmp_path, every_n_steps=1)
        train(gw, 2)
        state = json.loads(json.dumps(gw.state_dict()))  # plain data
        train(gw, 2)  # steps 2, 3 happen, then the run "crashes" and restarts from the checkpoint
        gw.close()
        resumed = GradWatch(model, log_dir=tmp_path, every_n_steps=1)
        resumed.load_state_dict(state)
        assert resumed.current_step == 2 and resumed.report.step == 1
        assert resumed.first_seen == {"1|saturation": 0}
        train(resumed, 3)
        resumed.close()
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1  # the saturation was announced before the restart, not again
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradwatch/global/grad_norm")]
    assert steps == [0, 1, 2, 3, 4]  # the crashed run's steps 2 and 3 were purged, not doubled
    texts = acc.Tensors("gradwatch/findings/text_summary")
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert [t.step for t in texts[-2:]] == [2, 4]  # at the resume, and at close: the last step
    assert "saturation: layer `1` (Sigmoid) (first seen at step 0, still at step 4)" in last
    # the findings log says the crashed run's later records are void, and the reader obeys
    from gradwatch.output.logreader import read_run

    assert '"resume": 2' in (tmp_path / "gradwatch_findings.jsonl").read_text()
    assert read_run(tmp_path, "run").findings_step == 4
    # ... because the resumed writer says so (TensorBoard would guess it from the step order).
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(tmp_path.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load() if e.HasField("session_log")]
    assert starts == [2]

    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"version": 7})


def _own_norm(module: nn.Module) -> float:
    return math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in module.parameters()))


def test_weight_norms_are_measured_every_nth_logging_step_and_carried_between(tmp_path):
    from gradwatch.output.logreader import read_run

    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    seen = []  # (step, weight_step, reported norm, hand-computed norm before this step's update)
    gw = GradWatch(model, log_dir=tmp_path, every_n_steps=2, weight_norm_every=3, warn=False)
    for _ in range(14):
        F.cross_entropy(model(x), y).backward()
        now = _own_norm(model[0])
        report = gw.step()
        if report is not None:
            seen.append((report.step, report.weight_step, report.layers["0"].weight_norm, now))
            assert report.layers["0"].grad_norm is not None  # gradients: every logging step
        opt.step()
        opt.zero_grad()
    gw.close()
    # logging steps 0, 2, ..., 12; weights on the 1st, 4th and 7th of them
    assert [(step, ws) for step, ws, _, _ in seen] == [
        (0, 0),
        (2, 0),
        (4, 0),
        (6, 6),
        (8, 6),
        (10, 6),
        (12, 12),
    ]
    at = {step: now for step, _, _, now in seen}
    for _, ws, reported, _ in seen:
        assert reported == pytest.approx(at[ws], rel=1e-5)  # the norm at the weighing step
    assert at[0] != pytest.approx(at[6], rel=1e-3)  # the weights did move between them
    run = read_run(tmp_path, "run")
    assert sorted(run.scalars["gradwatch_7_weight_norm/0"]) == [0, 6, 12]  # written when measured
    assert sorted(run.scalars["gradwatch_4_grad_norm/0"]) == [0, 2, 4, 6, 8, 10, 12]
    back = gradwatch.Report.from_dict(json.loads(json.dumps(gw.report.to_dict())))
    assert back.weight_step == 12


def test_weight_norm_every_1_measures_them_on_every_logging_step():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with GradWatch(model, every_n_steps=1, weight_norm_every=1, warn=False) as gw:
        for step in range(3):
            F.cross_entropy(model(x), y).backward()
            now = _own_norm(model[2])
            report = gw.step()
            assert report.weight_step == step
            assert report.layers["2"].weight_norm == pytest.approx(now, rel=1e-5)
            opt.step()
            opt.zero_grad()


def test_a_non_finite_step_has_the_weights_measured_again_at_the_next_one():
    # Weights that turn NaN after they were measured: the step itself sees NaN gradients (the
    # carried weight norms are finite), the next logging step measures and names the weights.
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    # Synchronous: on the worker, a step's findings arrive after the next step was armed (with
    # every step logged, the weights are read one logging step later: test_background.py).
    options = dict(every_n_steps=1, weight_norm_every=100, warn=False, background=False)
    with GradWatch(model, **options) as gw:
        F.cross_entropy(model(x), y).backward()
        assert gw.step().weight_step == 0
        model.zero_grad()
        with torch.no_grad():
            model[2].weight[0, 0] = float("nan")
        F.cross_entropy(model(x), y).backward()
        first = gw.step()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        second = gw.step()
    assert first.weight_step == 0 and "non-finite gradients" in _message(first, "2")
    assert second.weight_step == 2 and "non-finite weights" in _message(second, "2")
    assert not math.isfinite(second.layers["2"].weight_norm)


def _message(report, layer: str) -> str:
    return next(f.message for f in report.findings if f.layer == layer and f.kind == "nonfinite")


def test_an_integration_marks_forwards_adds_sinks_and_closes_steps_through_the_public_surface():
    """What the Lightning callback uses: a training step that calls the layers but never the
    model, an outside step counter, a sink of its own, and a guarded end of step."""
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    ref, _ = reference_signals(model, x, y)
    written = []

    class Keep:
        def write(self, report):
            written.append(report.step)

    gw = GradWatch(model, every_n_steps=1, warn=False)
    gw.add_sink(Keep())
    with pytest.raises(TypeError, match="sink must have a write"):
        gw.add_sink(object())
    gw.go_to_step(5)
    gw.begin_forward(model, x)
    out = model[4](model[3](model[2](model[1](model[0](x)))))
    gw.end_forward()
    F.cross_entropy(out, y).backward()
    report = gw.end_step()
    gw.flush()
    assert report.step == 5 and written == [5] and gw.current_step == 6
    assert report.layers["0"].calls == 1
    assert report.input_rms == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-5)
    for name in ("0", "2", "4"):
        assert report.layers[name].signal == pytest.approx(ref[name], rel=1e-5)
    gw.close()
    assert gw.end_step() is None  # closed: nothing to close


def test_warnings_point_at_the_users_line_and_a_second_step_call_is_named():
    import inspect

    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(8, 8), nn.Sigmoid())])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    here = inspect.currentframe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_line = here.f_lineno + 1
        with GradWatch(model, every_n_steps=1) as gw:
            model(torch.randn(4, 8)).sum().backward()
            step_line = here.f_lineno + 1
            gw.step()
            twice_line = here.f_lineno + 1
            gw.step()  # no backward since the last call
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert ours and all(w.filename == __file__ for w in ours)
    vanishing = [w for w in ours if "vanish" in str(w.message)]
    # given on the user's thread at the next call after the worker finished step 0
    assert vanishing and vanishing[0].lineno in (step_line, twice_line, with_line)
    (twice,) = [w for w in ours if "same gradients" in str(w.message)]
    assert twice.lineno == twice_line and "no backward in between" in str(twice.message)
    assert not [w for w in ours if "no training forward" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # optimizer mode: the opt.step() line
        warnings.simplefilter("always")
        with_line = here.f_lineno + 1
        with GradWatch(model, optimizer=opt, every_n_steps=1):
            model(torch.randn(4, 8)).sum().backward()
            opt_line = here.f_lineno + 1
            opt.step()
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    # at the opt.step() line, or at the end of the block when the worker was not done by then
    assert ours and {w.filename for w in ours} == {__file__}
    assert {w.lineno for w in ours} <= {opt_line, with_line}
