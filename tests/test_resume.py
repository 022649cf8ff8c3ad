"""A resumed run finds what the uninterrupted run finds, step for step.

Each case trains a run whose findings depend on what gradwatch remembers between logging steps (a
streak, a patience counter, the init audit, the curvature streaks, the first weight scale, the
recent gradient norms), stops it between two logging steps, saves model, optimizer and
``gw.state_dict()`` (through ``torch.save`` and JSON), builds everything afresh, loads it and goes
on; every logging step after the resume point must give the same findings, word for word.
"""

import io
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

from .helpers import runs, zoo
from .helpers.runs import SeqClassifier


def _findings(report):
    return [
        (f.layer, f.kind, f.severity, f.message, f.since, [r.id for r in f.remedies])
        for f in report.findings
    ]


def _run(setup, steps, every, resume_at=None, via_json=True):
    """Step -> findings of every logging step; with ``resume_at``, the run is saved before that
    step and continued by fresh objects."""
    model, opt, loss_of, watch = setup()
    gw = GradWatch(model, every_n_steps=every, warn=False, **watch)
    out = {}
    for step in range(steps):
        if step == resume_at:
            blob = io.BytesIO()
            saved = {"model": model.state_dict(), "opt": opt.state_dict(), "gw": gw.state_dict()}
            torch.save(saved, blob)
            gw.close()
            blob.seek(0)
            saved = torch.load(blob, weights_only=True)  # plain data: the safe loader takes it
            state = json.loads(json.dumps(saved["gw"])) if via_json else saved["gw"]
            model, opt, loss_of, watch = setup()
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            gw = GradWatch(model, every_n_steps=every, warn=False, **watch)
            gw.load_state_dict(state)
        loss = loss_of(model, step)
        opt.zero_grad()
        loss.backward()
        report = gw.step(optimizer=opt)
        opt.step()
        if report is not None:
            out[step] = _findings(report)
        if not math.isfinite(loss.item()):
            break
    gw.close()
    return out


def _same_after(setup, steps, every, resume_at, kind, **kw):
    """Asserts the resumed run's findings equal the uninterrupted run's after ``resume_at``,
    and that ``kind`` is among them (the rule under test did fire after the resume)."""
    whole = _run(setup, steps, every, **kw)
    resumed = _run(setup, steps, every, resume_at, **kw)
    after = {s: f for s, f in whole.items() if s >= resume_at}
    assert {s: f for s, f in resumed.items() if s >= resume_at} == after
    assert any(k == kind for found in after.values() for _, k, *_ in found), after
    return whole


# -- the cases ---------------------------------------------------------------------------------


def vanilla_rnn():
    """The issue's case: a tanh RNN over 200 steps vanishes through time; reported once it has
    lasted ``time_patience`` (100) steps."""
    torch.manual_seed(0)
    x = torch.randn(64, 200, 8)
    y = (x[:, :, 0].sum(1) > 0).long() + 2 * (x[:, -5:, 1].sum(1) > 0)
    model = SeqClassifier(nn.RNN, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return model, opt, lambda m, s: F.cross_entropy(m(x[s % 4 :: 4]), y[s % 4 :: 4]), {}


def test_through_time_patience_survives_a_resume():
    whole = _same_after(vanilla_rnn, 131, 10, 71, "vanishing")
    first = min(s for s, f in whole.items() if any(k == "vanishing" for _, k, *_ in f))
    assert first == 100  # reported after 100 steps of decay, counted across the resume


def small_init_mlp():
    """The init audit speaks on step 0 only (see runs.small_init_relu)."""
    return (*runs.small_init_relu(), {})


def test_the_init_audit_is_not_run_again_on_trained_weights():
    whole = _same_after(small_init_mlp, 41, 10, 21, "vanishing")
    assert any(k == "init" for _, k, *_ in whole[0])
    assert not any(k == "init" for s, f in whole.items() if s for _, k, *_ in f)


def dead_relu_small_batch():
    """Dead units judged over a streak of small batches: 4 inputs a step, 16 needed per unit."""
    torch.manual_seed(0)
    model = zoo.DeadReLU(width=32)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return (
        model,
        opt,
        lambda m, s: F.cross_entropy(m(x[4 * s : 4 * s + 4]), y[4 * s : 4 * s + 4]),
        {},
    )


def test_a_dead_unit_streak_survives_a_resume():
    whole = _same_after(dead_relu_small_batch, 12, 1, 2, "dead_units")
    first = min(s for s, f in whole.items() if any(k == "dead_units" for _, k, *_ in f))
    assert first == 3  # the fourth batch of 4 brings the 16 inputs per unit


def regression_past_stability(factor=2.3, curvature=False):
    def setup():
        torch.manual_seed(1)
        x = torch.randn(256, 12) * torch.linspace(0.2, 3, 12)
        y = x @ torch.randn(12, 1) + 0.1 * torch.randn(256, 1)
        lam = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
        model = nn.Linear(12, 1, bias=False)
        opt = torch.optim.SGD(model.parameters(), lr=factor / lam)
        loss = lambda m: F.mse_loss(m(x), y)  # noqa: E731
        watch = {"curvature_every": 1, "curvature_loss": lambda: loss(model)} if curvature else {}
        return model, opt, lambda m, s: loss(m), watch

    return setup


def test_the_divergence_history_survives_a_resume():
    """Steady growth is found from the recent gradient norms: 6 or more logging steps of them."""
    whole = _same_after(regression_past_stability(), 40, 1, 5, "diverging")
    assert min(s for s, f in whole.items() if f) > 5  # found after the resume, from both halves


def test_the_curvature_streaks_survive_a_resume():
    """A ravine is judged at once on the first measurement, then only once it has lasted 5: a
    resumed run that forgot would judge its first measurement after the resume at once."""
    whole = _same_after(regression_past_stability(curvature=True), 12, 1, 3, "sharp_curvature")
    sharp = [s for s, f in whole.items() if any(k == "sharp_curvature" for _, k, *_ in f)]
    assert sharp[0] == 0 and 3 not in sharp


def flat_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8) * 1e-3
    y = x @ torch.randn(8, 1) * 1e3 + 0.1 * torch.randn(256, 1)
    model = nn.Linear(8, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    return (
        model,
        opt,
        lambda m, s: loss(m),
        {"curvature_every": 1, "curvature_loss": lambda: loss(model)},
    )


def test_a_plateau_half_seen_before_the_resume_is_noted_after_it():
    whole = _same_after(flat_regression, 4, 1, 1, "plateau")
    assert any(k == "plateau" for _, k, *_ in whole[1])


def relu_at_lr_10():
    torch.manual_seed(1)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    hidden = [m for _ in range(3) for m in (nn.Linear(32, 32), nn.ReLU())]
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), *hidden, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    return model, opt, lambda m, s: F.mse_loss(m(x), y), {}


