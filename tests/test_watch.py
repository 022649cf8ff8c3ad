"""The GradWatch engine: every number against a hand-computed reference, the schedule, modes,
lifecycle and argument checking."""

import copy
import io
import json
import logging
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwatch
from gradwatch import GradWatch, Thresholds

from .helpers.zoo import classification_batch


def small_net(inplace=False):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def reference_signals(model, x, y):
    """dL/d(output) of every leaf module by retain_grad, on a copy of the model without gradwatch."""
    ref = copy.deepcopy(model)
    outs = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outs[name] = out

        return hook

    for name, m in ref.named_modules():
        if name:
            m.register_forward_hook(keep(name))
    F.cross_entropy(ref(x), y).backward()
    return {n: math.sqrt(o.grad.pow(2).mean().item()) for n, o in outs.items()}, ref


# float64 too: gradwatch's fp32 norms must not refuse (vector_norm will not narrow) a double model.
DTYPES = [torch.float32, torch.float64]


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


def test_user_tensor_hooks_on_the_same_outputs_run_beside_the_signal_and_stay_removable():
    # gradwatch adds its output hook into the tensor's hook dict itself (no handle): a user's
    # hooks registered on the same tensor before ours (forward hook attached first) and after
    # (attached later) must both still run, and a removed one must stop.
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    ref, _ = reference_signals(model, x, y)
    seen: dict[str, list[float]] = {"before": [], "after": []}
    handles = []

    def user(when):
        def forward_hook(module, args, out):
            handles.append(out.register_hook(lambda g: seen[when].append(g.norm().item())))

        return forward_hook

    model[2].register_forward_hook(user("before"))
    with GradWatch(model, every_n_steps=1) as gw:
        model[2].register_forward_hook(user("after"))
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
        expected = ref["2"] * math.sqrt(8 * 32)  # RMS back to the norm
        assert seen["before"] == [pytest.approx(expected, rel=1e-5)]
        assert seen["after"] == [pytest.approx(expected, rel=1e-5)]
        assert report.layers["2"].signal == pytest.approx(ref["2"], rel=1e-5)

        handles.clear()
        out = model(x)  # a second step: the "before" hook's tensor hook is removed at once
        handles[0].remove()
        F.cross_entropy(out, y).backward()
        report = gw.step()
    assert len(seen["before"]) == 1 and len(seen["after"]) == 2
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


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.Sigmoid()

    def forward(self, x):
        for _ in range(3):
            x = torch.sigmoid(self.fc(x))
        x = F.gelu(x) + x.tanh() + F.leaky_relu(x, 0.2) + self.act(x)
        return F.relu(x, inplace=True)


def test_functional_activations_are_named_by_caller_and_call_index():
    model = Functional()
    x = torch.randn(4, 8)
    with GradWatch(model, every_n_steps=1) as gw:
        model(x).sum().backward()
        report = gw.step()
    names = list(report.layers)
    assert names == [
        "fc",
        ":sigmoid#0",
        ":sigmoid#1",
        ":sigmoid#2",
        ":gelu#0",
        ":tanh#0",
        ":leaky_relu#0",
        "act",
        ":relu#0",
    ]
    # nn.Sigmoid's own torch.sigmoid call is counted once, as the module
    assert report.layers["act"].calls == 1 and report.layers["fc"].calls == 3
    h = x
    for _ in range(3):
        h = torch.sigmoid(model.fc(h))
    sat = torch.sigmoid(model.fc(torch.sigmoid(model.fc(x))))  # output of the 2nd call
    s = sat * (1 - sat)
    assert report.layers[":sigmoid#1"].saturation == pytest.approx(
        (s < 0.0025).float().mean().item()
    )
    assert report.layers[":gelu#0"].activation == "gelu"
    # the backward signal is measured at the parameterised layer the activations surround
    assert report.layers[":gelu#0"].signal is None and report.layers["fc"].signal is not None


