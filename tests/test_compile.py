"""gradwatch under torch.compile: the hooks traced into the graph, graph breaks, compiled parts,
and the eager numbers, step after step."""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

from .helpers.nets import hooked, measure_steps, small_net


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
    eager, _ = measure_steps(_nested_net(), x, y, every=5, steps=11)
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
                assert len(hooked(model)) == 7, step  # not see hooks added back later
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
        assert hooked(model) == [""]
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
    # dphi2 and gain_factor on the steps that read the weights: the tanh's derivative is reduced
    # in the graph on every measured forward and kept on those steps
    fields = ("grad_norm", "signal", "saturation", "dead_units", "calls", "dphi2", "gain_factor")
    _assert_measured_alike(compiled, eager, fields, rel=1e-4 if backend == "inductor" else 1e-5)
    assert compiled[0].layers["1"].dphi2 is not None and compiled[0].layers["0"].gain_factor


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
