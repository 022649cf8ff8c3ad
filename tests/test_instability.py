"""The transformer instabilities, reproduced at CPU size from their published mechanisms, and the
runs that must stay silent: attention-logit growth (Dehghani et al. 2023; Wortsman et al. 2023),
output-logit drift, Adam's epsilon and update jumps, loss spikes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.diagnosis.instability import Instability
from gradwatch.report import LayerStats, Report
from tests.helpers.lm import train_lm, watched_run

KINDS = ("attention_logits", "logit_drift", "adam_epsilon", "update_jump", "loss_spike")


def kinds(reports):
    return {(f.kind, f.layer) for r in reports for f in r.findings}


def attention(report):
    return [s for s in report.layers.values() if s.attention_max_logit is not None]


def test_attention_logits_grow_without_qk_layernorm_and_not_with_it():
    """Wortsman et al. 2023, Fig. 1 at CPU size: the same pre-LN LM, AdamW (beta2 0.95), a high
    learning rate; without qk-layernorm the largest attention logit grows a hundredfold and the
    attention entropy collapses, with it both stay where they started."""
    # (at this rate the run is chaotic: the thread count alone moves its peak by 20%, so the
    # bounds below hold with a wide margin, not to the digit)
    plain, plain_losses = train_lm(300, 3e-2)
    normed, normed_losses = train_lm(300, 3e-2, qk_norm=True)
    first = attention(plain[0])
    assert max(s.attention_max_logit for s in first) < 5
    peak = attention(max(plain, key=lambda r: max(s.attention_max_logit for s in attention(r))))
    worst = max(range(len(peak)), key=lambda k: peak[k].attention_max_logit)
    assert peak[worst].attention_max_logit > 200
    assert peak[worst].attention_entropy < 0.2 * first[worst].attention_entropy
    found = [f for r in plain for f in r.findings if f.kind == "attention_logits"]
    assert found and {f.severity for f in found} == {"warning", "error"}
    assert [r.id for r in found[0].remedies] == ["qk-layernorm", "qk-clip", "lower-lr"]
    assert "attention logits grew" in found[0].message
    # it fires once the logits pass the threshold, not before
    onset = min(f.since for f in found)
    before = [r for r in plain if r.step < onset]
    assert all(max(s.attention_max_logit for s in attention(r)) < 100 for r in before)
    # with qk-layernorm: bounded logits, a lower loss, no finding of any kind
    assert max(s.attention_max_logit for r in normed for s in attention(r)) < 20
    assert kinds(normed) == set()
    assert sum(normed_losses[-50:]) < sum(plain_losses[-50:])


def test_a_healthy_lm_run_is_silent_and_its_loss_is_read():
    reports, losses = train_lm(300, 3e-3, every=10, weight_norm_every=1)
    assert kinds(reports) == set()
    last = reports[-1]
    assert last.loss == pytest.approx(losses[last.step])
    assert [k for k, _ in last.losses] == list(range(last.step - 9, last.step + 1))
    head = last.layers["lm_head"]
    assert head.log_z_mean is not None and head.update_ratio is not None
    assert 0 < head.adam_step_rms < 1 and -1 <= head.update_cosine <= 1


def _tiny_gradients(eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=5, weight_norm_every=1) as gw:
            for _ in range(30):
                # a loss scaled far down: gradients of about 1e-11, below Adam's default eps
                loss = 1e-10 * F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                reports.append(gw.step(opt))
                opt.step()
    return [r for r in reports if r is not None]


def test_adam_epsilon_dominates_tiny_gradients_and_a_lower_epsilon_fixes_it():
    """Wortsman et al. 2023 (sec. 3.4): once gradients are as small as eps, eps sets Adam's step."""
    dominated = _tiny_gradients(1e-8)
    found = [f for f in dominated[-1].findings if f.kind == "adam_epsilon"]
    assert {f.layer for f in found} == {"0", "2"}
    assert found[0].remedies[0].id == "lower-epsilon"
    assert dominated[-1].layers["0"].adam_epsilon_share == 1.0
    assert dominated[-1].layers["0"].adam_step_rms < 0.05  # far below Adam's usual ~0.1-1
    fixed = _tiny_gradients(1e-15)
    assert kinds(fixed) == set()
    assert fixed[-1].layers["0"].adam_epsilon_share == 0.0
    assert fixed[-1].layers["0"].adam_step_rms > 0.05


