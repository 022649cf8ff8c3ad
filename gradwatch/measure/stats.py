"""Pure tensor maths: what each probe reduces a tensor to.

Nothing here knows about modules, hooks or steps; every function takes tensors and returns tensors
(or plain numbers), so each one is tested against a brute-force reference on hand-set values.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..report.records import BOUNDED_KINDS, RELU_LIKE_KINDS

ACTIVATION_KINDS = BOUNDED_KINDS | RELU_LIKE_KINDS

# Kinds whose local derivative cannot be recovered from the output alone.
NEEDS_INPUT = frozenset({"gelu", "silu"})

_SELU_SCALE = 1.0507009873554805
_SELU_ALPHA = 1.6732632423543772


def flat_mask(
    kind: str,
    output: torch.Tensor,
    input: torch.Tensor | None = None,
    eps: float = 1e-2,
    **params: float,
) -> torch.Tensor | None:
    """Elements where the activation's local derivative is below ``eps`` times its largest.

    Args:
        kind: one of :data:`ACTIVATION_KINDS`.
        output: the activation's output.
        input: the activation's input; needed for ``gelu`` and ``silu``, whose derivative is not a
            function of the output. ``None`` there (e.g. an in-place call) gives ``None``.
        eps: relative threshold on the derivative.
        params: the activation's own constants (``negative_slope``, ``alpha``, ``beta``,
            ``min_val``, ``max_val``), defaults as in ``torch.nn``.

    Returns:
        A tensor shaped like ``output``, true (or 1.0) where flat, or ``None`` when it cannot be
        computed. NaN elements are not flat.
    """
    # The common kinds compare into a temporary of the output's dtype (1.0 / 0.0): a comparison
    # that allocates a bool tensor costs 4x more on CPU.
    y = output.detach()
    if not y.is_floating_point():
        return None
    if kind == "sigmoid":  # sigma' = y (1 - y) = y - y^2, largest 1/4
        return torch.addcmul(y, y, y, value=-1).lt_(eps * 0.25)
    if kind == "tanh":  # tanh' = 1 - y^2 < eps, largest 1
        return y.square().gt_(1 - eps)
    if kind == "softsign":  # softsign' = (1 - |y|)^2, largest 1
        return y.abs().sub_(1).square_().lt_(eps)
    if kind == "hardtanh":
        lo, hi = params.get("min_val", -1.0), params.get("max_val", 1.0)
        return (y <= lo) | (y >= hi)
    if kind == "hardsigmoid":
        return (y <= 0) | (y >= 1)
    if kind == "relu":  # one pass: a fresh (uninitialised) temporary takes the comparison
        return torch.le(y, 0, out=torch.empty_like(y))
    if kind == "relu6":
        return (y <= 0) | (y >= 6)
    if kind == "leaky_relu":
        slope = abs(params.get("negative_slope", 0.01))
        return (y < 0) if slope < eps else torch.zeros_like(y, dtype=torch.bool)
    if kind == "elu":  # for x < 0: elu' = y + alpha
        alpha = params.get("alpha", 1.0)
        return (y < 0) & (y + alpha < eps * max(1.0, alpha))
    if kind == "celu":  # for x < 0: celu' = y / alpha + 1
        alpha = params.get("alpha", 1.0)
        return (y < 0) & (y / alpha + 1 < eps)
    if kind == "selu":  # for x < 0: selu' = y + scale * alpha
        scale_alpha = _SELU_SCALE * _SELU_ALPHA
        return (y < 0) & (y + scale_alpha < eps * scale_alpha)
    if kind == "softplus":  # softplus' = sigma(beta x) = 1 - exp(-beta y) < eps
        beta = params.get("beta", 1.0)  # <=> y < -log(1 - eps) / beta
        return torch.sub(-math.log1p(-eps) / beta, y).gt_(0)
    if kind in NEEDS_INPUT:
        if input is None or not input.is_floating_point():
            return None
        peak = 1.129 if kind == "gelu" else 1.100  # the derivative's largest value
        return _input_derivative(kind, input.detach()).abs_().lt_(eps * peak)
    raise ValueError(f"kind must be one of {sorted(ACTIVATION_KINDS)}, got {kind!r}")


def unit_axis(ndim: int, channels_first: bool) -> int:
    """The axis that indexes units: channels (dim 1) after a convolution, else the last dim."""
    if ndim <= 2:
        return ndim - 1 if ndim else 0
    return 1 if channels_first else ndim - 1


def one_per_unit(shape: tuple[int, ...], axis: int) -> bool:
    """A tensor of three or more dims with one value per sample and unit, every other dim 1: the
    shape of a gate that is broadcast over a feature map (``(N, C, 1, 1)`` in a
    squeeze-and-excitation block), not of a feature map itself."""
    if len(shape) < 3:
        return False
    axis %= len(shape)
    return all(n == 1 for i, n in enumerate(shape) if i not in (0, axis))


def flat_counts(flat: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per unit (index along ``axis``), how many of its elements are flat, in one reduction.

    A unit is dead for a batch when its count equals the elements it had (``flat.numel()`` over
    the number of units); the total over units is the number of flat elements. Counts are fp32,
    exact up to 2**24 elements per unit and step.
    """
    if flat.dim() <= 1:  # sum(dim=()) would reduce everything
        counts = flat.reshape(-1).to(torch.float32)
        return counts if out is None else out.copy_(counts)
    if flat.dim() >= 3 and axis == 1 and flat.device.type == "cpu" and flat.is_contiguous():
        # (N, C, spatial...): on CPU, summing the contiguous spatial block first and then the
        # batch is up to twice as fast as one reduction over the non-adjacent dims (0, 2, ...)
        per_sample = flat.view(flat.shape[0], flat.shape[1], -1).sum(2, dtype=torch.float32)
        return per_sample.sum(0) if out is None else torch.sum(per_sample, 0, out=out)
    # traced code: dynamo warns on a cached function and traces through it anyway
    dims = (_other_dims.__wrapped__ if torch.compiler.is_compiling() else _other_dims)(
        flat.dim(), axis
    )
    if out is None:
        return flat.sum(dim=dims, dtype=torch.float32)
    return torch.sum(flat, dim=dims, dtype=torch.float32, out=out)