def test_the_first_weight_scale_survives_a_resume():
    """Weights that grew in training are named as grown since step 0, also after a resume."""
    whole = _same_after(relu_at_lr_10, 4, 1, 1, "exploding")
    grown = [m for f in whole.values() for _, k, _, m, *_ in f if k == "exploding"]
    assert all("grew" in m and "since step 0" in m for m in grown)


def test_torch_save_without_json_resumes_the_same():
    _same_after(dead_relu_small_batch, 8, 1, 2, "dead_units", via_json=False)


# -- versions ----------------------------------------------------------------------------------


def test_a_version_1_state_still_loads_and_an_unknown_version_is_refused():
    model, opt, loss_of, _ = small_init_mlp()
    gw = GradWatch(model, every_n_steps=1, warn=False)
    loss_of(model, 0).backward()
    gw.step()
    state = gw.state_dict()
    gw.close()
    assert state["version"] == 2
    v1 = {k: state[k] for k in ("step", "report", "first_seen")}
    v1["version"] = 1
    v1["history"] = {k: state["history"][k] for k in ("divergence", "ongoing", "peak")}
    fresh = GradWatch(model, every_n_steps=1, warn=False)
    fresh.load_state_dict(v1)
    assert fresh.current_step == 1 and fresh.first_seen == gw.first_seen
    assert fresh._diagnosis.audited  # a run past its first logging step was audited
    with pytest.raises(ValueError, match=r"versions 1, 2.*with version 3"):
        fresh.load_state_dict({**state, "version": 3})
    fresh.close()


# -- Lightning ---------------------------------------------------------------------------------


pl = pytest.importorskip("lightning.pytorch")


class LitRNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model, self._opt, self.loss_of, _ = vanilla_rnn()

    def training_step(self, batch, batch_idx):
        return self.loss_of(self.model, self.global_step)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=3e-3)


def _fit(tmp_path, max_steps, ckpt=None):
    from torch.utils.data import DataLoader

    from gradwatch import GradWatchCallback

    class Keep(pl.Callback):
        def __init__(self, gw):
            self.gw, self.found = gw, {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            r = self.gw.report
            if r is not None and r.step == trainer.global_step - 1:
                self.found[r.step] = _findings(r)

    gw = GradWatchCallback(every_n_steps=10)
    keep = Keep(gw)
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[gw, keep],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    loader = DataLoader(range(1000), batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LitRNN(), loader, ckpt_path=ckpt)
    return trainer, keep.found


def test_lightning_checkpoint_resume_keeps_the_through_time_patience(tmp_path):
    whole = _fit(tmp_path / "a", 121)[1]
    first, _ = _fit(tmp_path / "b", 71)
    ckpt = str(tmp_path / "at71.ckpt")
    first.save_checkpoint(ckpt)
    resumed = _fit(tmp_path / "c", 121, ckpt)[1]
    after = {s: f for s, f in whole.items() if s >= 71}
    assert {s: f for s, f in resumed.items() if s >= 71} == after
    assert any(k == "vanishing" for _, k, *_ in after[100])