def _gradient_jump(beta2, at=2000):
    """A noisy regression trained to a steady state (Adam's step then small: the gradient's sign
    keeps changing), then one batch whose inputs are 100x larger."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, beta2))
    w = torch.randn(8, 1)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        every = lambda step: step >= at - 20  # noqa: E731
        with gradwatch.GradWatch(model, every_n_steps=every, weight_norm_every=1) as gw:
            for step in range(at + 10):
                x = torch.randn(8, 8)
                if step == at:
                    x = x * 100
                loss = F.mse_loss(model(x), x @ w + torch.randn(8, 1))
                opt.zero_grad()
                loss.backward()
                reports.append(gw.step(opt))
                opt.step()
    return {r.step: r for r in reports if r is not None}


def test_an_adam_step_that_jumps_is_named_where_the_second_moment_lags():
    """The step m_hat/sqrt(v_hat) of a gradient that outgrows v's long average (beta2 0.999)
    jumps; with beta2 0.95 v follows and the step stays near its usual size."""
    lagging = _gradient_jump(0.999)
    jumps = [
        (k, f.layer) for k, r in lagging.items() for f in r.findings if f.kind == "update_jump"
    ]
    assert (2000, "2") in jumps and all(step >= 2000 for step, _ in jumps)
    f = next(f for f in lagging[2000].findings if f.kind == "update_jump")
    # theory: m_hat jumps by (1 - beta1) G, sqrt(v_hat) by sqrt((1 - beta2) / (1 - beta2^t)) G,
    # so the step reaches (1 - beta1) / sqrt((1 - 0.999) / (1 - 0.999^2000)) = 2.9
    rms = lagging[2000].layers["2"].adam_step_rms
    assert rms == pytest.approx(2.9, rel=0.1) and f.value >= 6
    assert f.remedies[0].id == "lower-beta2"
    following = _gradient_jump(0.95)
    assert not [f for r in following.values() for f in r.findings if f.kind == "update_jump"]


def _classifier_run(spike_at=None, every=10, steps=200):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    teacher = torch.randn(16, 4)

    def loss_of(step):
        x = torch.randn(64, 16)
        y = (x @ teacher).argmax(1)
        if step == spike_at:  # a corrupted batch: shuffled labels, inputs 20x
            x, y = 20 * x, y[torch.randperm(64)]
        return F.cross_entropy(model(x), y)

    return watched_run(model, opt, loss_of, steps, every_n_steps=every)[0]


@pytest.mark.parametrize("spike_at", [150, 155], ids=["on-a-logging-step", "between"])
def test_a_loss_spike_names_its_step_and_the_layers_whose_share_moved(spike_at):
    reports = _classifier_run(spike_at)
    spikes = [(r.step, f) for r in reports for f in r.findings if f.kind == "loss_spike"]
    assert [step for step, _ in spikes] == [160 if spike_at == 155 else 150]
    f = spikes[0][1]
    assert f"loss spike at step {spike_at}" in f.message
    assert f"Replay the batch of step {spike_at}" in f.message
    assert f.value > 6 and f.remedies[0].id == "skip-batch"
    # named at the layer whose share of the gradient norm moved most against the steps before
    at = next(r for r in reports if r.step == spikes[0][0])
    before = [r.grad_shares() for r in reports if at.step - 80 <= r.step < at.step]
    moved = {k: v - sum(b[k] for b in before) / len(before) for k, v in at.grad_shares().items()}
    assert f.layer == max(moved, key=lambda k: abs(moved[k]))
    assert "share of the gradient norm changed most" in f.message


def test_a_noisy_healthy_loss_is_no_spike():
    assert kinds(_classifier_run(None, steps=300)) == set()


def test_a_converged_loss_that_triples_on_a_hard_batch_is_no_spike():
    """Judged on log(loss): near 0 a loss of 2e-4 has a standard deviation of a few 1e-5, so
    OLMo's linear score calls a hard batch of 6e-4 a spike; as a factor it is ordinary."""
    t, history = gradwatch.Thresholds(), Instability()
    g = torch.Generator().manual_seed(0)
    losses = (2e-4 * torch.exp(0.5 * torch.randn(400, generator=g))).tolist()
    losses[300] = 6e-4
    found = [history.findings(Report(k, {}, losses=[(k, v)]), t) for k, v in enumerate(losses)]
    assert not any(found)
    assert history.findings(Report(400, {}, losses=[(400, 0.2)]), t)  # 1000x: a spike


def test_spike_window_and_sigmas_are_settable_and_checked():
    loose = gradwatch.Thresholds(spike_sigmas=1e3, spike_window=16)
    assert loose.spike_window == 16
    with pytest.raises(ValueError, match="spike_window must be >= 4"):
        gradwatch.Thresholds(spike_window=2)
    with pytest.raises(ValueError, match="spike_sigmas"):
        gradwatch.Thresholds(spike_sigmas=0)
    with pytest.raises(ValueError, match="loss must be a number or a one-element tensor"):
        gradwatch.GradWatch(nn.Linear(2, 2)).step(loss=torch.ones(3))
    with pytest.raises(TypeError, match="loss must be a number"):
        gradwatch.GradWatch(nn.Linear(2, 2)).step(loss="high")