def test_module_called_several_times_aggregates_calls():
    lin = nn.Linear(6, 6)
    model = nn.Sequential()
    model.add_module("shared", lin)

    class Thrice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = lin

        def forward(self, x):
            return self.shared(self.shared(self.shared(x)))

    model = Thrice()
    x = torch.randn(5, 6)
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    h = model.shared.register_forward_hook(keep)
    with GradWatch(model, every_n_steps=1) as gw:
        model(x).pow(2).sum().backward()
        report = gw.step()
    h.remove()
    sumsq = sum(o.grad.pow(2).sum().item() for o in outs)
    assert report.layers["shared"].calls == 3
    assert report.layers["shared"].signal == pytest.approx(math.sqrt(sumsq / (3 * 30)), rel=1e-5)
    assert report.layers["shared"].grad_norm == pytest.approx(
        math.sqrt(lin.weight.grad.pow(2).sum().item() + lin.bias.grad.pow(2).sum().item()), rel=1e-5
    )


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


def test_off_schedule_steps_register_no_tensor_hooks_and_count_nothing():
    model = small_net()
    x = torch.randn(4, 16)
    with GradWatch(model, every_n_steps=2) as gw:
        model(x).sum().backward()
        gw.step()  # step 0 measured; step 1 is not
        out = model(x)
        assert not out._backward_hooks  # no tensor hook on an unlogged step
        entries = gw._probes.ordered_entries()
        assert not any(e.seen or any(r for _, r in e.segments.values()) for e in entries)
    assert not gw._probes.signal_slots.used and not gw._probes.count_slots.used


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


def test_ddp_and_compile_prefixes_are_stripped():
    model = small_net()

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    Wrapper.__name__ = "DistributedDataParallel"
    with GradWatch(Wrapper(model), every_n_steps=1) as gw:
        Wrapper(model)(torch.randn(2, 16)).sum().backward()
        r = gw.step()
    assert "0" in r.layers and not any(n.startswith("module.") for n in r.layers)


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


def test_exception_inside_forward_leaves_no_mode_behind():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            torch.sigmoid(self.fc(x))
            raise ValueError("boom")

    model = Boom()
    from torch.overrides import _get_current_function_mode_stack

    with GradWatch(model, every_n_steps=1) as gw:
        with pytest.raises(ValueError):
            model(torch.randn(2, 3))
        with pytest.warns(gradwatch.GradWatchWarning, match="no parameter has a gradient"):
            gw.step()
        assert not _get_current_function_mode_stack()


def test_watched_model_deepcopies_and_saves_with_inert_hooks():
    model = small_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = GradWatch(model, every_n_steps=1)
        ema = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        x = torch.randn(3, 16)
        ema(x).sum().backward()
        loaded(x).sum().backward()
        r = gw.step()
        gw.close()
    assert r.layers["0"].calls == 0  # the copies' forwards were not counted


