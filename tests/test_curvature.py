"""The curvature probe against brute force: the top eigenvalue against ``eigvalsh`` of the full
Hessian, the stability ratio against what the optimizer actually does (a run that diverges or
not), the preconditioned ratio of Adam against its formula, and the probe's promise to leave the
user's training exactly as it was."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.nn.utils import parameters_to_vector

import gradwatch
from gradwatch.step.curvature import top_eigenvalue
from tests.helpers import zoo


def regression(n=256, d=8, seed=0, feature_scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 3.0, d) if feature_scale is None else feature_scale
    x = torch.randn(n, d, generator=g) * scale
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def full_hessian(model, loss_fn):
    """The Hessian over every parameter, by autograd on a flat vector: brute force."""
    flat = parameters_to_vector(model.parameters()).detach()

    def loss_of(v):
        params = dict(model.named_parameters())
        shapes, out, k = {n: p.shape for n, p in params.items()}, {}, 0
        for n, shape in shapes.items():
            size = math.prod(shape)
            out[n] = v[k : k + size].view(shape)
            k += size
        return loss_fn(lambda x: torch.func.functional_call(model, out, (x,)))

    return hessian(loss_of, flat)


def train(model, loss_fn, optimizer, steps, every=1, **kwargs):
    """Full-batch training with the probe on; the reports and the warnings."""
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gw = gradwatch.GradWatch(
            model, every_n_steps=every, curvature_loss=lambda: loss_fn(model), **kwargs
        )
        for _ in range(steps):
            loss_fn(model).backward()
            report = gw.step(optimizer=optimizer)
            if report is not None:
                reports.append(report)
            optimizer.step()
            optimizer.zero_grad()
        gw.close()
    return reports, [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]


def kinds(report):
    return {f.kind for f in report.findings}


@pytest.mark.parametrize("seed,d", [(0, 4), (1, 8), (2, 16)])
def test_top_eigenvalue_matches_eigvalsh_on_linear_regression(seed, d):
    x, y = regression(d=d, seed=seed)
    model = nn.Linear(d, 1)

    def loss_fn(m):
        return F.mse_loss(m(x), y)

    exact = torch.linalg.eigvalsh(full_hessian(model, lambda f: F.mse_loss(f(x), y)))[-1].item()
    reports, _ = train(
        model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), 1, curvature_every=1
    )
    c = reports[0].curvature
    assert c.converged
    assert c.top_eigenvalue == pytest.approx(exact, rel=0.02)
    assert c.stability_ratio == 0.0  # lr 0
    assert c.loss == pytest.approx(loss_fn(model).item())


def test_top_eigenvalue_of_a_saddle_is_the_most_positive_one():
    """Power iteration finds the eigenvalue of largest magnitude: here -10. The top one is 3."""
    a = torch.diag(torch.tensor([-10.0, 3.0, 1.0, -2.0]))
    q = torch.linalg.qr(torch.randn(4, 4))[0]
    h = q @ a @ q.T

    def product(v):
        return [h @ v[0]]

    value, _, used, converged = top_eigenvalue(product, [torch.randn(4)])
    assert converged and value == pytest.approx(3.0, rel=0.02)
    assert used > 1


def test_past_the_limit_a_note_at_once_and_a_warning_when_it_lasts_and_the_loss_climbs():
    """Linear regression at lr = 2.3 / lambda_max: plain gradient descent multiplies the distance
    along the top direction by 1 - 2.3 = -1.3 per step. From the first measurement alone this
    could be a network's catapult (a ratio between 1 and 2), so it is a note; its curvature is
    fixed, the ratio lasts and the loss climbs past where it started: a warning, with the limit,
    long before the loss overflows."""
    x, y = regression()
    model = nn.Linear(8, 1)
    exact = torch.linalg.eigvalsh(full_hessian(model, lambda f: F.mse_loss(f(x), y)))[-1].item()
    lr = 2.3 / exact
    reports, caught = train(
        model,
        lambda m: F.mse_loss(m(x), y),
        torch.optim.SGD(model.parameters(), lr=lr),
        60,
        curvature_every=1,
    )
    first = reports[0]
    assert first.curvature.stability_ratio == pytest.approx(1.15, rel=0.02)
    (note,) = [f for f in first.findings if f.kind == "sharp_curvature"]
    assert note.severity == "info" and note.layer == ""
    assert [r.id for r in note.remedies] == ["lr-warmup", "lower-lr"]
    assert "catapult" in note.message
    sharp = [(r, f) for r in reports for f in r.findings if f.kind == "sharp_curvature"]
    warned = [(r, f) for r, f in sharp if f.severity == "warning"]
    assert warned, [(r.step, f.severity) for r, f in sharp]
    at, finding = warned[0]
    assert at.curvature.loss > first.curvature.loss  # the loss climbed past where it started
    assert math.isfinite(at.global_grad_norm) and at.step < 40
    assert [r.id for r in finding.remedies] == ["lower-lr", "lr-warmup"]
    assert f"{2 / exact:.3g}" in finding.message  # the learning rate that would be stable
    assert any("too sharp" in str(w.message) for w in caught)
    assert "curvature: top Hessian eigenvalue" in str(first)


def test_quiet_below_the_limit_over_a_run():
    x, y = regression()
    model = nn.Linear(8, 1)
    exact = torch.linalg.eigvalsh(full_hessian(model, lambda f: F.mse_loss(f(x), y)))[-1].item()
    opt = torch.optim.SGD(model.parameters(), lr=1.5 / exact)
    reports, caught = train(
        model, lambda m: F.mse_loss(m(x), y), opt, 300, every=10, curvature_every=1
    )
    assert len(reports) == 30 and all(r.curvature is not None for r in reports)
    assert all(r.curvature.stability_ratio == pytest.approx(0.75, rel=0.02) for r in reports)
    assert not any(r.findings for r in reports) and not caught
    assert F.mse_loss(model(x), y).item() < 0.02  # it trained: the run was healthy


@pytest.mark.parametrize(
    "settings",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.5, "dampening": 0.5},
    ],
)
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_the_ratio_says_whether_momentum_sgd_diverges(settings, factor):
    """The heavy-ball and Nesterov limits, checked by running the optimizer: at 0.9 of the lr
    the ratio puts at 1 the run converges, at 1.1 of it the loss grows without bound."""
    x, y = regression(d=4)
    model = nn.Linear(4, 1)

    def loss_fn(m):
        return F.mse_loss(m(x), y)

    probe = torch.optim.SGD(model.parameters(), lr=1.0, **settings)
    reports, _ = train(model, loss_fn, probe, 1, curvature_every=1)
    limit_lr = 1.0 / reports[0].curvature.stability_ratio  # the ratio is linear in lr
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=factor * limit_lr, **settings)
    start = loss_fn(model).item()
    for _ in range(600):
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad()
    end = loss_fn(model).item()
    if factor < 1:
        assert end < start
    else:
        assert not math.isfinite(end) or end > 1e3 * start


def test_adam_ratio_is_the_preconditioned_top_eigenvalue():
    """For Adam the ratio is lr (1 - b1) lambda_max(P^-1/2 H P^-1/2) / (2 (1 + b1)), with
    P = sqrt(v_hat) + eps as the next step will have it: checked against eigvalsh."""
    x, y = regression(d=6)
    model = nn.Linear(6, 1)

    def loss_fn(m):
        return F.mse_loss(m(x), y)

    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.99))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(
            model, every_n_steps=1, curvature_every=1, curvature_loss=lambda: loss_fn(model)
        )
        for _ in range(4):
            loss_fn(model).backward()
            gw.step(optimizer=opt)
            opt.step()
            opt.zero_grad()
        loss_fn(model).backward()
        c = gw.step(optimizer=opt).curvature  # before the fifth step: its v_hat
        gw.close()
    assert c.rule.startswith("lr (1 - b1)")
    params = list(model.parameters())
    p_inv = []
    for p in params:
        state = opt.state[p]
        t = float(state["step"]) + 1
        v = (state["exp_avg_sq"] * 0.99 + p.grad.square() * 0.01) / (1 - 0.99**t)
        p_inv.append((1 / (v.sqrt() + 1e-8)).reshape(-1))
    d = torch.cat(p_inv) * 0.05 * (1 - 0.8) / (2 * (1 + 0.8))
    h = full_hessian(model, lambda f: F.mse_loss(f(x), y))
    exact = torch.linalg.eigvalsh(d.sqrt()[:, None] * h * d.sqrt()[None, :])[-1].item()
    assert c.converged
    assert c.stability_ratio == pytest.approx(exact, rel=0.02)
    raw = torch.linalg.eigvalsh(h)[-1].item()
    assert c.top_eigenvalue == pytest.approx(raw, rel=0.02)  # the raw Hessian's, still


def test_plateau_note_on_flat_ground_and_not_during_a_warm_up():
    """Features a thousand times too small: the slope and the curvature are both tiny, so steps
    of lr 0.01 barely move the loss. A note on the second flat measurement; none while the
    learning rate is still rising; none on the same data standardised."""
    x, y = regression(feature_scale=torch.full((8,), 1e-3))
    model = nn.Linear(8, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reports, caught = train(model, lambda m: F.mse_loss(m(x), y), opt, 3, curvature_every=1)
    assert "plateau" not in kinds(reports[0])
    (note,) = [f for f in reports[1].findings if f.kind == "plateau"]
    assert note.severity == "info" and [r.id for r in note.remedies] == ["raise-lr"]
    assert reports[1].curvature.stability_ratio < 1e-6
    assert "NOTE plateau" in str(reports[1])

    model = nn.Linear(8, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(
            model,
            every_n_steps=1,
            curvature_every=1,
            curvature_loss=lambda: F.mse_loss(model(x), y),
        )
        for _ in range(5):
            F.mse_loss(model(x), y).backward()
            assert "plateau" not in kinds(gw.step(optimizer=opt))
            opt.step()
            warm.step()
            opt.zero_grad()
        gw.close()

    x, y = regression()
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reports, caught = train(
        model, lambda m: F.mse_loss(m(x), y), opt, 200, every=10, curvature_every=1
    )
    assert not any(r.findings for r in reports)


class Noisy(nn.Module):
    """Batch norm (running statistics) and dropout (the RNG): the forward has side effects."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
        )

    def forward(self, x):
        return self.net(x)