def _head_report(step, log_z, top=None, level=None):
    """The output head's row: log Z, and (unless given) a level that moved with it."""
    level = log_z - 5.0 if level is None else level
    s = LayerStats(
        "lm_head", "Linear", log_z_mean=log_z, log_z_max=top or abs(log_z), logit_mean=level
    )
    return Report(step, {"lm_head": s})


def test_log_z_drift_is_judged_from_its_early_value():
    t, history = gradwatch.Thresholds(), Instability()
    values = [4.6, 4.7, 4.5, 0.0, -10.0, -15.0, -30.0, -70.0]
    found = [history.findings(_head_report(10 * k, v), t) for k, v in enumerate(values)]
    assert [bool(f) for f in found] == [False] * 6 + [True, True]
    warning, error = found[-2][0], found[-1][0]
    assert warning.kind == "logit_drift" and warning.severity == "warning"
    assert error.severity == "error"  # |log Z| past 64: bf16's spacing is half a nat
    assert [r.id for r in warning.remedies] == ["z-loss", "weight-decay"]
    # a model that starts far from 0 (log Z of a large vocabulary) is not a drift
    history = Instability()
    assert not any(history.findings(_head_report(k, 11.0 + 0.1 * k), t) for k in range(20))
    # a classifier growing confident: its log Z rises with the winning logit while the level
    # of the logits falls; that is the spread growing, not the level drifting
    history = Instability()
    confident = [history.findings(_head_report(k, 2.3 + k, level=-0.3 * k), t) for k in range(40)]
    assert not any(confident)


def test_a_confident_classifier_trained_long_has_no_logit_drift():
    """Separable data, Adam, no weight decay: the loss falls towards 0 and the winning logit
    (and log Z with it) keeps growing; the level of the logits does not follow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    names = dict(model.named_modules())
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    x = torch.randn(256, 16)
    y = (x @ torch.randn(16, 4)).argmax(1)
    reports, losses = watched_run(
        model, opt, lambda _: F.cross_entropy(model(x), y), 4000, every_n_steps=5, logits_layer="2"
    )
    head = [r.layers["2"].log_z_mean for r in reports]
    assert head[-1] - sorted(head[:3])[1] > 20  # past the threshold from its early value
    assert losses[-1] < 1e-5 and "2" in names
    assert reports[-1].layers["2"].logit_mean < 0  # the level fell while log Z rose
    assert kinds(reports) == set()


def test_attention_that_starts_at_exactly_zero_is_judged_from_one():
    """A zero-initialised query projection gives logits of exactly 0 at first (muP): the early
    value is floored at 1, not divided by."""
    t, history = gradwatch.Thresholds(), Instability()
    for step, top in enumerate([0.0, 0.0, 0.0, 50.0, 150.0]):
        s = LayerStats("a:attention#0", "attention", attention_max_logit=top, attention_entropy=2)
        found = history.findings(Report(step, {s.name: s}), t)
    assert [f.kind for f in found] == ["attention_logits"] and "150x its early 1" in found[
        0
    ].message


class ShiftedHead(nn.Module):
    """A classifier whose logits all move by one offset (its bias, moved alike for every class):
    the loss cannot see it, so nothing holds it (the test moves it, as updates without z-loss
    may)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


def test_a_drifting_log_z_is_measured_and_named_at_the_head():
    model = ShiftedHead()
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1) as gw:
            for _ in range(40):
                F.cross_entropy(model(x), y).backward()
                reports.append(gw.step())
                model.zero_grad()
                with torch.no_grad():  # one nat a step, downward, on every logit alike
                    model.classifier.bias -= 1.0
    drift = [r.step for r in reports for f in r.findings if f.kind == "logit_drift"]
    assert drift and drift[0] == 21  # 20 nats below its early value (step 1's)
    assert {f.layer for r in reports for f in r.findings} == {"classifier"}
    with torch.no_grad():
        want = torch.logsumexp(model(x), -1).mean().item() + 10  # at step 30: 10 nats back up
    assert reports[30].layers["classifier"].log_z_mean == pytest.approx(want, rel=1e-4)


def test_the_instability_state_survives_a_resume():
    t, history = gradwatch.Thresholds(), Instability()
    for k, v in enumerate([4.6, 4.7, 4.5]):
        history.findings(_head_report(k, v), t)
    copy = Instability()
    copy.load_state_dict(history.state_dict())
    assert copy.findings(_head_report(3, -20.0), t)
    assert not Instability().findings(_head_report(3, -20.0), t)  # no early value: no drift
