"""The hooks (gradwatch.probes): what they see, where they go on and off, and their buffers."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwatch
from gradwatch import GradWatch

from .helpers.nets import Functional, hooked, measure_steps, reference_signals, small_net


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
    assert not gw._probes.signals.slots.used and not gw._probes.unit_counts.slots.used


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
            gw.flush()
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


def test_hooks_come_off_between_distant_logging_steps_and_measure_the_same():
    model = small_net()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    sparse, hooked_by_step = measure_steps(model, x, y, every=5, steps=11)
    dense, always = measure_steps(model, x, y, every=1, steps=11)
    all_modules = [n for n, _ in model.named_modules()]
    # logging steps 0, 5, 10 run with every module hooked; the steps between with the root's
    # pre-hook alone (it reads the schedule's flag), and nothing is left after close
    for step, names in enumerate(hooked_by_step):
        assert names == (all_modules if step % 5 == 0 else [""]), step
    assert all(names == all_modules for names in always)
    assert hooked(model) == []
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
    _, hooked_by_step = measure_steps(model, x, y, every=3, steps=7)
    assert all(len(names) == 6 for names in hooked_by_step)  # re-adding them would cost more


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
    rows = taken.signal.tolist()  # per entry: sum of squares, elements
    assert [e.name for e in taken.entries] == [e.name for e in entries]
    for i, (sumsq, count) in enumerate(rows):
        assert count == 200 * 3
        assert sumsq == pytest.approx(200 * 3.0 * (i + 1) ** 2)


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


def test_tiny_signals_are_measured_to_the_edge_of_fp32():
    """A vanishing layer's signal must read its value, not 0: gradients of 1e-18 per element
    (squares 1e-36, near the bottom of fp32's normal range) against a brute-force reference.
    Below about 1e-19 per element, fp32's own norm kernels return 0 (docs/limits.md)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    with GradWatch(model, warn=False) as gw:
        (model(x).sum() * 1e-18).backward()
        report = gw.step()
    ref = copy.deepcopy(model).double()
    hidden = ref[0](x.double())
    hidden.retain_grad()
    (ref[1](hidden).sum() * 1e-18).backward()
    expected = {"0": hidden.grad, "1": torch.full((4, 1), 1e-18, dtype=torch.float64)}
    for name, grad in expected.items():
        rms = grad.pow(2).mean().sqrt().item()
        assert report.layers[name].signal == pytest.approx(rms, rel=1e-5, abs=0)
        norm = grad.norm().item()
        assert report.layers[name].signal_norm == pytest.approx(norm, rel=1e-5, abs=0)


def test_pooled_marks_activations_with_one_value_per_sample_and_unit():
    """A squeeze-and-excitation gate's (N, C, 1, 1) output is pooled; a feature map and an MLP's
    (N, F) hidden layer are not."""
    from .helpers import zoo

    model = torch.nn.Sequential(zoo.se_cnn(), torch.nn.Sigmoid())
    with GradWatch(model, every_n_steps=1, warn=False) as gw:
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        r = gw.step()
    pooled = {n: s.pooled for n, s in r.layers.items() if s.activation}
    assert pooled["0.0.3.scale_activation"] is True and pooled["0.0.3.activation"] is True
    assert pooled["0.0.2"] is False  # Hardswish over the feature map
    assert pooled["1"] is False  # (N, 10): a vector per sample, but no feature-map layout
    assert all(s.pooled is None for s in r.layers.values() if not s.activation)