def test_report_to_dict_is_strict_json_and_str_is_a_table():
    model = small_net()
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with GradWatch(model, every_n_steps=1) as gw:
            (model(x).sum() * float("nan")).backward()
            r = gw.step()
    text = json.dumps(r.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["layers"][0]["grad_norm"] is None  # NaN became null
    assert any(f["kind"] == "nonfinite" for f in back["findings"])
    table = str(r)
    assert "global grad norm" in table and "[error]" in table and "check-nonfinite" in table


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
        model.train()
        model.zero_grad(set_to_none=True)
        with pytest.warns(gradwatch.GradWatchWarning, match="no parameter has a gradient"):
            model(torch.randn(2, 16))
            gw.step()


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
    assert r is not None
    gw.close()


@pytest.mark.parametrize(
    "owner, where, only, lost",
    [
        ("stats", "flat_counts", None, ["1", "3"]),  # every activation's count
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
    from gradwatch import probes, stats

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
        assert calls == ["tolist"]
        calls.clear()
        model(x).sum().backward()
        assert gw.step() is None
        assert calls == []


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)
        self.reentrant = reentrant

    def forward(self, x):
        block = lambda t: self.act(self.a(t))  # noqa: E731
        if self.reentrant is None:
            return self.b(block(x))
        return self.b(checkpoint(block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_once_and_keeps_the_signal(reentrant):
    x = torch.randn(16, 8, requires_grad=True)
    reports = {}
    for variant in (None, reentrant):
        torch.manual_seed(0)
        model = Checkpointed(variant)
        with GradWatch(model, every_n_steps=1) as gw:
            model(x).sum().backward()
            reports[variant] = gw.step()
    plain, ckpt = reports[None], reports[reentrant]
    for name in ("a", "act", "b"):
        assert ckpt.layers[name].calls == 1
        assert ckpt.layers[name].saturation == plain.layers[name].saturation
    for name in ("a", "b"):
        assert plain.layers[name].signal is not None
        assert ckpt.layers[name].signal == pytest.approx(plain.layers[name].signal, rel=1e-6)


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


def _hooked(model):
    """Modules of ``model`` carrying a forward hook or pre-hook, by name."""
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def _measure_steps(model, x, y, every, steps):
    """Run ``steps`` steps (no optimizer: the same weights each step); the reports, and which
    modules were hooked during each step's forward."""
    reports, hooked = {}, []
    with GradWatch(model, every_n_steps=every) as gw:
        for step in range(steps):
            hooked.append(_hooked(model))
            F.cross_entropy(model(x), y).backward()
            report = gw.step()
            model.zero_grad()
            if report is not None:
                reports[step] = report
    return reports, hooked


def test_hooks_come_off_between_distant_logging_steps_and_measure_the_same():
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    sparse, hooked = _measure_steps(model, x, y, every=5, steps=11)
    dense, always = _measure_steps(model, x, y, every=1, steps=11)
    all_modules = [n for n, _ in model.named_modules()]
    # logging steps 0, 5, 10 run with every module hooked; the steps between with the root's
    # pre-hook alone (it reads the schedule's flag), and nothing is left after close
    for step, names in enumerate(hooked):
        assert names == (all_modules if step % 5 == 0 else [""]), step
    assert all(names == all_modules for names in always)
    assert _hooked(model) == []
    assert sorted(sparse) == [0, 5, 10]
    ref, _ = reference_signals(model, x, y)
    for step in (5, 10):
        for name, s in dense[step].layers.items():
            t = sparse[step].layers[name]
            for field in ("grad_norm", "signal", "saturation", "dead_units", "calls"):
                assert getattr(t, field) == getattr(s, field), (step, name, field)
        assert sparse[step].layers["2"].signal == pytest.approx(ref["2"], rel=1e-5)


def test_close_logging_steps_keep_the_hooks_on():
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    _, hooked = _measure_steps(model, x, y, every=3, steps=7)
    assert all(len(names) == 6 for names in hooked)  # re-adding them would cost more


def _nested_net():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), inner, nn.Linear(32, 4))


# inplace: nn.Module.compile(), which this torch may run eagerly (a leaf's compiles nothing)
@pytest.mark.parametrize("what", ["model", "container", "inplace"])
@pytest.mark.parametrize("compile_at", [0, 1])  # on a logging step, or between two
def test_a_model_compiled_after_attach_keeps_its_hooks_and_measures_like_eager(compile_at, what):
    # The hard case is a compiled container whose first call comes while the hooks are off:
    # dynamo does not guard on its children's hooks, so they must be back before it traces.
    torch._dynamo.reset()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    eager, _ = _measure_steps(_nested_net(), x, y, every=5, steps=11)
    model = _nested_net()
    reports = {}
    with GradWatch(model, every_n_steps=5) as gw:
        run = model
        for step in range(11):
            if step == compile_at and what == "model":
                run = torch.compile(model, backend="aot_eager")
            elif step == compile_at and what == "inplace":
                model[2].compile(backend="aot_eager")
            elif step == compile_at:
                model[2] = torch.compile(model[2], backend="aot_eager")
            F.cross_entropy(run(x), y).backward()
            report = gw.step()
            model.zero_grad()
            if report is not None:
                reports[step] = report
            if step >= compile_at and what != "inplace":  # they stay: compiled code would
                assert len(_hooked(model)) == 7, step  # not see hooks added back later
    torch._dynamo.reset()
    assert sorted(reports) == [0, 5, 10]
    for step in (5, 10):
        for name, s in eager[step].layers.items():
            c = reports[step].layers[name]
            for field in ("grad_norm", "signal", "saturation", "dead_units"):
                a, b = getattr(s, field), getattr(c, field)
                assert (a is None) == (b is None), (step, name, field)
                if a is not None:
                    assert b == pytest.approx(a, rel=1e-5, abs=1e-7), (step, name, field)


def test_torch_dynamo_reset_does_not_unhook_the_compile_watch():
    torch._dynamo.reset()  # drops every compile callback, gradwatch's too
    model = _nested_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with GradWatch(model, every_n_steps=5) as gw:
        F.cross_entropy(model(x), y).backward()
        gw.step()
        torch._dynamo.reset()
        F.cross_entropy(model(x), y).backward()
        gw.step()  # step 1: the callback is registered again
        assert _hooked(model) == [""]
        model[2] = torch.compile(model[2], backend="aot_eager")
        for _ in range(4):
            F.cross_entropy(model(x), y).backward()
            report = gw.step()
    torch._dynamo.reset()
    assert report.step == 5 and report.layers["2.0"].signal is not None
    assert report.layers["2.1"].saturation is not None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_attach_before_compile_gives_the_eager_numbers(backend):
    torch._dynamo.reset()
    x = torch.randn(16, 8)
    reports = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2)
        )
        with GradWatch(model, every_n_steps=1) as gw:
            run = torch.compile(model, backend=backend) if compiled else model
            for _ in range(2):
                run(x).sum().backward()
                report = gw.step()
                model.zero_grad()
        reports.append(report)
    torch._dynamo.reset()
    eager, compiled = reports
    assert list(compiled.layers) == list(eager.layers)
    for name, s in eager.layers.items():
        c = compiled.layers[name]
        assert c.calls == s.calls == 1
        for field in ("grad_norm", "signal", "saturation", "dead_units"):
            a, b = getattr(s, field), getattr(c, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:  # inductor fuses kernels: rounding differs slightly
                assert b == pytest.approx(a, rel=1e-4, abs=1e-7), (name, field)


class _ResidualBlock(nn.Module):
    """A functional activation behind a LayerNorm: functional entries and signal in one block."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        return F.relu(self.ln(self.fc(x))) + x


def _residual_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), _ResidualBlock(), _ResidualBlock(), nn.Linear(16, 1)
    )


def _train(model, run, every, steps, accumulate=1):
    """SGD steps through ``run`` (the model, or its compiled form), each of ``accumulate``
    micro-batches that repeat the step's batch; the reports by step."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reports = {}
    with GradWatch(model, every_n_steps=every) as gw:
        for step in range(steps):
            x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
            for _ in range(accumulate):
                (F.mse_loss(run(x), y) / accumulate).backward()
            report = gw.step()
            opt.step()
            opt.zero_grad()
            if report is not None:
                reports[step] = report
    return reports


def _assert_measured_alike(got, want, fields, rel):
    assert sorted(got) == sorted(want)
    for step, report in want.items():
        assert list(got[step].layers) == list(report.layers), step
        for name, s in report.layers.items():
            for field in fields:
                a, b = getattr(s, field), getattr(got[step].layers[name], field)
                assert (a is None) == (b is None), (step, name, field)
                if a is not None:
                    assert b == pytest.approx(a, rel=rel, abs=1e-7), (step, name, field, a, b)


@pytest.mark.parametrize(
    "every, fullgraph, backend",
    [
        (1, False, "aot_eager"),
        (1, True, "aot_eager"),
        (5, True, "aot_eager"),
        (1, True, "inductor"),
    ],
)
def test_a_compiled_model_measures_like_eager_step_after_step_in_one_graph(
    every, fullgraph, backend
):
    # 23 steps: past the 10th logged forward, where a counter read in a traced hook used to crash
    # training inside dynamo; fullgraph=True failed at once (the signal hook's side effects)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _residual_net()
    eager = _train(model, model, every, 23)
    counters.clear()
    model = _residual_net()
    run = torch.compile(model, fullgraph=fullgraph, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # dynamo's and gradwatch's own
        compiled = _train(model, run, every, 23)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert breaks == 0
    assert graphs == (1 if every == 1 else 2)  # measuring, and not (hooks idle off schedule)
    assert ":relu#0" in " ".join(compiled[0].layers)
    fields = ("grad_norm", "signal", "saturation", "dead_units", "calls")
    _assert_measured_alike(compiled, eager, fields, rel=1e-4 if backend == "inductor" else 1e-5)


def test_a_compiled_part_attached_after_compiling_reads_as_eager_functional_calls_included():
    # The block is compiled before attach: its layers sit under "_orig_mod", which the names
    # lose, and its F.relu is seen on every logging step, not only when the mode was on outside.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _residual_net()
    eager = _train(model, model, 1, 12)
    counters.clear()
    model = _residual_net()
    model[2] = torch.compile(model[2], fullgraph=True, backend="aot_eager")
    compiled = _train(model, model, 1, 12)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs <= 3  # before its F.relu was known, then with the mode off and on outside
    fields = ("grad_norm", "signal", "saturation", "dead_units", "calls")
    _assert_measured_alike(compiled, eager, fields, rel=1e-5)


class _BrokenGraphNet(nn.Module):
    """A user-defined model whose forward breaks the graph (as a Hugging Face model's logger
    call does): dynamo runs its forward eagerly and compiles each block's forward as a frame of
    its own, one compiled code for every block."""

    def __init__(self, blocks: int = 12, block: type[nn.Module] = _ResidualBlock):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 1)
        self.blocks = nn.ModuleList(block() for _ in range(blocks))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for i, block in enumerate(self.blocks):
            if i == 2:
                torch._dynamo.graph_break()
            h = block(h) * 0.5  # a residual stream that stays finite over 24 SGD steps
        return self.out(h)


@pytest.mark.filterwarnings("ignore::gradwatch.GradWatchWarning")  # its deep relus die: eager too
def test_a_compiled_model_with_a_graph_break_measures_every_layer_like_eager(caplog):
    # Before: the blocks run after dynamo's recompile limit were not measured at all (calls 0, no
    # signal), the functional relus after the break were named ":relu#k" (no calling block), and
    # dynamo compiled gradwatch's hooks as frames of their own until their recompile limit.
    torch._dynamo.reset()
    model = _BrokenGraphNet()
    eager = _train(model, model, 1, 24)
    model = _BrokenGraphNet()
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        compiled = _train(model, torch.compile(model, backend="aot_eager"), 1, 24)
    torch._dynamo.reset()
    fields = ("grad_norm", "signal", "saturation", "dead_units", "calls")
    _assert_measured_alike(compiled, eager, fields, rel=1e-5)
    names = set(eager[0].layers)  # each functional relu under its block, as eager names it
    assert {f"blocks.{k}:relu#0" for k in range(12)} | {":tanh#0", "inp", "out"} <= names
    # No frame of gradwatch's own is compiled, and no block compiles again (see the next test).
    hook_frames = [r for r in caplog.records if "gradwatch/probes/" in r.getMessage()]
    assert not hook_frames, hook_frames[0].getMessage()
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


class _BrokenBlock(_ResidualBlock):
    """A block that breaks the graph in its own forward: two graphs and a resume function."""

    def forward(self, x):
        h = self.ln(self.fc(x))
        torch._dynamo.graph_break()
        return F.relu(h) + x


@pytest.mark.filterwarnings("ignore::gradwatch.GradWatchWarning")
@pytest.mark.parametrize("block", [_ResidualBlock, _BrokenBlock])
def test_blocks_compiled_one_by_one_share_their_compiled_code_when_watched(block):
    # Each block's hooks used to read the block's name in traced code, and to append to one log:
    # dynamo guarded on both, compiled the block's forward again for every block, and ran the
    # blocks after its recompile limit (8) eagerly, with a warning. Watched or not, the number
    # of compiled graphs must not grow with the number of blocks.
    from torch._dynamo.utils import counters

    graphs = {}
    for blocks in (3, 12):
        torch._dynamo.reset()
        counters.clear()
        model = _BrokenGraphNet(blocks, block)
        compiled = _train(model, torch.compile(model, backend="aot_eager"), 1, 3)
        graphs[blocks] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs[12] == graphs[3], graphs
    model = _BrokenGraphNet(12, block)
    fields = ("grad_norm", "signal", "saturation", "dead_units", "calls")
    _assert_measured_alike(compiled, _train(model, model, 1, 3), fields, rel=1e-5)


def test_a_changed_private_dynamo_api_never_stops_an_attach(monkeypatch):
    # Skipping the hooks' frames goes through dynamo's private set_code_exec_strategy; another
    # torch may have it with other arguments.
    import torch._dynamo.eval_frame as eval_frame

    def changed(*args):
        raise TypeError("set_code_exec_strategy() takes other arguments")

    monkeypatch.setattr(eval_frame, "set_code_exec_strategy", changed)
    torch._dynamo.reset()  # the compile callback registers again at attach, and skips again
    model = _residual_net()
    reports = _train(model, model, 1, 2)
    torch._dynamo.reset()
    assert reports[1].layers["2.fc"].signal is not None


def test_a_compiled_model_under_gradient_accumulation_measures_its_first_micro_batch():
    # A second measured forward would read a longer log and compile again at every micro-batch:
    # compiled, a logging step measures its first micro-batch. These repeat one batch, so the
    # eager run (which measures all three) gives the same statistics.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _residual_net()
    eager = _train(model, model, 1, 6, accumulate=3)
    counters.clear()
    model = _residual_net()
    compiled = _train(model, torch.compile(model, fullgraph=True, backend="aot_eager"), 1, 6, 3)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 2  # the measured first micro-batch, and the others
    fields = ("grad_norm", "signal", "saturation", "dead_units")
    _assert_measured_alike(compiled, eager, fields, rel=1e-5)
    for report in compiled.values():
        assert {s.calls for s in report.layers.values()} == {1}
    assert {s.calls for s in eager[5].layers.values()} == {3}


def test_report_from_dict_inverts_to_dict():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with GradWatch(model, every_n_steps=1) as gw:
            model(x).sum().backward()
            r = gw.step()
    assert r.findings
    back = gradwatch.Report.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r
    with pytest.raises(ValueError, match="schema_version"):
        gradwatch.Report.from_dict({**r.to_dict(), "schema_version": 99})


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
    assert texts[-1].step == 2 and re.search(r"\| saturation \| \w+ \| 0 \|", last)  # since 0
    # ... because the resumed writer says so (TensorBoard would guess it from the step order).
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(tmp_path.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load() if e.HasField("session_log")]
    assert starts == [2]

    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"version": 7})