def noisy_run(curvature: bool, steps: int = 12):
    torch.manual_seed(3)
    model = Noisy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    kwargs = {"curvature_every": 1, "curvature_loss": lambda: F.mse_loss(model(x), y)}
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(model, every_n_steps=2, **(kwargs if curvature else {}))
        for _ in range(steps):
            F.mse_loss(model(x), y).backward()
            report = gw.step(optimizer=opt)
            assert (report is not None and report.curvature is not None) == (
                curvature and report is not None
            )
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        gw.close()
    return model, grads, torch.rand(3)


def test_training_is_bit_identical_with_the_probe_on_or_off():
    """Its extra forward runs dropout and batch norm: the random streams and the running
    statistics are restored, ``.grad`` is never written, so every gradient, every weight, every
    buffer and the next random number are the same as without it."""
    off_model, off_grads, off_next = noisy_run(False)
    on_model, on_grads, on_next = noisy_run(True)
    for a, b in zip(off_grads, on_grads):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, atol=0, rtol=0)
    for a, b in zip(off_model.state_dict().values(), on_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(off_next, on_next, atol=0, rtol=0)


def test_measured_on_every_kth_logging_step_only():
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    calls = []

    def loss_fn():
        calls.append(gw.current_step)
        return F.mse_loss(model(x), y)

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.GradWatch(
        model, every_n_steps=5, curvature_every=2, curvature_loss=loss_fn
    ) as gw:
        for _ in range(30):
            F.mse_loss(model(x), y).backward()
            report = gw.step(optimizer=opt)
            if report is not None:
                assert (report.curvature is not None) == (report.step in (0, 10, 20))
            opt.step()
            opt.zero_grad()
    assert calls == [0, 10, 20]


def test_without_an_optimizer_only_the_eigenvalue():
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    with gradwatch.GradWatch(
        model, every_n_steps=1, curvature_every=1, curvature_loss=lambda: F.mse_loss(model(x), y)
    ) as gw:
        F.mse_loss(model(x), y).backward()
        c = gw.step().curvature
    assert c.top_eigenvalue > 0 and c.stability_ratio is None and c.progress is None
    assert "stability ratio" not in str(gw.report)


def test_optimizer_mode_measures_inside_the_step():
    x, y = regression()
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with gradwatch.GradWatch(
            model,
            every_n_steps=1,
            optimizer=opt,
            curvature_every=1,
            curvature_loss=lambda: F.mse_loss(model(x), y),
        ) as gw:
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert gw.report.curvature.stability_ratio == pytest.approx(
        0.3 * gw.report.curvature.top_eigenvalue / 2
    )


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"curvature_every": 0, "curvature_loss": lambda: 0}, ValueError, "curvature_every"),
        ({"curvature_every": "2", "curvature_loss": lambda: 0}, ValueError, "'2'"),
        ({"curvature_every": 2}, ValueError, "needs curvature_loss"),
        ({"curvature_loss": lambda: 0}, ValueError, "curvature_every is None"),
        ({"curvature_every": 1, "curvature_loss": 3.0}, TypeError, "curvature_loss must be"),
    ],
)
def test_bad_arguments_name_the_argument_before_the_model_is_touched(kwargs, error, words):
    model = nn.Linear(2, 1)
    with pytest.raises(error, match=words):
        gradwatch.GradWatch(model, **kwargs)
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize(
    "loss_fn,words",
    [
        (lambda m, x: 1.0, "one-element tensor"),
        (lambda m, x: m(x), "shape (8, 1)"),
        (lambda m, x: m(x).sum().detach(), "requires_grad=False"),
        (lambda m, x: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_a_failing_loss_warns_once_and_training_goes_on(loss_fn, words):
    model = nn.Linear(2, 1)
    x = torch.randn(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.GradWatch(
            model, every_n_steps=1, curvature_every=1, curvature_loss=lambda: loss_fn(model, x)
        ) as gw:
            for _ in range(3):
                model(x).pow(2).mean().backward()
                report = gw.step(optimizer=opt)
                assert report.curvature is None and report.layers[""].grad_norm > 0
                opt.step()
                opt.zero_grad()
    messages = [str(w.message) for w in caught if "curvature" in str(w.message)]
    assert len(messages) == 1 and words in messages[0] and "training continues" in messages[0]


def test_report_keeps_the_curvature_through_json():
    x, y = regression()
    model = nn.Linear(8, 1)
    reports, _ = train(
        model,
        lambda m: F.mse_loss(m(x), y),
        torch.optim.SGD(model.parameters(), lr=0.3),
        1,
        curvature_every=1,
    )
    d = json.loads(json.dumps(reports[0].to_dict(), allow_nan=False))
    back = gradwatch.Report.from_dict(d)
    assert back.curvature == reports[0].curvature
    assert gradwatch.Report.from_dict({**d, "curvature": None}).curvature is None


def test_tensorboard_gets_the_curvature_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = regression()
    model = nn.Linear(8, 1)
    train(
        model,
        lambda m: F.mse_loss(m(x), y),
        torch.optim.SGD(model.parameters(), lr=0.3),
        4,
        every=2,
        curvature_every=1,
        log_dir=str(tmp_path),
    )
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "gradwatch/global/curvature" in tags and "gradwatch/global/stability_ratio" in tags
    assert [e.step for e in acc.Scalars("gradwatch/global/curvature")] == [0, 2]
    # the limit the top eigenvalue is charted against: 2/lr for plain gradient descent
    limits = [e.value for e in acc.Scalars("gradwatch/global/curvature_limit")]
    assert limits == [pytest.approx(2 / 0.3, rel=1e-5)] * 2
    from gradwatch.output.dashboard import layout
    from gradwatch.report import Curvature, Report

    report = Report(0, curvature=Curvature(10.0, 1.5))
    charts = layout(report, set())["gradwatch: overview"]
    (chart,) = [v for k, v in charts.items() if k.startswith("top Hessian eigenvalue")]
    assert any("curvature_limit" in t for t in chart[1]) and any(
        t.endswith("curvature$") for t in chart[1]
    )


def _images(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, (x.mean((1, 2, 3)) * 40).long().clamp(-4, 5) + 4  # a learnable label


def _tokens(n):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (n, 16), generator=g)


HEALTHY_RUNS = {  # held out: none of these set a threshold
    "cnn, batch norm, SGD momentum": (
        zoo.cnn_bn_pool,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
        _images(512),
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    ),
    "transformer, AdamW": (
        zoo.TokenTransformer,
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4),
        (_tokens(256),),
        lambda m, b: F.cross_entropy(m(b[0])[:, :-1].flatten(0, 1), b[0][:, 1:].flatten()),
    ),
    "LSTM, Adam": (
        zoo.LSTMClassifier,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        (torch.randn(256, 20, 32), torch.randint(0, 5, (256,))),
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    ),
    "relu MLP, RMSprop": (
        lambda: zoo.mlp(nn.ReLU, depth=6, init=zoo.he),
        lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
        zoo.classification_batch(512),
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    ),
}


@pytest.mark.parametrize("name", sorted(HEALTHY_RUNS))
def test_healthy_minibatch_runs_raise_no_curvature_finding(name):
    """200 minibatch steps, the curvature measured on every logging step: no ravine and no
    plateau, and every measurement there. Plain SGD stays below its limit; RMSprop at its
    default rate does not (its preconditioned ratio is 1.5-300 here, the first step the
    highest) and trains well: why adaptive ratios are reported and not judged."""
    make, make_opt, data, loss_of = HEALTHY_RUNS[name]
    torch.manual_seed(0)
    model = make()
    opt = make_opt(model)
    n = data[0].shape[0]
    batch = None
    gen = torch.Generator().manual_seed(1)

    def loss_fn(m):
        return loss_of(m, batch)

    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.GradWatch(
            model, every_n_steps=40, curvature_every=1, curvature_loss=lambda: loss_fn(model)
        ) as gw:
            for _ in range(200):
                idx = torch.randint(0, n, (16,), generator=gen)
                batch = tuple(t[idx] for t in data)
                loss_fn(model).backward()
                report = gw.step(optimizer=opt)
                if report is not None:
                    reports.append(report)
                opt.step()
                opt.zero_grad()
    assert len(reports) == 5 and all(r.curvature is not None for r in reports)
    ratios = [r.curvature.stability_ratio for r in reports]
    adaptive = not isinstance(opt, torch.optim.SGD)
    assert all(r.curvature.adaptive == adaptive for r in reports)
    assert all(0 < x < (math.inf if adaptive else 1) for x in ratios), ratios
    if isinstance(opt, torch.optim.RMSprop):
        assert max(ratios) > 1  # the case for not judging them
    assert loss_fn(model).item() < reports[0].curvature.loss  # it learned
    found = {f.kind for r in reports for f in r.findings}
    assert not found & {"sharp_curvature", "plateau"}, found
    assert not [w for w in caught if "curvature" in str(w.message)]


def _judge(ratios, adaptive=False, losses=None, **thresholds):
    """The diagnosis over a run of curvature measurements with these stability ratios (and
    curvature losses, 1.0 throughout unless given)."""
    from gradwatch.diagnosis import Diagnosis
    from gradwatch.report import Curvature, Report

    t = gradwatch.Thresholds(**thresholds)
    diagnosis, out = Diagnosis(), []
    for step, ratio in enumerate(ratios):
        loss = 1.0 if losses is None else losses[step]
        report = Report(
            step,
            curvature=Curvature(
                2 * ratio / 0.1, ratio, 5, True, loss, 0.1, "lr x lambda / 2", adaptive
            ),
        )
        found = [f for f in diagnosis.findings(report, t, 0.1) if f.kind == "sharp_curvature"]
        out.append(found[0].severity if found else None)
    return out


def test_a_ravine_is_judged_at_once_first_then_only_when_it_lasts():
    """The first measurement is judged at once; later, a ratio that comes and goes around 1 (the
    edge of stability) is quiet, and one that stays past it for curvature_patience
    measurements is a finding again unless the loss is still below where it was (the edge of
    stability: a note), an error when it has lasted at twice the limit."""
    assert _judge([1.15]) == ["info"]  # a catapult's range: a note
    assert _judge([4.8]) == ["warning"]  # at once, but an error only when it lasts
    wobbly = [0.7, 1.5, 1.0, 2.8, 1.8, 0.8, 1.9, 1.4, 2.4, 0.7]  # plain SGD, lr 0.1, healthy
    assert _judge(wobbly) == [None] * 10
    lasting = [0.8, 1.0, 2.5, 3.2, 3.7, 8.0, 3.1, 0.9]  # lr 0.3, before its NaN
    assert _judge(lasting) == [None, None, None, None, None, "warning", "error", None]
    hovering = [0.95, 1.01, 1.02, 1.0, 1.03, 1.01, 1.02, 0.99]  # full batch at 2/lr: the EoS
    falling = [0.05, 0.048, 0.05, 0.046, 0.049, 0.044, 0.047, 0.042]  # up and down, and down
    eos = [None] * 5 + ["info"] * 2 + [None]
    assert _judge(hovering, losses=falling) == eos
    climbing = [0.05 * 1.3**k for k in range(8)]  # the same ratios, the loss past its start
    assert _judge(hovering, losses=climbing) == eos[:5] + ["warning"] * 2 + [None]
    assert _judge([0.5] + [1.2] * 6) == [None] * 5 + ["warning"] * 2
    assert _judge([0.5] + [1.2] * 3, curvature_patience=2) == [None, None, "warning", "warning"]
    assert _judge([3.0] * 8, adaptive=True) == [None] * 8


def _compiled_run(eager: bool) -> tuple[list, list[str]]:
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    compiled = torch.compile(model)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    through = model if eager else compiled
    curvatures = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gw = gradwatch.GradWatch(
            model,
            every_n_steps=1,
            curvature_every=1,
            curvature_loss=lambda: F.mse_loss(through(x), y),
        )
        for _ in range(2):
            F.mse_loss(compiled(x), y).backward()
            curvatures.append(gw.step(optimizer=opt).curvature)
            opt.step()
            opt.zero_grad()
        gw.close()
    return curvatures, [str(w.message) for w in caught]


def test_under_torch_compile_the_loss_calls_the_eager_module():
    """Compiled graphs have no double backward: the warning says to call the model itself,
    which shares the compiled wrapper's parameters and then measures."""
    curvatures, messages = _compiled_run(eager=False)
    assert curvatures == [None, None]
    assert sum("not its torch.compile'd wrapper" in m for m in messages) == 1
    curvatures, messages = _compiled_run(eager=True)
    assert all(c is not None and c.top_eigenvalue > 0 for c in curvatures)
    assert not any("curvature" in m for m in messages)
