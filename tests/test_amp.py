"""Mixed precision on CPU: fp16 autocast with a real ``torch.amp.GradScaler``, whose overflow steps
gradwatch must report as skipped, in the explicit mode and in optimizer mode alike."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch
from gradwatch.output.logreader import read_run

OVERFLOW = 1e30  # times the loss: fine in fp32, inf once the gradient reaches fp16 activations


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _train(mode, every, overflow_at, steps=6, log_dir=None, device="cpu"):
    """fp16 autocast steps with a GradScaler; the loss of the steps in ``overflow_at`` overflows.
    ``mode``: "explicit" (``scaler.unscale_``, then ``gw.step()``) or "optimizer" (optimizer=).
    The reports by step, and the scales after each step."""
    model = _net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    gen = torch.Generator().manual_seed(1)
    reports, scales = {}, []
    gw = GradWatch(
        model,
        every_n_steps=every,
        optimizer=opt if mode == "optimizer" else None,
        scaler=scaler,
        log_dir=log_dir,
    )
    with gw:
        for step in range(steps):
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device, dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            if step in overflow_at:
                loss = loss * OVERFLOW
            scaler.scale(loss).backward()
            if mode == "explicit":
                scaler.unscale_(opt)
                gw.step()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if gw.report is not None and gw.report.step == step:
                reports[step] = gw.report
            scales.append(scaler.get_scale())
            assert gw.current_step == step + 1  # a skipped step is a step in both modes
    return reports, scales


OVERFLOW_CASES = pytest.mark.parametrize(
    "every, overflow_at",
    [(1, {1}), (1, {1, 2}), (2, {1}), (2, {2})],
    ids=["every-1", "two-in-a-row", "overflow-off-schedule", "overflow-on-a-logging-step"],
)


@OVERFLOW_CASES
def test_an_fp16_overflow_is_a_skipped_step_in_optimizer_mode_as_in_the_explicit_mode(
    every, overflow_at
):
    check_overflow_steps(every, overflow_at, "cpu")


def check_overflow_steps(every, overflow_at, device):
    """Both modes report the same steps, the overflow ones as skipped with no finding, and each
    step measures its own forward and backward only."""
    explicit, scales = _train("explicit", every, overflow_at, device=device)
    optimizer, scales_opt = _train("optimizer", every, overflow_at, device=device)
    assert scales == scales_opt
    assert scales[min(overflow_at)] < 2.0**10  # the scaler did see an overflow
    assert sorted(optimizer) == sorted(explicit) == list(range(0, 6, every))
    for step, report in optimizer.items():
        got, want = report.to_dict(), explicit[step].to_dict()
        # only optimizer mode knows the optimizer, so only it measures the next update's size
        # and knows the learning rate
        assert got.pop("learning_rate") == 0.1 and want.pop("learning_rate") is None
        for row, want_row in zip(got["layers"], want["layers"], strict=True):
            assert row.pop("update_gain") is None or not report.skipped
            assert want_row.pop("update_gain") is None
        if device == "cpu":
            assert got == want, step
        else:  # the same kernels, but a GPU need not sum in the same order twice
            rows, want_rows = got.pop("layers"), want.pop("layers")
            assert got == want, step
            for row, want_row in zip(rows, want_rows, strict=True):
                for key, value in want_row.items():
                    if isinstance(value, float):
                        assert row[key] == pytest.approx(value, rel=1e-5), (step, key, row)
                    else:
                        assert row[key] == value, (step, key, row)
        assert report.skipped == (step in overflow_at)
        assert report.findings == []  # no nonfinite error on the overflow step nor after it
        for name, s in report.layers.items():
            assert s.calls == 1, (step, name)  # each step measures its own forward only
            if s.activation is None and not report.skipped:
                assert s.signal is not None and s.signal > 0


def test_the_skipped_step_is_written_to_tensorboard(tmp_path):
    _train("optimizer", 1, {2}, steps=4, log_dir=tmp_path)
    run = read_run(tmp_path, "run")
    assert run.scalars["gradwatch/global/skipped"] == {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0}
    assert all(v == 0 for v in run.scalars["gradwatch/global/findings_nonfinite"].values())


def test_a_watched_scaler_copies_and_pickles_unwatched_and_close_gives_its_method_back():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    gw = GradWatch(model, every_n_steps=1, optimizer=opt, scaler=scaler)
    assert "update" in vars(scaler)  # gradwatch's stand-in: see optimizer_mode.ScalerUpdate
    scaler.scale(model(torch.randn(2, 16)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    for clone in (copy.deepcopy(scaler), pickle.loads(pickle.dumps(scaler))):
        assert clone.update.__self__ is clone  # its own plain method, not the watcher's
        assert clone.update.__func__ is type(clone).update
        assert clone.get_scale() == scaler.get_scale()
    gw.close()
    assert "update" not in vars(scaler)
    assert scaler.update.__func__ is type(scaler).update


class _SlottedScaler:
    """A scaler whose class takes no new attribute (``__slots__``): nothing can stand in for its
    ``update``."""

    __slots__ = ("steps",)

    def __init__(self):
        self.steps = 0

    def get_scale(self):
        return 1.0

    def update(self):
        self.steps += 1


@pytest.mark.parametrize("scaler", [_SlottedScaler(), object.__new__(type("NoUpdate", (), {
    "get_scale": lambda self: 1.0}))], ids=["slotted", "no-update"])  # fmt: skip
def test_optimizer_mode_takes_a_scaler_it_cannot_watch_and_measures_as_usual(scaler):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every_n_steps=1, optimizer=opt, scaler=scaler) as gw:
        for step in range(2):
            F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
            opt.step()
            if hasattr(scaler, "update"):
                scaler.update()
            opt.zero_grad()
            assert gw.report.step == step and not gw.report.skipped
    assert getattr(scaler, "steps", 2) == 2


def test_a_scaler_that_skips_every_step_is_an_error_once_its_scale_falls_below_1():
    """NaN weights make every gradient NaN: the GradScaler skips each step and halves its scale.
    Skipped steps are no finding while that can be an fp16 overflow; below a scale of 1 it
    cannot, and the run is silently not training."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    reports = {}
    with GradWatch(model, every_n_steps=1, scaler=scaler, warn=False) as gw:
        for step in range(6):
            if step == 1:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            reports[step] = gw.step()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    scales = {s: r.loss_scale for s, r in reports.items()}
    assert scales == {0: 4.0, 1: 4.0, 2: 2.0, 3: 1.0, 4: 0.5, 5: 0.25}
    assert all(r.skipped for s, r in reports.items() if s >= 1)
    assert [s for s, r in reports.items() if r.findings] == [4, 5]
    f = reports[4].findings[0]
    assert f.kind == "nonfinite" and f.severity == "error"
    assert "fallen to 0.5" in f.message and "stopped training" in f.message
