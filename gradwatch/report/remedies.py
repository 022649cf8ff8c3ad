"""The remedy catalogue: stable ids, why each fix works, and the smallest code change.

Every entry rests on the same mechanism: the gradient reaching a layer is the output-side
gradient multiplied by the Jacobians of every layer in between, and each Jacobian is the weight
matrix times the activation's local derivatives. A fix either keeps those factors near 1, gives the
gradient a path that bypasses them, or stops a numerical failure from spreading.
"""

from __future__ import annotations

import functools

from .records import Remedy

# id -> (what to do, why it helps, code template). ``{layer}`` is the affected layer's name.
CATALOGUE: dict[str, tuple[str, str, str]] = {
    "relu-family": (
        "Replace the saturating activation with ReLU, LeakyReLU or GELU",
        "sigmoid's derivative is at most 1/4 and tanh's is below 1 away from zero, so every layer "
        "multiplies the backward signal by a factor below 1; ReLU-family derivatives are 1 on their "
        "active side and have no saturating tail there",
        "nn.Sigmoid() -> nn.ReLU()  (or nn.GELU())",
    ),
    "normalization": (
        "Normalise the pre-activations (BatchNorm/LayerNorm before each activation)",
        "normalising each layer's pre-activations to zero mean and unit variance keeps them in the "
        "region where the activation's derivative is large, so they cannot drift into the flat tails",
        "nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), act)  (nn.LayerNorm(d) for sequences)",
    ),
    "residual": (
        "Add skip connections around the blocks",
        "a residual block x + f(x) has Jacobian I + df/dx, so the product of Jacobians always "
        "contains an identity path and the signal cannot shrink to nothing with depth",
        "def forward(self, x): return x + self.block(x)",
    ),
    "he-init": (
        "Initialise the ReLU layers with He (Kaiming) initialisation",
        "ReLU passes about half of its inputs, so the backward variance stays constant from layer "
        "to layer only when Var[W] = 2/fan_in; a smaller variance (PyTorch's default nn.Linear/"
        "nn.Conv init gives 1/(3 fan_in)) shrinks the signal at every layer, a larger one grows it",
        'nn.init.kaiming_normal_(layer.weight, nonlinearity="relu"); nn.init.zeros_(layer.bias)',
    ),
    "xavier-init": (
        "Initialise with Xavier (Glorot) initialisation",
        "for tanh/sigmoid and linear layers, Var[W] = 1/fan_in (or 2/(fan_in+fan_out)) keeps the "
        "per-layer factor of the backward variance near 1 instead of far above or below it",
        "nn.init.xavier_normal_(layer.weight); nn.init.zeros_(layer.bias)",
    ),
    "lecun-init": (
        "Initialise the SELU layers with LeCun initialisation",
        "SELU keeps activations at zero mean and unit variance by itself only when Var[W] = "
        "1/fan_in: with that scale the backward factor chi stays near 1, with another it drifts "
        "layer by layer",
        "nn.init.kaiming_normal_(layer.weight, nonlinearity='linear'); nn.init.zeros_(layer.bias)",
    ),
    "gradient-clipping": (
        "Clip the gradient norm before the optimizer step",
        "clipping caps the size of an update when the product of Jacobians blows up, so one bad "
        "step cannot throw the weights far away",
        "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)  # before optimizer.step()",
    ),
    "lower-lr": (
        "Lower the learning rate (or add warm-up)",
        "large updates push pre-activations far from zero, where ReLUs stay off for every input and "
        "saturating units stop passing gradient; in sharp regions of the loss a step that is too "
        "large oscillates or diverges",
        "for g in optimizer.param_groups: g['lr'] *= 0.1",
    ),
    "lr-warmup": (
        "Warm the learning rate up over the first steps",
        "the curvature is often largest at the start, before the weights reach a region the "
        "learning rate suits (and before an adaptive optimizer's moment estimates settle); a few "
        "hundred steps of growing learning rate let the sharpest directions flatten first",
        "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, "
        "total_iters=500)  # scheduler.step() after each optimizer.step()",
    ),
    "raise-lr": (
        "Raise the learning rate",
        "where the slope and the curvature are both small, each step moves the loss by almost "
        "nothing, and the sharpest direction is still far from the largest step it tolerates "
        "(the stability ratio says how far: a step can grow by about 1 over it)",
        "for g in optimizer.param_groups: g['lr'] *= 10  # stable while the ratio stays below 1",
    ),
    "standardize-inputs": (
        "Standardise the input features to zero mean and unit variance",
        "a raw feature measured in large units (a salary around 1e5, pixels 0..255) makes the first "
        "pre-activations huge, so the first activation sits in its flat region and passes zero "
        "gradient whatever the weights are",
        "x = (x - x_train.mean(0)) / x_train.std(0)  # statistics from the training set",
    ),
    "gated-rnn": (
        "Use a gated recurrent cell (LSTM or GRU)",
        "a vanilla RNN multiplies the signal by the same recurrent Jacobian at every time step, so "
        "it shrinks or grows exponentially with the time gap; gates give an additive path through time",
        "nn.RNN(d_in, d_h) -> nn.LSTM(d_in, d_h)  (or nn.GRU)",
    ),
    "orthogonal-init": (
        "Initialise the recurrent weight as an orthogonal matrix",
        "backpropagating through time multiplies the signal by the recurrent weight once per step; "
        "an orthogonal matrix has every singular value 1, so it neither shrinks nor grows any "
        "direction, and only the activation's derivative is left to change the signal",
        "for n, w in rnn.named_parameters(): nn.init.orthogonal_(w) if n.startswith('weight_hh') else None",
    ),
    "forget-gate-bias": (
        "Bias the forget gate (a GRU's update gate) towards keeping the state",
        "through time the gradient follows the cell's additive path, scaled at each step by the "
        "gate that keeps the state; PyTorch starts that gate's bias at 0, a sigmoid of 0.5, which "
        "halves the signal per step; a bias of 1 to 3 (or log of the time scale you need) keeps "
        "most of it, and the gate can still learn to forget",
        "H = rnn.hidden_size; [b.data[H:2*H].fill_(1.0) for n, b in rnn.named_parameters() if n.startswith('bias_ih')]",
    ),
    "leaky-relu": (
        "Use LeakyReLU (or GELU) so that switched-off units keep a small gradient",
        "a ReLU unit whose pre-activation is negative for every input has zero derivative everywhere, "
        "so its weights never change again; a small negative slope lets it recover",
        "nn.ReLU() -> nn.LeakyReLU(0.01)",
    ),
    "qk-layernorm": (
        "Normalise queries and keys before their dot product",
        "an attention logit is q.k/sqrt(d), so it grows with the product of the query and key "
        "norms, which the learning rate lets grow together; a LayerNorm (or RMSNorm) on q and k "
        "per head fixes their scale, the logits stay bounded and the softmax cannot go one-hot",
        "q, k = self.q_norm(q), self.k_norm(k)  # nn.LayerNorm(head_dim) each, before q @ k.T",
    ),
    "qk-clip": (
        "Clip the attention logits (QK-clip, or a tanh soft cap)",
        "rescaling the query and key weights of a head whose largest logit passed a threshold "
        "(QK-clip), or capping the logits smoothly before the softmax, bounds them where the "
        "architecture cannot change",
        "logits = cap * torch.tanh(logits / cap)  # cap about 30-50, before the softmax",
    ),
    "z-loss": (
        "Add a z-loss on the output logits",
        "log Z, the log of the softmax's normaliser, is free to drift because adding a constant "
        "to every logit leaves the loss unchanged; a small penalty on log Z squared holds it "
        "near 0, where low-precision logits keep their resolution",
        "loss = loss + 1e-4 * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()",
    ),
    "weight-decay": (
        "Use (decoupled) weight decay",
        "decay pulls every weight back towards 0 at each step, so norms that the gradient lets "
        "grow without bound (the output head's, the queries' and keys') settle where the two "
        "balance",
        "torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)",
    ),
    "lower-epsilon": (
        "Lower Adam's epsilon",
        "Adam divides by sqrt(v_hat) + eps; once a layer's gradients are as small as eps, the "
        "denominator is eps rather than the gradient's own scale and the step shrinks towards "
        "lr * grad / eps, far below lr: the layer stops learning at the rate it was given",
        "torch.optim.AdamW(params, lr=lr, eps=1e-15)",
    ),
    "lower-beta2": (
        "Lower Adam's beta2 (e.g. 0.999 -> 0.95)",
        "the second moment averages the squared gradient over about 1/(1 - beta2) steps; when "
        "a layer's gradient grows faster than that, sqrt(v_hat) lags behind it and the step "
        "m_hat/sqrt(v_hat) grows far past its usual size; a shorter average follows the "
        "gradient",
        "torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))",
    ),
    "skip-batch": (
        "Replay the step's batch, then skip or clip the spike",
        "a spike often starts at one batch (repeated or corrupted data); replaying it at the "
        "step named tells data from optimiser; skipping steps whose loss or gradient norm "
        "passes the spike threshold (as OLMo's skip-step optimiser does) stops one batch from "
        "undoing many",
        "torch.save(batch, f'spike_{step}.pt')  # in the loop, when gw.report names the step",
    ),
    "check-nonfinite": (
        "Find where the first NaN/Inf comes from",
        "one non-finite value poisons every gradient computed from it; look at the inputs, the loss "
        "(log of 0, division by 0), the learning rate, and run one step under anomaly detection",
        "with torch.autograd.detect_anomaly(): loss = loss_fn(model(x), y); loss.backward()",
    ),
}


