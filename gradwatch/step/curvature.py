"""The loss's curvature on one batch, and the optimizer's step against it (opt-in).

A small gradient is either a plateau (the slope and the curvature are both small: steps of this
size barely move the loss) or a sharp ravine (the slope is small but the curvature is large, and a
step that suits the flat directions overshoots the sharp one). The largest eigenvalue of the
loss's Hessian tells them apart. It is found by power iteration on Hessian-vector products
(double backward through the user's loss), warm-started from the last measurement's eigenvector,
so that a few products per measurement follow it as it turns.

Along a direction of curvature ``lam``, gradient descent with step ``lr`` multiplies the distance
to that direction's minimum by ``1 - lr * lam`` per step: it converges only while
``lr * lam < 2``. Each optimizer has such a limit; this module writes its step as per-coordinate
step sizes ``d`` over that limit, so that the *stability ratio* is the top eigenvalue of
``D^1/2 H D^1/2`` (``D = diag(d)``), above 1 unstable:

* SGD, momentum ``b``, dampening ``t``: heavy-ball iteration, stable while
  ``lr (1 - t) lam < 2 (1 + b)``; Nesterov: ``lr lam (1 + 2b) < 2 (1 + b)``.
* Adam/AdamW: the step is ``lr m / (sqrt(v) + eps)``, with ``m`` an average of gradients with
  weight ``1 - b1``. With the second moments held still (they change slowly), that is heavy-ball
  momentum on the Hessian preconditioned by ``1 / (sqrt(v) + eps)``: stable while
  ``lr (1 - b1) lam_P < 2 (1 + b1)``, ``lam_P`` the top eigenvalue of that preconditioned Hessian
  (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"). The raw Hessian's
  eigenvalue says little about Adam: its step is not proportional to the gradient.
* RMSprop (momentum ``b``) and Adagrad: the same with their own accumulators.

Others (or no optimizer): the top eigenvalue alone, no ratio. Weight decay is left out (it adds
its coefficient, 1e-4 to 1e-2, to every curvature). So is Adam's bias correction of ``m`` (a
factor that goes to 1 within ``1 / (1 - b1)`` steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..measure.adam import next_step
from ..report import Curvature

ITERATIONS = 20  # Hessian-vector products per estimate from the last eigenvector, at most
COLD_ITERATIONS = 100  # the same from a random start
# Stop when ||Hv - lam v|| <= TOLERANCE * |lam|: an eigenvalue then lies within that distance of
# the estimate (the Rayleigh quotient of a symmetric operator), and the estimate's own error is
# about the square of it over the gap to the next eigenvalue. Or when the estimate moved by less
# than STALL * |lam| in a step: eigenvalues too close to tell apart turn the vector among them
# for long while the estimate has settled (each step closes about 2% of the error, or more).
TOLERANCE = 1e-2
STALL = 1e-4


@dataclass
class StepModel:
    """An optimizer's next step, per trainable parameter: ``limit`` (step size over the
    stability limit, a float or a tensor shaped like the parameter) and ``step`` (the step per
    unit of gradient, for the first-order progress)."""

    limit: list[float | torch.Tensor]
    step: list[float | torch.Tensor]
    rule: str
    adaptive: bool

    def uniform(self) -> float | None:
        """The one limit every parameter shares, when they do (plain SGD with one setting)."""
        first = self.limit[0] if self.limit else None
        if isinstance(first, float) and all(x == first for x in self.limit):
            return first
        return None


def step_model(optimizer, params: list[torch.Tensor]) -> StepModel | None:
    """The next step of ``optimizer`` on ``params`` (parameters it does not hold do not move);
    None for an optimizer whose rule is not known here, or before an adaptive one has seen a
    gradient it can scale by."""
    if optimizer is None:
        return None
    group_of = {id(p): g for g in getattr(optimizer, "param_groups", ()) for p in g["params"]}
    kind = _kind(optimizer)
    if kind is None:
        return None
    limits, steps, rules = [], [], set()
    for p in params:
        group = group_of.get(id(p))
        if group is None or (kind != "sgd" and p.grad is None):  # it does not move
            limits.append(0.0)
            steps.append(0.0)
            continue
        lr = float(group["lr"])
        state = optimizer.state.get(p, {})
        if kind == "sgd":
            limit, step, rule = _sgd(lr, group)
        else:
            scaled = _preconditioner(kind, p, state, group, optimizer)
            if scaled is None:
                return None
            inverse, limit_factor, step_factor, rule = scaled
            limit, step = inverse * (lr * limit_factor), inverse * (lr * step_factor)
        limits.append(limit)
        steps.append(step)
        rules.add(rule)
    return StepModel(limits, steps, "; ".join(sorted(rules)), kind != "sgd")


def _kind(optimizer) -> str | None:
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.RMSprop):
        return "rmsprop"
    if isinstance(optimizer, torch.optim.Adagrad):
        return "adagrad"
    return None


def _sgd(lr: float, group: dict) -> tuple[float, float, str]:
    b, t = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    if b == 0:
        return lr / 2, lr, "lr x lambda / 2"
    if group.get("nesterov"):
        limit = lr * (1 + 2 * b) / (2 * (1 + b))
        return limit, lr / (1 - b), f"lr x lambda x (1 + 2m) / (2 (1 + m)), Nesterov m = {b:g}"
    limit = lr * (1 - t) / (2 * (1 + b))
    return limit, lr * (1 - t) / (1 - b), f"lr x lambda x (1 - dampening) / (2 (1 + m)), m = {b:g}"


def _preconditioner(kind: str, p: torch.Tensor, state: dict, group: dict, optimizer):
    """``(1 / (sqrt(v) + eps), limit factor, step factor, rule)`` of the next adaptive step,
    with ``v`` as that step will have it (the current gradient included)."""
    g = p.grad
    if g.is_sparse:
        return None
    g2 = g.detach().float().square()
    eps = float(group["eps"])
    if kind == "adam":
        b1 = float(group["betas"][0])
        inverse = next_step(p, optimizer, group).inverse_scale
        rule = f"lr (1 - b1) x lambda of H / (sqrt(v) + eps) / (2 (1 + b1)), b1 = {b1:g}"
        return inverse, (1 - b1) / (2 * (1 + b1)), 1.0, rule
    if kind == "rmsprop":
        a, b = float(group["alpha"]), float(group.get("momentum", 0.0))
        v = (
            state["square_avg"].float() * a + g2 * (1 - a)
            if "square_avg" in state
            else g2 * (1 - a)
        )
        if group.get("centered") and "grad_avg" in state:
            mean = state["grad_avg"].float() * a + g.detach().float() * (1 - a)
            v = v - mean.square()
        rule = f"lr x lambda of H / (sqrt(v) + eps) / (2 (1 + m)), m = {b:g}"
        return 1 / (v.clamp_min(0).sqrt() + eps), 1 / (2 * (1 + b)), 1 / (1 - b), rule
    # adagrad: the sum of squared gradients, and a rate that decays with the step count
    total = state["sum"].float() + g2 if "sum" in state else g2
    t = float(state.get("step", 0))
    decay = 1 / (1 + t * float(group.get("lr_decay", 0.0)))
    rule = "lr x lambda of H / (sqrt(sum g^2) + eps) / 2"
    return 1 / (total.sqrt() + eps), decay / 2, decay, rule


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b))


def _scale(vectors: list[torch.Tensor], factors: list) -> list[torch.Tensor]:
    return [v * f if not isinstance(f, float) or f != 1.0 else v for v, f in zip(vectors, factors)]


def top_eigenvalue(
    hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    start: list[torch.Tensor],
    iterations: int = COLD_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> tuple[float, list[torch.Tensor], int, bool]:
    """The largest (most positive) eigenvalue of the symmetric operator ``hvp`` by power
    iteration from ``start``: ``(eigenvalue, eigenvector, products used, converged)``.

    Power iteration finds the eigenvalue of largest magnitude; when that one is negative (a
    saddle), a second run on ``hvp - that * I`` finds the most positive one."""
    value, vector, used, converged = _power(hvp, start, iterations, tolerance)
    if value < 0 and math.isfinite(value):
        shift = value

        def shifted(v: list[torch.Tensor]) -> list[torch.Tensor]:
            return [h - shift * x for h, x in zip(hvp(v), v)]

        top, vector, more, converged = _power(shifted, vector, iterations, tolerance)
        value, used = top + shift, used + more
    return value, vector, used, converged


def _power(hvp, start, iterations: int, tolerance: float):
    norm = _dot(start, start).sqrt()
    v = [x / norm for x in start]
    value = math.nan
    for k in range(1, iterations + 1):
        hv = hvp(v)
        both = torch.stack([_dot(v, hv), _dot(hv, hv)]).tolist()  # one sync per product
        last, value, size2 = value, both[0], both[1]
        if not math.isfinite(value) or size2 == 0.0:
            return value, v, k, math.isfinite(value)
        v = [h / math.sqrt(size2) for h in hv]
        residual = math.sqrt(max(size2 - value * value, 0.0))  # ||Hv - value v||, v of norm 1
        if residual <= tolerance * abs(value) or abs(value - last) <= STALL * abs(value):
            return value, v, k, True
    return value, v, iterations, False


class CurvatureProbe:
    """Measures :class:`~gradwatch.report.Curvature` on every ``every``-th logging step from a
    side-effect-free ``loss_fn`` (it runs the model's forward once more, on the same batch). The
    eigenvectors are kept between measurements as warm starts."""

    def __init__(self, every: int, loss_fn: Callable[[], torch.Tensor]) -> None:
        self.every = every
        self.loss_fn = loss_fn
        self.seen = 0  # logging steps offered (kept in GradWatch's state_dict)
        self._starts: dict[str, list[torch.Tensor]] = {}  # "plain"/"scaled" -> last eigenvector

    def next_due(self) -> bool:
        """Whether the next :meth:`due` says yes (asking changes nothing)."""
        return self.seen % self.every == 0

    def due(self) -> bool:
        self.seen += 1
        return (self.seen - 1) % self.every == 0

    def measure(self, model: nn.Module, optimizer) -> Curvature:
        try:
            return self._measure(model, optimizer)
        except RuntimeError as e:
            if "double backward" not in str(e):
                raise
            raise RuntimeError(
                f"{e}; the curvature loss is differentiated twice: have it call the model "
                "itself, not its torch.compile'd wrapper (they share the parameters)"
            ) from e

    def _measure(self, model: nn.Module, optimizer) -> Curvature:
        params = [p for p in model.parameters() if p.requires_grad]
        with _untouched(model, params), torch.enable_grad(), _twice_differentiable():
            loss = _checked(self.loss_fn())
            value = float(loss.detach())
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            used, grads = [params[i] for i in keep], [grads[i] for i in keep]
            if not used:  # a loss linear in every parameter: no curvature
                return Curvature(0.0, None, 0, True, value)
            hvp = _hessian_product(grads, used)
            top, iterations, converged = self._estimate("plain", hvp, used)
            steps = step_model(optimizer, used)
            if steps is None:
                return Curvature(top, None, iterations, converged, value)
            ratio = steps.uniform()
            if ratio is not None:
                ratio *= top
            else:  # the Hessian as the optimizer sees it: D^1/2 H D^1/2
                root = [
                    x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x) for x in steps.limit
                ]
                scaled = lambda v: _scale(hvp(_scale(v, root)), root)  # noqa: E731
                ratio, more, done = self._estimate("scaled", scaled, used)
                iterations, converged = iterations + more, converged and done
            g = [x.detach() for x in grads]
            progress = float(_dot(_scale(g, steps.step), g)) / abs(value) if value else None
        return Curvature(
            top, ratio, iterations, converged, value, progress, steps.rule, steps.adaptive
        )

    def _estimate(self, key: str, product, params: list[torch.Tensor]) -> tuple[float, int, bool]:
        """The top eigenvalue of ``product``, warm-started from (and keeping) the last vector."""
        start, iterations = self._start(key, params)
        value, self._starts[key], used, converged = top_eigenvalue(product, start, iterations)
        return value, used, converged

    def _start(self, key: str, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """The last eigenvector while the parameters still fit it, else a random vector; with
        the products the estimate may take from it."""
        last = self._starts.get(key)
        if last is not None and [x.shape for x in last] == [p.shape for p in params]:
            return last, ITERATIONS
        generator = torch.Generator(device=params[0].device).manual_seed(0)  # not the user's RNG
        start = [
            torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            for p in params
        ]
        return start, COLD_ITERATIONS


def _twice_differentiable():
    """Attention through the math kernel: the fused ones (flash, memory-efficient) have no
    double backward. The loss is the same up to rounding."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel([SDPBackend.MATH])


def _checked(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        what = type(loss).__name__
        if isinstance(loss, torch.Tensor):
            what += f" of shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}"
        raise TypeError(
            "curvature_loss must return the loss as a one-element tensor that requires grad "
            f"(computed with grad enabled), got {what}"
        )
    return loss


def _hessian_product(grads: list[torch.Tensor], params: list[torch.Tensor]):
    """``v -> H v``: the derivative of ``grads . v``, through the graph kept by ``grads``."""

    def product(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.autograd.grad(grads, params, v, retain_graph=True, allow_unused=True)
        return [h.detach() if h is not None else torch.zeros_like(x) for h, x in zip(out, v)]

    return product


class _untouched:
    """Around the extra forward: the random number streams (dropout) and the buffers (batch-norm
    running statistics) come back as they were, so the user's training is the same with the
    probe on or off."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor]) -> None:
        self.model = model
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        self.rng = torch.random.fork_rng(devices=devices)

    def __enter__(self) -> None:
        self.rng.__enter__()
        with torch.no_grad():
            self.saved = [(b, b.clone()) for b in self.model.buffers()]

    def __exit__(self, *exc: object) -> None:
        try:
            with torch.no_grad():
                for b, kept in self.saved:
                    b.copy_(kept)
        finally:
            self.rng.__exit__(*exc)
