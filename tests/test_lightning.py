"""GradWatchCallback in real Lightning Trainers (both packages): the numbers are checked against a
probe callback that computes them itself at the same point of the step."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from tests.helpers import lit

pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from gradwatch import GradWatchCallback  # noqa: E402

PACKAGES = sorted(lit.PACKAGES)


def trainer(pl, tmp_path, callbacks, logger=False, **kwargs):
    kwargs.setdefault("max_steps", 3)
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("log_every_n_steps", 1)
    return pl.Trainer(
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


def fit(pl, tmp_path, module, callbacks, n=64, batch_size=lit.BATCH, **kwargs):
    t = trainer(pl, tmp_path, callbacks, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        t.fit(module, lit.loader(n, batch_size=batch_size))
    return t, [str(w.message) for w in caught if w.category is gradwatch.GradWatchWarning]


def test_import_gradwatch_does_not_import_lightning():
    code = "import sys, gradwatch; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert gradwatch.GradWatchCallback is GradWatchCallback


def test_the_callback_is_a_callback_of_both_packages():
    for pl, _, _ in lit.PACKAGES.values():
        assert isinstance(GradWatchCallback(), pl.Callback)


# every 4: gradwatch's hooks come off between the logging steps and go back on before them
@pytest.mark.parametrize("every", [2, 4])
@pytest.mark.parametrize("package", PACKAGES)
def test_accumulated_pre_clip_norms_at_the_global_step(package, every, tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[package]
    gw = GradWatchCallback(every_n_steps=every)
    probe = Probe(gw)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    t, _ = fit(
        pl,
        tmp_path,
        LitNet(),
        [gw, probe],
        n=9 * lit.BATCH,  # 3 whole accumulation windows per epoch
        logger=logger,
        max_steps=2 * every + 1,
        accumulate_grad_batches=3,
        gradient_clip_val=1e-3,
    )
    logged = [0, every, 2 * every]
    assert t.global_step == 2 * every + 1
    assert sorted(probe.logged) == logged
    for step, report in probe.logged.items():
        # the norm of the accumulated .grad, before clipping, which then did happen
        assert report["global_grad_norm"] == pytest.approx(probe.pre_clip[step], rel=1e-5)
        assert probe.post_clip[step] < 1.01e-3 < probe.pre_clip[step]
        rows = {r["name"]: r for r in report["layers"]}
        for name, norm in probe.layer_norms[step].items():
            assert rows[name]["grad_norm"] == pytest.approx(norm, rel=1e-5)
        # activation statistics cover all 3 micro-batches
        assert rows["net.1"]["calls"] == 3
        assert rows["net.1"]["samples_per_unit"] == 3 * lit.BATCH
        assert rows["net.0"]["signal"] > 0
        # the step's loss: its micro-batches' losses as Lightning scaled them, summed
        assert report["losses"][-1] == [step, pytest.approx(sum(probe.losses[step]), rel=1e-6)]
        assert len(probe.losses[step]) == 3
    # the TensorBoard step is trainer.global_step
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    events = acc.Scalars("gradwatch/global/grad_norm")
    assert [e.step for e in events] == logged
    assert [e.value for e in events] == pytest.approx([probe.pre_clip[s] for s in logged])
    assert "gradwatch/findings/text_summary" in acc.Tags()["tensors"]


def signals(report: dict) -> dict[str, float]:
    return {r["name"]: r["signal"] for r in report["layers"] if r["signal"] is not None}


@pytest.fixture(scope="module")
def fp32_signals(tmp_path_factory):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    probe = Probe(gw)
    fit(pl, tmp_path_factory.mktemp("fp32"), LitNet(lr=0.0), [gw, probe], max_steps=3)
    out = {step: signals(r) for step, r in probe.logged.items()}
    out["losses"] = {step: r["losses"][-1][1] for step, r in probe.logged.items()}
    return out


def test_bf16_mixed_norms_are_finite_and_equal_the_probe(tmp_path, fp32_signals):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    probe = Probe(gw)
    fit(pl, tmp_path, LitNet(lr=0.0), [gw, probe], precision="bf16-mixed", max_steps=3)
    assert sorted(probe.logged) == [0, 1, 2]
    for step, report in probe.logged.items():
        assert report["global_grad_norm"] == pytest.approx(probe.pre_clip[step], rel=1e-5)
        assert not report["skipped"] and not report["findings"]
        for name, s in signals(report).items():
            assert s == pytest.approx(fp32_signals[step][name], rel=0.1)


def test_fp16_overflow_step_is_skipped_not_exploding_and_signal_is_unscaled(tmp_path, fp32_signals):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    gw = GradWatchCallback(every_n_steps=1)
    probe = Probe(gw)
    fit(
        pl,
        tmp_path,
        LitNet(lr=0.0, blowup_step=1),
        [gw, probe],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        max_steps=3,
    )
    assert scaler.get_scale() < 65536.0  # the scaler did see the overflow and backed off
    blown = probe.logged[1]
    assert blown["skipped"] and not blown["findings"]
    for step in (0, 2):
        report = probe.logged[step]
        assert not report["skipped"]
        assert report["global_grad_norm"] == pytest.approx(probe.pre_clip[step], rel=1e-5)
        for name, s in signals(report).items():  # divided by the loss scale (65536 then 32768)
            assert s == pytest.approx(fp32_signals[step][name], rel=0.1)
        # the loss Lightning hands the callback is scaled for backward: read unscaled
        assert report["losses"][-1][1] == pytest.approx(fp32_signals["losses"][step], rel=1e-2)


def test_no_logger_still_warns_and_reports(tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    _, caught = fit(pl, tmp_path, LitNet(depth=12, act=nn.Sigmoid), [gw], max_steps=2)
    assert gw.report is not None and gw.report.step == 1
    assert any(f.kind == "vanishing" for f in gw.report.findings)
    assert any("vanishing" in m for m in caught)
    assert sum("vanishing" in m for m in caught) == 1  # once, not once per step


@pytest.mark.parametrize("package", PACKAGES)
def test_other_loggers_get_the_same_scalar_keys(package, tmp_path):
    pl, LitNet, _ = lit.PACKAGES[package]
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    fit(pl, tmp_path, LitNet(), [GradWatchCallback(every_n_steps=1)], logger=logger)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "gradwatch/global/grad_norm" in header.split(",")
    assert "gradwatch_2_signal/net.0" in header.split(",")


def test_two_fits_share_history_without_duplicate_hooks(tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    module = LitNet(depth=12, act=nn.Sigmoid, lr=0.0)
    plain_hooks = len(module.net[0]._forward_hooks)
    probe = Probe(gw)
    _, first = fit(pl, tmp_path, module, [gw, probe], max_steps=2)
    assert len(module.net[0]._forward_hooks) == plain_hooks  # detached after fit
    seen = gw.first_seen
    assert seen and all(step == 0 for step in seen.values())
    probe2 = Probe(gw)
    _, second = fit(pl, tmp_path, module, [gw, probe2], max_steps=2)
    assert set(probe2.hook_counts) == {plain_hooks + 1}  # one gradwatch hook, not two
    assert all(r["layers"][0]["calls"] == 1 for r in probe2.logged.values())
    assert gw.first_seen == seen  # history kept, nothing announced again
    assert any("vanishing" in m for m in first)
    assert not any("vanishing" in m for m in second)


def test_checkpoint_resume_keeps_the_history(tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    t, first = fit(pl, tmp_path, LitNet(depth=12, act=nn.Sigmoid, lr=0.0), [gw], max_steps=2)
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(str(ckpt))
    seen = gw.first_seen

    resumed = GradWatchCallback(every_n_steps=1)
    probe = Probe(resumed)
    t2 = trainer(pl, tmp_path, [resumed, probe], max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        t2.fit(LitNet(depth=12, act=nn.Sigmoid, lr=0.0), lit.loader(), ckpt_path=str(ckpt))
    assert sorted(probe.logged) == [2, 3]  # continues at the restored global step
    assert resumed.first_seen == seen
    assert not [w for w in caught if w.category is gradwatch.GradWatchWarning]


def test_the_callback_pickles_and_copies_before_during_and_after_fit(tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    assert pickle.loads(pickle.dumps(gw)).report is None

    class PickleDuringFit(pl.Callback):
        def on_train_batch_end(self, *args):
            clone = pickle.loads(pickle.dumps(gw))
            self.clone_report = clone.report

    during = PickleDuringFit()
    fit(pl, tmp_path, LitNet(), [gw, during], max_steps=2)
    assert during.clone_report is not None
    after = pickle.loads(pickle.dumps(gw))
    assert after.report.to_dict() == gw.report.to_dict()
    assert copy.deepcopy(gw).first_seen == gw.first_seen


def test_an_exception_in_training_leaves_no_hook_or_mode_behind(tmp_path):
    pl, LitNet, _ = lit.PACKAGES[PACKAGES[0]]
    module = LitNet(fail_step=1)
    plain_hooks = len(module.net[0]._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, module, [GradWatchCallback(every_n_steps=1)], max_steps=3)
    assert len(module.net[0]._forward_hooks) == plain_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="every_n_steps"):
        GradWatchCallback(every_n_steps="5")
    with pytest.raises(ValueError, match="every_n_steps"):
        GradWatchCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="sync_dist"):
        GradWatchCallback(sync_dist="yes")
    with pytest.raises(ValueError, match="weight_norm_every"):
        GradWatchCallback(weight_norm_every=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'log_every'"):
        GradWatchCallback(log_every=5)


@pytest.mark.parametrize("package", PACKAGES)
def test_ddp_spawn_reports_the_global_batch_and_only_rank0_writes(package, tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[package]
    gw = GradWatchCallback(every_n_steps=1)
    probe = Probe(gw, out_dir=str(tmp_path))
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    t = trainer(pl, tmp_path, [gw, probe], logger, strategy="ddp_spawn", devices=2, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(LitNet(act=nn.ReLU), lit.loader(2 * lit.BATCH))
    assert gw.report is None  # the engine lived in the worker processes
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # One process on the whole global batch (both ranks' halves).
    ref_gw = GradWatchCallback(every_n_steps=1)
    fit(
        pl,
        tmp_path / "ref",
        LitNet(act=nn.ReLU),
        [ref_gw],
        n=2 * lit.BATCH,
        max_steps=1,
        batch_size=2 * lit.BATCH,
    )
    want = {r["name"]: r for r in ref_gw.report.to_dict()["layers"]}
    for result in ranks:
        got = {r["name"]: r for r in result["logged"]["0"]["layers"]}
        assert list(got) == list(want)
        for name, row in want.items():
            for metric in ("grad_norm", "signal", "saturation", "dead_units", "samples_per_unit"):
                if row[metric] is None:
                    assert got[name][metric] is None
                else:
                    assert got[name][metric] == pytest.approx(row[metric], rel=1e-4), (name, metric)
    events = list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert len(events) == 1


def test_escalated_warnings_are_logged_not_raised_into_fit(tmp_path, caplog):
    pl, LitNet, _ = lit.PACKAGES[PACKAGES[0]]
    gw = GradWatchCallback(every_n_steps=1)
    t = trainer(pl, tmp_path, [gw], max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)  # as under -W error
        t.fit(LitNet(depth=12, act=nn.Sigmoid), lit.loader())
    assert t.global_step == 2
    assert any("vanishing" in r.getMessage() for r in caplog.records if r.name == "gradwatch")


def test_the_trainers_optimizer_gives_the_learning_rate_and_the_update_size(tmp_path):
    """The callback hands the engine Lightning's optimizer: Adam's next update is measured
    against the weights (on its first step, lr per weight: a gain of lr * sqrt(fan_in)), and at
    a rate far too large the finding quotes it."""
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    calm, wild = GradWatchCallback(every_n_steps=1), GradWatchCallback(every_n_steps=1)
    fit(pl, tmp_path, LitNet(lr=1e-3, adam=True), [calm], max_steps=1)
    gains = {n: s.update_gain for n, s in calm.report.layers.items() if s.update_gain is not None}
    # exactly g / (|g| + eps) per weight, Adam's first step: the sign, to eps
    want = {n: 1e-3 * 4.0 for n in ("net.0", "net.2", "net.4", "net.6")}
    assert gains == pytest.approx(want, rel=1e-4)
    assert not calm.report.findings
    fit(pl, tmp_path, LitNet(lr=0.5, adam=True), [wild], max_steps=1)
    lead = wild.report.findings[0]
    assert lead.kind == "diverging" and "too large for the weights" in lead.message
    assert "The learning rate is 0.5" in lead.message
    assert wild.report.layers[lead.layer].update_gain == pytest.approx(0.5 * 4.0)


def test_curvature_probe_in_a_trainer_leaves_training_unchanged(tmp_path):
    """``curvature_loss(pl_module, batch)`` gets the step's batch; the weights after fit are
    the same bit for bit as without the probe; a rate past the limit is a sharp_curvature."""
    import torch.nn.functional as F

    pl, LitNet, _ = lit.PACKAGES[PACKAGES[0]]

    def loss(module, batch):
        x, y = batch
        return F.cross_entropy(module.net(x), y)

    seen = []

    def counted(module, batch):
        seen.append(batch[0].shape[0])
        return loss(module, batch)

    plain, probed = LitNet(lr=0.05), LitNet(lr=0.05)
    gw = GradWatchCallback(every_n_steps=2, curvature_every=1, curvature_loss=counted)
    fit(pl, tmp_path, plain, [GradWatchCallback(every_n_steps=2)], max_steps=6)
    _, caught = fit(pl, tmp_path, probed, [gw], max_steps=6)
    assert seen == [lit.BATCH] * 3  # logging steps 0, 2, 4
    c = gw.report.curvature
    assert c.top_eigenvalue > 0 and c.stability_ratio == pytest.approx(0.05 * c.top_eigenvalue / 2)
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not any("curvature" in m for m in caught)

    steep = GradWatchCallback(every_n_steps=1, curvature_every=1, curvature_loss=loss)
    fit(pl, tmp_path, LitNet(lr=2.5 / c.top_eigenvalue * 1.5), [steep], max_steps=1)
    assert "sharp_curvature" in {f.kind for f in steep.report.findings}


def test_curvature_arguments_of_the_callback_name_themselves():
    with pytest.raises(ValueError, match="curvature_every=3 needs curvature_loss"):
        GradWatchCallback(curvature_every=3)
    with pytest.raises(TypeError, match=r"curvature_loss must be a function \(pl_module, batch\)"):
        GradWatchCallback(curvature_every=3, curvature_loss="loss")


def test_the_callback_follows_the_trainers_log_every_n_steps_unless_told(tmp_path):
    pl, LitNet, Probe = lit.PACKAGES[PACKAGES[0]]
    logged = []
    for callback in (GradWatchCallback(), GradWatchCallback(every_n_steps=2)):
        probe = Probe(callback)
        fit(pl, tmp_path, LitNet(), [callback, probe], max_steps=7, log_every_n_steps=3)
        logged.append(sorted(probe.logged))
    assert logged == [[0, 3, 6], [0, 2, 4, 6]]
    assert GradWatchCallback().options.every_n_steps == 50  # its own options stay as given
