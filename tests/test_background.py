"""The background worker (``background=True``; ``"auto"``, the default, uses it for models on an
accelerator): the training thread hands each logging step over and goes on; the reports,
findings, warnings and event files are the same as when everything runs on the training thread,
in order, and nothing is lost or read early."""

import copy
import pickle
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import GradWatch
from gradwatch.output.logreader import read_run
from gradwatch.step.worker import PendingReport, Worker

PACKAGE = str(Path(gradwatch.__file__).parent)


def sigmoid_mlp():  # vanishes and saturates: findings from the start
    layers = []
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


def relu_mlp():  # healthy, with dead units growing under a large learning rate
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


class Small(nn.Module):  # conv, batch norm, attention, an LSTM and a functional activation
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.norm = nn.BatchNorm1d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # x: (batch, 8 steps, 4)
        h = F.gelu(self.norm(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.lstm(h)[0][:, -1])


def _batch(model, step):
    g = torch.Generator().manual_seed(step)
    shape = (16, 8, 4) if isinstance(model, Small) else (16, 32)
    x = torch.randn(shape, generator=g) * (3.0 if step >= 120 else 1.0)
    if step == 150:  # one poisoned batch: a non-finite step, and what follows it
        x[0, 0] = float("nan")
    return x, torch.randint(0, 4, (16,), generator=g)


def _train(model, steps, log_dir=None, **options):
    """Reports (as dicts), warnings and the TensorBoard scalars of one run."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, log_dir=log_dir, **options) as gw:
            for step in range(steps):
                x, y = _batch(model, step)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                r = gw.step(optimizer, loss=loss)
                optimizer.step()
                optimizer.zero_grad()
                if r is not None:
                    reports.append(r)
            first_seen = gw.first_seen
        dicts = [r.to_dict() for r in reports]  # read after the run: each waited for
    said = [str(w.message) for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    return dicts, said, first_seen


@pytest.mark.parametrize("make", [sigmoid_mlp, relu_mlp, Small])
def test_background_reports_findings_and_warnings_equal_the_synchronous_ones(make, tmp_path):
    # Weights read on every logging step: after a non-finite step the synchronous mode reads
    # them again at the next logging step, the worker at the next one armed after it finished
    # (the only difference, and one that depends on timing); everything else must be equal.
    torch.manual_seed(1)
    model = make()
    runs = {}
    for background in (False, True):
        log_dir = tmp_path / str(background)
        runs[background] = _train(
            copy.deepcopy(model),
            200,
            log_dir,
            every_n_steps=2,
            weight_norm_every=1,
            background=background,
        )
        scalars = read_run(log_dir, "run").scalars  # NaN as a string: equal to itself
        runs[background] += ({t: {k: repr(v) for k, v in s.items()} for t, s in scalars.items()},)
    (sync, said_sync, seen_sync, tb_sync), (bg, said_bg, seen_bg, tb_bg) = runs[False], runs[True]
    assert len(sync) == len(bg) == 100
    assert any(r["findings"] for r in sync), "the run must find something to compare"
    for a, b in zip(sync, bg):
        assert a == b, f"step {a['step']} differs"
    assert said_bg == said_sync and said_sync
    assert seen_bg == seen_sync
    assert tb_bg == tb_sync


def test_a_new_finding_on_a_step_that_did_not_read_the_weights_quotes_that_steps_weights():
    # A net healthy for 43 steps, whose inputs then grow 1000-fold: saturation appears on a step
    # that does not read the weights (every 10th does). Synchronously they are read on the spot;
    # the worker finishes the step after the optimizer moved them, so for it the training thread
    # reads them with every logging step, and the report is the same.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    found = {}
    for background in (False, True):
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with GradWatch(net, every_n_steps=1, background=background) as gw:
                reports = []
                for step in range(60):
                    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
                    net(x * (1000.0 if step >= 43 else 1.0)).pow(2).mean().backward()
                    reports.append(gw.step())
                    optimizer.step()
                    optimizer.zero_grad()
                found[background] = [r.to_dict() for r in reports]
    first = next(r for r in found[True] if any(f["kind"] == "saturation" for f in r["findings"]))
    assert first["step"] == 43 and first["weight_step"] == 43  # read on the spot
    assert found[True] == found[False]


def _loop(gw, model, steps):
    for _ in range(steps):
        loss = model(torch.randn(8, 32)).pow(2).mean()
        loss.backward()
        gw.step(loss=loss)
        model.zero_grad()


class Recorder:
    """A sink that records what it got, on which thread, slowly if asked."""

    def __init__(self, delay=0.0, on_training_thread=False):
        self.delay, self.steps, self.threads = delay, [], set()
        self.on_training_thread = on_training_thread

    def write(self, report):
        time.sleep(self.delay)
        self.steps.append(report.step)
        self.threads.add(threading.current_thread().name)


def test_sinks_get_every_step_in_order_and_close_waits_for_them():
    model = relu_mlp()
    slow = Recorder(delay=0.02)
    gw = GradWatch(model, every_n_steps=1, background=True, warn=False)
    gw.add_sink(slow)
    start = time.perf_counter()
    _loop(gw, model, 30)
    handed_over = time.perf_counter() - start
    gw.close()
    assert slow.steps == list(range(30))  # none dropped, in order
    assert slow.threads == {"gradwatch"}
    # the queue holds 4 steps: the training thread waited for the rest, and said so
    assert gw._worker.waits > 0 and handed_over < 30 * 0.02 + 1.0


def test_a_training_thread_sink_is_written_there():
    model = relu_mlp()
    sink = Recorder(on_training_thread=True)
    with GradWatch(model, every_n_steps=2, background=True) as gw:
        gw.add_sink(sink)
        _loop(gw, model, 10)
    assert sink.steps == [0, 2, 4, 6, 8]
    assert sink.threads == {threading.main_thread().name}


def test_report_step_and_flush_wait_for_the_worker():
    model = relu_mlp()
    slow = Recorder(delay=0.05)
    with GradWatch(model, every_n_steps=1, background=True, warn=False) as gw:
        gw.add_sink(slow)
        _loop(gw, model, 1)
        assert gw.report is not None and gw.report.step == 0  # the property waits
        assert slow.steps == [0]
        model(torch.randn(8, 32)).sum().backward()
        pending = gw.step()
        assert isinstance(pending, gradwatch.Report) and pending.step == 1
        assert pending.layers["0"].grad_norm > 0  # reading it waits for it
        assert type(pending) is gradwatch.Report and gw.report is pending
        gw.flush()
        assert slow.steps == [0, 1]


def test_a_synchronous_step_waits_for_the_steps_handed_over_before_it():
    # Curvature steps are finished on the training thread: after the ones queued before them,
    # or the diagnosis and the sinks would see the steps out of order.
    torch.manual_seed(0)
    model = relu_mlp()
    x = torch.randn(8, 32)
    slow = Recorder(delay=0.1)
    options = dict(curvature_every=3, curvature_loss=lambda: model(x).pow(2).mean())
    with GradWatch(model, every_n_steps=1, background=True, warn=False, **options) as gw:
        gw.add_sink(slow)
        for _ in range(5):
            model(x).pow(2).mean().backward()
            gw.step()
            model.zero_grad()
            if gw.current_step == 4:  # step 3 was a curvature step: finished before step() returned
                assert slow.steps == [0, 1, 2, 3] and gw.report.step == 3
        assert gw.report.step == 4 and gw.report.curvature is None
    assert slow.steps == [0, 1, 2, 3, 4]


def test_a_pending_report_waits_for_its_own_step_only():
    model = relu_mlp()
    gate = threading.Event()

    class Gated:
        def write(self, report):
            if report.step == 1:
                gate.wait(10)

    with GradWatch(model, every_n_steps=1, background=True, warn=False) as gw:
        gw.add_sink(Gated())
        model(torch.randn(8, 32)).sum().backward()
        first = gw.step()
        model(torch.randn(8, 32)).sum().backward()
        second = gw.step()
        start = time.perf_counter()
        assert first != gradwatch.Report(0)  # comparing waits, for step 0 only
        assert first.layers and time.perf_counter() - start < 5  # not held by step 1's sink
        gate.set()
        assert second.step == 1 and second.layers


def test_a_pending_report_pickles_and_compares_as_the_finished_one():
    model = relu_mlp()
    with GradWatch(model, every_n_steps=1, background=True) as gw:
        model(torch.randn(8, 32)).sum().backward()
        pending = gw.step()
        assert not (gradwatch.Report(0) == pending)  # comparing waits (here, reflected)
        assert type(pending) is gradwatch.Report and pending == gw.report
        copied = pickle.loads(pickle.dumps(pending))
        assert type(copied) is gradwatch.Report and copied == pending
        assert copied.to_dict() == gw.report.to_dict()


def test_warnings_arrive_at_the_next_call_or_flush_on_the_training_thread():
    model = sigmoid_mlp()
    x = torch.randn(16, 32) * 100
    with GradWatch(model, every_n_steps=1, background=True) as gw:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).sum().backward()
            gw.step()
            gw.flush()  # what the worker found is said here, attributed to this line
        ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
        assert ours and all(Path(w.filename).name == Path(__file__).name for w in ours)


class Failing:
    def __init__(self, error):
        self.error, self.calls = error, 0

    def write(self, report):
        self.calls += 1
        raise self.error


def test_a_failing_sink_is_a_warning_at_the_next_step_and_training_goes_on():
    model = relu_mlp()
    sink = Failing(RuntimeError("disk full"))
    other = Recorder()
    with GradWatch(model, every_n_steps=1, background=True) as gw:
        gw.add_sink(sink)
        gw.add_sink(other)
        with pytest.warns(gradwatch.GradWatchWarning, match="could not write to Failing"):
            _loop(gw, model, 5)
    assert sink.calls == 5 and other.steps == list(range(5))


def test_a_warning_escalated_on_the_worker_is_raised_at_the_next_step():
    model = relu_mlp()
    sink = Failing(gradwatch.GradWatchWarning("escalated"))
    gw = GradWatch(model, every_n_steps=1, background=True, warn=False)
    gw.add_sink(sink)
    _loop(gw, model, 1)
    gw._worker.wait()
    with pytest.raises(gradwatch.GradWatchWarning, match="escalated"):
        _loop(gw, model, 1)
    gw._worker.wait()  # the second step's, this time at close()
    with pytest.raises(gradwatch.GradWatchWarning, match="escalated"):
        gw.close()
    assert gw._closed and not gw._probes.handles


def test_a_measurement_that_fails_on_the_worker_is_a_warning_and_an_empty_report(monkeypatch):
    from gradwatch import closing

    model = relu_mlp()
    with GradWatch(model, every_n_steps=1, background=True) as gw:
        monkeypatch.setattr(closing, "layer_stats", lambda *a: 1 / 0)
        model(torch.randn(8, 32)).sum().backward()
        r = gw.step()
        assert r.layers == {} and "ZeroDivisionError" in r.unmeasured["(step)"]
        monkeypatch.undo()
        with pytest.warns(gradwatch.GradWatchWarning, match="could not measure step 0"):
            _loop(gw, model, 1)
        assert gw.report.step == 1 and gw.report.layers


def test_close_inside_a_framework_logs_an_escalated_warning_instead_of_raising(caplog):
    model = sigmoid_mlp()
    gw = GradWatch(model, every_n_steps=1, background=True)
    model(torch.randn(16, 32) * 100).sum().backward()
    gw.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)
        gw.close(guard=True)  # a Trainer's teardown: the queued warnings are logged
    assert "saturat" in caplog.text or "vanish" in caplog.text


def test_nan_strategy_raise_stays_synchronous():
    model = relu_mlp()
    with GradWatch(model, every_n_steps=1, background=True, nan_strategy="raise", warn=False) as gw:
        x = torch.randn(8, 32)
        x[0, 0] = float("inf")
        model(x).sum().backward()
        with pytest.raises(gradwatch.NonFiniteError):
            gw.step()
        assert gw._worker._thread is None  # never used


def test_auto_uses_the_worker_only_for_a_model_on_an_accelerator():
    model = relu_mlp()
    with GradWatch(model, every_n_steps=1) as gw:  # "auto", on the CPU: synchronous
        _loop(gw, model, 2)
        assert gw._worker._thread is None
    meta = relu_mlp().to("meta")  # a device that is not the CPU: the worker's
    gw = GradWatch(meta, every_n_steps=1)
    assert gw._in_background() and gw.options.background == "auto"
    gw.close()
    with pytest.raises(ValueError, match='background must be True, False or "auto", got 1.5'):
        GradWatch(model, background=1.5)


def test_synchronous_mode_finishes_inside_step():
    model = relu_mlp()
    sink = Recorder()
    with GradWatch(model, every_n_steps=1, background=False) as gw:
        gw.add_sink(sink)
        model(torch.randn(8, 32)).sum().backward()
        r = gw.step()
        assert type(r) is gradwatch.Report and sink.steps == [0]
        assert sink.threads == {threading.main_thread().name}


def test_state_dict_waits_for_the_worker_and_resumes_alike():
    model = sigmoid_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(copy.deepcopy(model), every_n_steps=1, background=True) as gw:
            m = gw._model
            _loop(gw, m, 6)
            state = gw.state_dict()
            assert state["report"]["step"] == 5 and state["first_seen"]


EXITS_WITHOUT_CLOSE = """
import sys, time, torch, gradwatch
class Slow:
    def write(self, report):
        time.sleep(0.2)
        with open(sys.argv[1], "a") as f:
            f.write(f"{report.step}\\n")
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
gw = gradwatch.GradWatch(model, every_n_steps=1, background=True)
gw.add_sink(Slow())
for step in range(3):
    model.train(step < 2)  # the last step's forward is not a training one: the worker's notice
    model(torch.randn(8, 4)).sum().backward()  # for it comes after the last call, at exit
    gw.step()
"""


def test_steps_still_queued_at_exit_are_finished_without_close(tmp_path):
    import subprocess

    out = tmp_path / "steps.txt"
    run = [sys.executable, "-c", EXITS_WITHOUT_CLOSE, str(out)]
    done = subprocess.run(run, check=True, timeout=120, capture_output=True, text=True)
    assert out.read_text().split() == ["0", "1", "2"]
    assert "step 2: no training forward pass" in done.stderr  # the worker's, given at exit


def test_the_worker_runs_jobs_in_order_and_waits_when_full():
    worker = Worker(capacity=2)
    gate, done = threading.Event(), []
    worker.submit(lambda: (gate.wait(), done.append(0)))
    worker.submit(lambda: done.append(1))
    threading.Timer(0.2, gate.set).start()
    start = time.perf_counter()
    worker.submit(lambda: done.append(2))  # full: waits until the first is done
    assert time.perf_counter() - start >= 0.15 and worker.waits == 1
    worker.submit(lambda: 1 / 0)
    worker.stop()
    assert done == [0, 1, 2]
    errors = worker.take_errors()
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
    assert not worker._thread.is_alive()


def test_a_later_steps_report_read_on_the_worker_itself_reads_as_an_empty_one():
    r = PendingReport(7, lambda: True)  # read on the worker thread: nothing to wait for
    assert r.layers == {} and r.step == 7 and type(r) is gradwatch.Report


HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def test_the_training_thread_reads_no_statistic_on_the_host(monkeypatch):
    """Every way a tensor's value reaches Python, patched: none is called from gradwatch's own
    code on the training thread (hooks, functional mode, the step boundary), on a model with
    every kind of probe, Adam's statistics and the loss; the worker reads them all."""
    reads = []

    def spy(name, original):
        def read(self, *args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                frame = sys._getframe(1)
                while frame is not None:
                    if frame.f_code.co_filename.startswith(PACKAGE):
                        reads.append((name, frame.f_code.co_filename, frame.f_lineno))
                        break
                    frame = frame.f_back
            return original(self, *args, **kwargs)

        return read

    torch.manual_seed(0)
    model = Small()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [_batch(model, step) for step in range(4)]
    gw = GradWatch(model, every_n_steps=1, background=True, weight_norm_every=2)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    reports = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        reports.append(gw.step(optimizer, loss=loss))
        optimizer.step()
        optimizer.zero_grad()
    gw._worker.wait()
    monkeypatch.undo()
    gw.close()
    assert sorted(set(reads)) == []
    r = reports[-1]
    assert r.layers["attn:attention#0"].attention_entropy is not None and r.loss is not None
    assert r.layers["head"].adam_step_rms is not None and r.layers["lstm"].time_signal


def _sync_warnings(model, optimizer, batches, gw=None):
    """Blocking device syncs (``set_sync_debug_mode``'s warnings) in the steps after the first
    two (which set up buffers and layouts): forward, backward and the step boundary."""
    count = 0
    for i, (x, y) in enumerate(batches):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if i >= 2 else 0)
            try:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if gw is not None:
                    gw.step(optimizer, loss=loss)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        count += sum("synchroniz" in str(w.message) for w in caught)
        optimizer.step()
        optimizer.zero_grad()
    return count


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_blocking_sync_on_the_training_thread_on_cuda():
    torch.manual_seed(0)
    model = Small().cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [tuple(t.cuda() for t in _batch(model, step)) for step in range(6)]
    plain = _sync_warnings(model, optimizer, batches)  # what the model does by itself
    with GradWatch(model, every_n_steps=1, background=True) as gw:
        watched = _sync_warnings(model, optimizer, batches, gw)
        assert gw.report.step == 5 and gw.report.layers["head"].grad_norm > 0
    assert watched == plain
