"""The Hugging Face Trainer callback on a tiny random-init GPT-2 (CPU): pre-clip gradients on the
Trainer's own step labels, an update left as the Trainer makes it, the loss, and DDP ranks that
report what one process reports on the same global batch."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch import GradWatchTrainerCallback  # noqa: E402
from tests.helpers import hf  # noqa: E402


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    callback = GradWatchTrainerCallback()
    trainer, model = hf.train(callback, out)
    return out, callback, trainer, model


def test_the_gradients_are_read_before_clipping_on_the_trainers_steps(watched):
    out, _, trainer, _ = watched
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    assert sorted(logged) == [2, 4, 6]  # logging_steps=2, as the Trainer labels them
    assert all(norm > 0.05 * 10 for norm in logged.values())  # every step clipped, hard
    ours = scalars(out / "runs" / "gradwatch", "gradwatch/global/grad_norm")
    assert sorted(ours) == sorted(logged)  # the Trainer's logging steps, on its step axis
    for step, norm in logged.items():
        assert ours[step] == pytest.approx(norm, rel=1e-6)  # the pre-clip norm, not 0.05


def test_the_update_is_the_trainers_and_its_clipping_comes_back(watched, tmp_path):
    _, _, trainer, model = watched
    _, plain = hf.train(None, tmp_path)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert trainer.args.max_grad_norm == 0.05


def test_the_loss_is_the_steps_as_the_trainer_logs_it(watched):
    _, callback, trainer, _ = watched
    report = callback.report
    assert report.step == 6
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    steps = [step for step, _ in report.losses]
    assert steps == [5, 6]  # every step since the last logging step
    mean = sum(loss for _, loss in report.losses) / 2  # the Trainer logs their mean
    assert mean == pytest.approx(logged[6], rel=1e-4)


def test_every_n_steps_overrides_the_trainers_logging_steps(tmp_path):
    callback = GradWatchTrainerCallback(every_n_steps=3)
    hf.train(callback, tmp_path)
    assert sorted(scalars(tmp_path / "runs" / "gradwatch", "gradwatch/global/grad_norm")) == [3, 6]


def test_where_it_cannot_clip_for_the_trainer_it_says_so_and_leaves_the_clipping(
    tmp_path, monkeypatch
):
    from gradwatch import GradWatchWarning
    from gradwatch.integrations import hf as adapter

    monkeypatch.setattr(adapter, "TRANSFORMERS_MAJOR", 4)  # the Trainer measures only to clip
    callback = GradWatchTrainerCallback()
    with pytest.warns(GradWatchWarning, match="read after clipping"):
        trainer, _ = hf.train(callback, tmp_path)
    assert trainer.args.max_grad_norm == 0.05  # never taken
    assert callback.report.global_grad_norm == pytest.approx(0.05, rel=1e-4)  # clipped


def test_after_a_train_that_raised_the_next_train_gives_the_clipping_back(tmp_path):
    callback = GradWatchTrainerCallback()
    calls = []

    def fail_on_the_second(module, args, output):
        calls.append(1)
        if len(calls) == 2:  # the second micro-batch of the first step
            raise RuntimeError("out of memory, say")

    trainer, model = hf.train(None, tmp_path, max_steps=1, logging_steps=1)  # one to reuse
    trainer.add_callback(callback)
    handle = model.register_forward_hook(fail_on_the_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    handle.remove()
    assert trainer.args.max_grad_norm == 0  # no event reached the callback after the raise
    trainer.train()  # again: the callback gives the clipping back, takes it, gives it back
    assert trainer.args.max_grad_norm == 0.05
    assert callback.report.global_grad_norm > 0.05 * 10  # read before the clipping


def test_bad_options_are_named_before_training():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradWatchTrainerCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="log_dir"):
        GradWatchTrainerCallback(log_dir=3)


def _run(world: int, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(hf.worker, args=(world, port, str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_ddp_ranks_report_what_one_process_reports_on_the_global_batch(tmp_path):
    one = _run(1, Path(tempfile.mkdtemp(dir=tmp_path)))[0]["report"]
    ranks = _run(2, Path(tempfile.mkdtemp(dir=tmp_path)))
    want = {row["name"]: row for row in one["layers"]}
    for result in ranks:
        got = {row["name"]: row for row in result["report"]["layers"]}
        assert list(got) == list(want)
        for name, row in want.items():
            for figure in ("grad_norm", "signal", "output_elements", "attention_entropy"):
                if row.get(figure) is not None:
                    assert got[name][figure] == pytest.approx(row[figure], rel=1e-5), name
        assert [f["kind"] for f in result["report"]["findings"]] == [
            f["kind"] for f in one["findings"]
        ]
        assert result["report"]["global_grad_norm"] == pytest.approx(
            [h["grad_norm"] for h in result["log"] if h["step"] == 4 and "grad_norm" in h][0],
            rel=1e-6,
        )