@functools.lru_cache(maxsize=64)
def _other_dims(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != axis)


def segment_totals(
    counts: torch.Tensor, rows: torch.Tensor, owner: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per owner, the flat elements, the dead units and the units never flat, from concatenated
    per-unit flat counts.

    Args:
        counts: per-unit flat counts of several layers, concatenated.
        rows: per unit, how many elements it had (its count when it is flat everywhere).
        owner: per unit, the index (``< n``) of the layer it belongs to.
        n: number of layers.

    Returns:
        ``(flat, dead, active)``: float32 tensors of ``n`` values each: flat elements, dead
        units (flat for every sample), and units active for every sample, of each layer.
    """
    zeros = functools.partial(torch.zeros, n, dtype=torch.float32, device=counts.device)
    flat = zeros().index_add_(0, owner, counts.to(torch.float32))  # no copy when already fp32
    dead = zeros().index_add_(0, owner, (counts == rows).to(torch.float32))
    active = zeros().index_add_(0, owner, (counts == 0).to(torch.float32))
    return flat, dead, active


def norm(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm in fp32 without an fp32 copy of a half-precision tensor (into ``out`` if given);
    a float64 tensor is reduced in float64, then rounded."""
    d = t.detach()
    if d.dtype == torch.float64:  # vector_norm refuses to narrow to an fp32 result
        value = torch.linalg.vector_norm(d).float()
        return value if out is None else out.copy_(value)
    return torch.linalg.vector_norm(d, dtype=torch.float32, out=out)


def signal_sumsq(grad: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A gradient's squared norm, the norm taken as :func:`norm` takes it and squared in ``dtype``
    (fp64 by default: a vanishing norm of 1e-20 squares below fp32's range), for traced backward
    hooks, which may only add in place into a tensor they were given."""
    return norm(grad).to(dtype).square()


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms in fp32, in order, as one 1-D tensor on the first tensor's device:
    fused kernels (``_foreach_norm``) per device, sparse tensors by their values."""
    if not tensors:
        return torch.zeros(0)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in by_device.values():
        dense = [i for i in idx if not tensors[i].is_sparse and tensors[i].dtype != torch.float64]
        if dense:
            fused = torch._foreach_norm([tensors[i] for i in dense], 2, dtype=torch.float32)
            for i, n in zip(dense, fused):
                out[i] = n
        for i in idx:
            if out[i] is None:  # sparse, or float64 (which the fused fp32 kernel refuses)
                t = tensors[i]
                out[i] = norm(t.coalesce().values() if t.is_sparse else t)
    device = tensors[0].device
    return torch.stack([n if n.device == device else n.to(device) for n in out])


def norm_min_max(t: torch.Tensor) -> torch.Tensor:
    """``[L2 norm, min, max]`` of a non-empty floating tensor in fp32, in two passes over it; a
    NaN anywhere makes all three NaN."""
    d = t.detach()
    lo, hi = torch.aminmax(d)
    return torch.stack([norm(d), lo.float(), hi.float()])


def sumsq_absmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of squares and the largest ``|value|`` of several tensors, from their
    :func:`norm_min_max` rows (shape ``(k, 3)``)."""
    return rows[:, 0].square().sum(), rows[:, 1:].abs().amax()


def combine_norms(norms: list[float]) -> float:
    """L2 norm of a concatenation, from the L2 norms of its pieces (no overflow in squaring)."""
    return math.hypot(*norms)


def learning_rate(optimizer) -> float | None:
    """The largest learning rate over an optimizer's parameter groups (None when there is no
    optimizer or no number to read: a rate held in a device tensor would cost a sync)."""
    rates = []
    for group in getattr(optimizer, "param_groups", ()):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor) and lr.device.type == "cpu" and lr.numel() == 1:
            lr = lr.item()
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr):
            rates.append(float(lr))
    return max(rates) if rates else None


def time_sumsq(
    grad: torch.Tensor, axis: int, batch_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Per time step, the sum of squares of a sequence's gradient, in fp64: ``(T,)``.

    ``axis`` is the time axis of a padded sequence; a packed one (``batch_sizes`` given, as in
    ``PackedSequence``) has its rows grouped by time step. Each time step is scaled by its largest
    value before squaring: a gradient that vanished through time to 1e-25 squares below fp32's
    range, and an fp64 copy of a long sequence would be large.
    """
    d = grad.detach()
    if batch_sizes is not None:
        rows = d.reshape(d.shape[0], -1)
    else:
        rows = d.movedim(axis, 0).reshape(d.shape[axis], -1)
    scale = rows.abs().amax(1, keepdim=True).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    sums = (rows / scale).square().sum(1, dtype=torch.float64) * scale.squeeze(1).double().square()
    if batch_sizes is None:
        return sums
    steps = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes.cpu())
    out = torch.zeros(len(batch_sizes), dtype=torch.float64, device=sums.device)
    return out.index_add_(0, steps.to(sums.device), sums)


def recurrent_facts(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the theory reads off a recurrent module's weights: the largest singular value of
    ``weight_hh`` over its layers (a vanilla RNN: each step multiplies the signal by at most that
    times the activation's derivative), and the mean bias of the gate that keeps the state (an
    LSTM's forget gate, a GRU's update gate: both are rows ``H:2H`` of the biases). 0-d tensors,
    on the weights' device: whoever reads them on the host does (not the training thread)."""
    if not isinstance(module, nn.RNNBase):
        return None, None
    with torch.no_grad():
        hh = [w for n, w in module.named_parameters() if n.startswith("weight_hh")]
        if module.mode in ("RNN_TANH", "RNN_RELU"):
            if not hh or hh[0].shape[0] > 2048:  # an SVD of a wider matrix costs too much
                return None, None
            sigma = torch.stack([torch.linalg.matrix_norm(w.float(), ord=2) for w in hh]).max()
            return sigma, None
        h = module.hidden_size
        value = None  # bias_ih and bias_hh add: the mean of each, over units, layers, directions
        for prefix in ("bias_ih", "bias_hh"):
            gates = [
                b[h : 2 * h].float() for n, b in module.named_parameters() if n.startswith(prefix)
            ]
            if gates:
                mean = torch.stack(gates).mean()
                value = mean if value is None else value + mean
        return None, value if value is not None else torch.zeros(())


# Activations whose derivative is a constant where it is not flat (and 0 where it is): their
# E[phi'(z)^2] is that constant squared times the share of values not flat, which the
# saturation count already has; no pass of its own.
PIECEWISE_DPHI2 = {"relu": 1.0, "relu6": 1.0, "hardtanh": 1.0, "hardsigmoid": 1 / 36}


def derivative(
    kind: str, output: torch.Tensor, input: torch.Tensor | None = None, **params: float
) -> torch.Tensor | None:
    """The activation's local derivative phi'(z) at every element, from its output (or, for
    ``gelu`` and ``silu``, its input); None when it cannot be computed. Same kinds and constants
    as :func:`flat_mask`."""
    y = output.detach().float()
    if kind == "sigmoid":
        return y * (1 - y)
    if kind == "tanh":
        return 1 - y * y
    if kind == "softsign":
        return (1 - y.abs()).square()
    if kind == "hardtanh":
        lo, hi = params.get("min_val", -1.0), params.get("max_val", 1.0)
        return ((y > lo) & (y < hi)).float()
    if kind == "hardsigmoid":
        return ((y > 0) & (y < 1)).float() / 6
    if kind == "relu":
        return (y > 0).float()
    if kind == "relu6":
        return ((y > 0) & (y < 6)).float()
    if kind == "leaky_relu":
        return torch.where(y > 0, 1.0, params.get("negative_slope", 0.01))
    if kind == "elu":
        return torch.where(y > 0, 1.0, y + params.get("alpha", 1.0))
    if kind == "celu":
        return torch.where(y > 0, 1.0, y / params.get("alpha", 1.0) + 1)
    if kind == "selu":
        return torch.where(y > 0, _SELU_SCALE, y + _SELU_SCALE * _SELU_ALPHA)
    if kind == "softplus":
        return 1 - torch.exp(-params.get("beta", 1.0) * y)
    if kind in NEEDS_INPUT:
        if input is None or not input.is_floating_point():
            return None
        return _input_derivative(kind, input.detach().float())
    return None


def _input_derivative(kind: str, x: torch.Tensor) -> torch.Tensor:
    """gelu' = Phi(x) + x phi(x) (the exact, erf form); silu' = s (1 + x (1 - s)) with
    s = sigmoid(x). Torch's own backward kernel with a unit gradient computes either in one pass
    (internally in fp32 for half precision): written out, the formula took about ten kernels, 4x
    the time on CPU, and in bf16 it misjudged the flat elements of one in a thousand."""
    # On CPU the kernel is faster with a contiguous gradient (and a 0-dim one fails in oneDNN);
    # elsewhere a broadcast 0-dim one saves a pass over memory.
    one = torch.ones_like(x) if x.device.type == "cpu" else x.new_ones(()).expand_as(x)
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(one, x)
    return torch.ops.aten.silu_backward(one, x)


def square_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of squares in fp64, for adding up over calls and ranks."""
    return values.double().square().sum()