def test_one_relu_module_at_two_widths_counts_each_width_as_its_own_units():
    """A shared activation called at widths 6, 6 and 3 in one step: units of the same width are
    merged over calls, other widths are separate units; checked against the recorded outputs."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    lin1, lin2, lin3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
    with torch.no_grad():
        for lin in (lin1, lin2):
            lin.bias[:2] = -100.0  # units 0 and 1 are off in both width-6 calls
        lin3.bias[0] = -100.0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2, self.lin3, self.relu = lin1, lin2, lin3, relu

        def forward(self, x):
            return self.relu(self.lin3(self.relu(self.lin2(self.relu(self.lin1(x))))))

    model = Net()
    outs = []
    relu.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    with gradwatch.GradWatch(model, warn=False) as gw:
        model(torch.randn(16, 4)).sum().backward()
        s = gw.step().layers["relu"]
    six = torch.cat(outs[:2])  # 32 rows of the width-6 calls
    three = outs[2]
    dead = int((six <= 0).all(0).sum()) + int((three <= 0).all(0).sum())
    flat = int((six <= 0).sum()) + int((three <= 0).sum())
    assert dead >= 3  # the biased units, at least
    assert s.calls == 3
    assert s.dead_units == pytest.approx(dead / 9)
    assert s.saturation == pytest.approx(flat / (six.numel() + three.numel()))
    assert s.samples_per_unit == pytest.approx((six.numel() + three.numel()) / 9)


def test_slots_grow_keep_what_was_written_and_start_over_after_take():
    from gradwatch.probes import Slots

    cpu = torch.device("cpu")
    slots = Slots()
    a, out = slots.claim(50, cpu)
    out.copy_(torch.arange(50.0))
    b, out = slots.claim(100, cpu)  # beyond the first capacity: the buffer grows
    assert (a, b) == (0, 50) and out.numel() == 100
    out.copy_(torch.arange(50.0, 150.0))
    c, _ = slots.claim(2, cpu)
    slots.write(c, torch.tensor([150.0, 151.0]))  # the path for values on another device
    assert slots.take().tolist() == [float(v) for v in range(152)]
    assert slots.used == 0 and slots.take() is None
    assert slots.claim(1, cpu)[0] == 0


def test_functional_mode_runs_only_where_functional_activations_are_called_between_surveys():
    """Off survey forwards the functional mode is active inside the modules that call a
    functional activation and nowhere else; every forward still measures the activation."""
    from gradwatch.probes import SURVEY_EVERY

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(8, 8)  # calls F.linear only
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            return self.out(torch.tanh(3 * self.inner(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(8, 1))
    tanh_in: list[torch.Tensor] = []
    model[0].inner.register_forward_hook(lambda m, a, out: tanh_in.append(3 * out.detach()))
    steps = SURVEY_EVERY + 2
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        depth: list[int] = []  # torch function modes active inside model[0].inner, per forward
        model[0].inner.register_forward_pre_hook(  # after gradwatch's own: sees what it set
            lambda m, a: depth.append(torch._C._len_torch_function_stack())
        )
        for _ in range(steps):
            model(torch.randn(32, 8)).sum().backward()
            s = gw.step().layers["0:tanh#0"]
            y = torch.tanh(tanh_in[-1])
            assert s.calls == 1
            assert s.saturation == pytest.approx(float((1 - y * y < 1e-2).float().mean()))
    assert depth[0] == 1 and depth[SURVEY_EVERY] == 1  # surveys: the mode is everywhere
    assert depth[1:SURVEY_EVERY] == [0] * (SURVEY_EVERY - 1)


def test_signal_hooks_called_from_several_threads_keep_each_norm_with_its_layer():
    """Autograd runs a thread per device; concurrent hooks must not mix up slots and layers."""
    import threading

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    with gradwatch.GradWatch(model, warn=False) as gw:
        probes = gw._probes
        entries = [probes.module_entries[str(i)] for i in range(8)]
        for e in entries:
            probes.place(e)
            e.calls = 1
        grads = {e.name: torch.full((3,), float(i + 1)) for i, e in enumerate(entries)}

        def work(e):
            for _ in range(200):
                probes.add_signal(e, grads[e.name])

        threads = [threading.Thread(target=work, args=(e,)) for e in entries]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        taken = probes.take()
    norms = taken.signal.tolist()
    assert len(norms) == 8 * 200
    for i, owner in enumerate(taken.signal_owner):
        assert norms[i] == pytest.approx(math.sqrt(3) * (owner + 1))


def test_a_torch_function_mode_entered_inside_a_forward_is_left_alone():
    """A user's TorchFunctionMode entered inside a module's forward must still be the one its
    `with` exits, even when gradwatch switches its own mode off at a child module."""
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            x = torch.sigmoid(x)  # makes this block a functional caller
            with Counting() as mode:
                y = self.inner(x)  # gradwatch would switch its mode off here
                assert (
                    torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
                    is mode
                )
            return y

    model = nn.Sequential(Block(), nn.Linear(4, 1))
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        for _ in range(4):  # a survey, then targeted forwards
            depth = torch._C._len_torch_function_stack()
            model(torch.randn(8, 4)).sum().backward()
            assert gw.step().layers["0:sigmoid#0"].calls == 1
            assert torch._C._len_torch_function_stack() == depth  # nothing left behind
    assert Counting.calls > 0


def _own_norm(module: nn.Module) -> float:
    return math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in module.parameters()))


def test_weight_norms_are_measured_every_nth_logging_step_and_carried_between(tmp_path):
    from gradwatch.logreader import read_run

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
    assert sorted(run.scalars["gradwatch/weight_norm/0"]) == [0, 6, 12]  # written when measured
    assert sorted(run.scalars["gradwatch/grad_norm/0"]) == [0, 2, 4, 6, 8, 10, 12]
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
    with GradWatch(model, every_n_steps=1, weight_norm_every=100, warn=False) as gw:
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
    assert report.step == 5 and written == [5] and gw.current_step == 6
    assert report.layers["0"].calls == 1
    assert report.input_rms == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-5)
    for name in ("0", "2", "4"):
        assert report.layers[name].signal == pytest.approx(ref[name], rel=1e-5)
    gw.close()
    assert gw.end_step() is None  # closed: nothing to close
