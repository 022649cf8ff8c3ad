"""GradWatch's own arguments (the model, where to write, the optimizer and its scaler), checked
before the model is touched, and the writer a ``log_dir`` makes."""

from __future__ import annotations

import numbers
import os
from typing import Any

import torch
from torch import nn


def open_writer(log_dir: str | os.PathLike) -> Any:
    """A ``SummaryWriter`` on ``log_dir``; what the file system refuses, as a ValueError."""
    from torch.utils.tensorboard import SummaryWriter  # only when a writer is made

    path = os.fspath(log_dir)
    try:
        return SummaryWriter(log_dir=path)
    except OSError as e:
        raise ValueError(
            f"log_dir={path!r} cannot hold TensorBoard event files: "
            f"{e.strerror or e} ({type(e).__name__})"
        ) from e


def _check_log_dir(log_dir: str | os.PathLike) -> None:
    """Why ``log_dir`` cannot be a directory of event files, before anything is made."""
    path = os.fspath(log_dir)
    if "://" in str(path):  # a remote file system (s3://): TensorBoard's own to check
        return
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"log_dir={path!r} is a file; give a directory for the event files")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"log_dir={path!r} cannot be made: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"log_dir={path!r} is not writable: {existing!r} does not let you write")


def check_arguments(model, log_dir, writer, optimizer, scaler) -> None:
    """The arguments GradWatch alone takes (the shared ones are :class:`~gradwatch.Options`),
    checked before the model is touched; errors name the argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if log_dir is not None and writer is not None:
        raise ValueError("give log_dir or writer, not both (log_dir makes a new SummaryWriter)")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a str or os.PathLike, got {type(log_dir).__name__}")
    if log_dir is not None:
        _check_log_dir(log_dir)
    if writer is not None and not (hasattr(writer, "add_scalar") and hasattr(writer, "add_text")):
        raise TypeError(
            f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if scaler is not None and not hasattr(scaler, "get_scale"):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )


def check_curvature(every: int | None, loss_fn: Any, takes: str = "no arguments") -> None:
    """The curvature probe's two arguments go together: when to measure, and the loss to
    differentiate twice (``takes``: what the loss function is called with)."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"curvature_loss must be a function ({takes}) returning the loss, got "
            f"{type(loss_fn).__name__}"
        )
    if every is not None and loss_fn is None:
        raise ValueError(
            f"curvature_every={every} needs curvature_loss=: a function ({takes}) that computes "
            "the loss on the current batch again, without calling backward()"
        )
    if every is None and loss_fn is not None:
        raise ValueError(
            "curvature_loss is given but curvature_every is None (off): set curvature_every=K "
            "to measure the curvature on every K-th logging step"
        )


def check_logits_layer(model: nn.Module, name: Any) -> None:
    """``logits_layer`` names one of the model's modules (or is "auto", or None: off)."""
    if name is None or name == "auto":
        return
    names = [n for n, _ in model.named_modules() if n]
    if not isinstance(name, str) or name not in names:
        shown = ", ".join(repr(n) for n in names[-5:])
        raise ValueError(
            f'logits_layer must be a module name of the model, "auto" or None, got {name!r} '
            f"(the model's last modules: {shown})"
        )


def check_loss(loss: Any) -> None:
    """A step's loss is a number or a one-element tensor."""
    if loss is None:
        return
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be a number or a one-element tensor, got a tensor of shape "
                f"{tuple(loss.shape)}"
            )
        return
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):  # numpy's floats are Real
        raise TypeError(f"loss must be a number or a one-element tensor, got {type(loss).__name__}")
