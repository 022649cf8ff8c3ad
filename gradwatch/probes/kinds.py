"""The activations gradwatch knows: module classes and functional calls, their constants, and
which layers lay their outputs out channels first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

_MODULE_KINDS: list[tuple[type, str]] = [  # order matters: ReLU6 is a Hardtanh
    (nn.ReLU6, "relu6"),
    (nn.Hardtanh, "hardtanh"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Softsign, "softsign"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.ELU, "elu"),
    (nn.CELU, "celu"),
    (nn.SELU, "selu"),
    (nn.Softplus, "softplus"),
]


_MODULE_PARAMS = ("negative_slope", "alpha", "beta", "min_val", "max_val")

FUNCTION_KINDS: dict[Callable, str] = {}
for _kind, _fns in {
    "sigmoid": ("sigmoid", "sigmoid_"),
    "tanh": ("tanh", "tanh_"),
    "relu": ("relu", "relu_"),
}.items():
    for _fname in _fns:
        for _owner in (torch, torch.Tensor):
            if hasattr(_owner, _fname):
                FUNCTION_KINDS[getattr(_owner, _fname)] = _kind
FUNCTION_KINDS.update(
    {
        torch.special.expit: "sigmoid",
        F.relu: "relu",
        F.relu6: "relu6",
        F.leaky_relu: "leaky_relu",
        F.gelu: "gelu",
        F.silu: "silu",
        F.elu: "elu",
        F.celu: "celu",
        F.selu: "selu",
        F.softplus: "softplus",
        F.hardtanh: "hardtanh",
        F.softsign: "softsign",
        F.hardsigmoid: "hardsigmoid",
    }
)
# The name each function's entries take (``torch.relu_`` -> "relu"); looked up, not computed from
# ``__name__``, which traced code cannot read.
FUNCTION_NAMES: dict[Callable, str] = {
    f: {"special_expit": "sigmoid"}.get(n, n)
    for f in FUNCTION_KINDS
    for n in [getattr(f, "__name__", FUNCTION_KINDS[f]).rstrip("_")]
}
# Positional parameters after the input, as in torch.nn.functional's signatures.
_FUNCTION_PARAMS = {
    "leaky_relu": ("negative_slope",),
    "elu": ("alpha",),
    "celu": ("alpha",),
    "softplus": ("beta",),
    "hardtanh": ("min_val", "max_val"),
}
# Outputs of these are laid out (N, C, ...): a following activation's units are channels.
CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


def activation_kind(module: nn.Module) -> str | None:
    """The activation kind of a module, or None when it is not an activation."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    # Foreign activation classes (e.g. Hugging Face's GELUActivation): by name, parameter-free only.
    name = type(module).__name__.lower()
    if any(True for _ in module.parameters(recurse=False)):
        return None
    if "gelu" in name:
        return "gelu"
    if "silu" in name or "swish" in name:
        return "silu"
    return None


def param_values(module: nn.Module) -> dict[str, float]:
    return {
        k: float(v)
        for k in _MODULE_PARAMS
        if isinstance(v := getattr(module, k, None), (int, float))
    }


def _transposed_linear(module: nn.Module, w: torch.Tensor) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's attention and MLP layers): a Linear whose weight is
    stored ``(in, out)``."""
    return (
        type(module).__name__ == "Conv1D"
        and w.dim() == 2
        and getattr(module, "nf", 0) == w.shape[1]
    )


def weight_fan_in(module: nn.Module) -> int | None:
    """fan_in of a Linear (Hugging Face's ``Conv1D`` too) or (non-transposed) convolution
    weight, None for other layers."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    if _transposed_linear(module, w):
        return w.shape[0]
    if isinstance(module, nn.Linear) or (
        isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
    ):
        return w[0].numel()
    return None


def weight_fan_out(module: nn.Module) -> int | None:
    """How many outputs each input of a Linear or ungrouped convolution feeds (out_features, or
    out_channels x kernel size): the n of the backward variance recurrence. None otherwise."""
    if weight_fan_in(module) is None or getattr(module, "groups", 1) != 1:
        return None
    w = module.weight
    if _transposed_linear(module, w):
        return w.shape[1]
    return w.numel() // w.shape[1]


def float_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):  # the common case, and no pytree walk for dynamo to trace
        return [obj] if obj.is_floating_point() else []
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def batch_size(args: tuple, kwargs: dict) -> int:
    """The leading size of a forward's first tensor argument (token ids count too): the batch."""
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None:
        first = next(
            (t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None
        )
    return first.shape[0] if first is not None and first.dim() else 1


def shared_output(t: torch.Tensor) -> bool:
    """An output with batch size 1 (in a forward of several samples): one tensor every sample
    uses (a position embedding's), whose gradient adds up over samples as a weight's does."""
    return t.dim() >= 2 and t.size(0) == 1  # size(0): no torch.Size made, every layer asks


def fn_params(kind: str, args: tuple, kwargs: dict) -> dict[str, float]:
    """The constants of a functional activation call (``F.leaky_relu(x, 0.2)``)."""
    params = dict(zip(_FUNCTION_PARAMS.get(kind, ()), args[1:]))
    params.update({k: v for k, v in kwargs.items() if k in _MODULE_PARAMS})
    return {k: float(v) for k, v in params.items() if isinstance(v, (int, float))}