@functools.lru_cache(maxsize=4096)  # the same layers and rounded values, step after step
def remedy(remedy_id: str, context: str = "") -> Remedy:
    """A catalogue remedy; ``context`` names the layer and the measured value it answers."""
    action, why, code = CATALOGUE[remedy_id]
    lead = f" ({context})" if context else ""
    return Remedy(remedy_id, f"{action}{lead}: {why}. Change: `{code}`")


def remedies(ids: list[str], context: str = "") -> tuple[Remedy, ...]:
    """The catalogue remedies ``ids`` for one ``context``: the same tuple step after step (a deep
    net's findings are thousands of objects a step, which the garbage collector pays for)."""
    return _remedies(tuple(ids), context)


@functools.lru_cache(maxsize=4096)
def _remedies(ids: tuple[str, ...], context: str) -> tuple[Remedy, ...]:
    return tuple(remedy(rid, context) for rid in ids)


def action(remedy_id: str) -> str:
    """The one-line action of a remedy, for short messages."""
    return CATALOGUE[remedy_id][0]


def catalogue_markdown() -> str:
    """The catalogue as the markdown table of ``docs/rules.md`` (a test keeps the two equal)."""
    rows = ["| id | what to change | why | the change |", "| --- | --- | --- | --- |"]
    for rid, (what, why, code) in CATALOGUE.items():
        rows.append(f"| `{rid}` | {what} | {why} | `{code}` |")
    return "\n".join(rows)
