"""``GradWatchTrainerCallback``: the Hugging Face ``Trainer`` adapter over the
:class:`~gradwatch.GradWatch` engine.

It maps Trainer events onto the engine and adds nothing else: no statistics, no rules of its own.

- ``on_train_begin``: attach to the model the Trainer trains (as Accelerate prepared it: DDP,
  FSDP); rank 0 writes TensorBoard events beside the Trainer's own; take the clipping over.
- ``on_step_begin``: the step is the one the Trainer will log, ``state.global_step + 1``.
- a forward hook on the model: each training micro-batch's ``outputs.loss``, for ``loss_spike``.
- ``on_pre_optimizer_step``: read ``.grad`` after accumulation, AMP unscaling and the all-reduce;
  then clip, as the Trainer would have.
- ``on_train_end``: detach, and give the Trainer its clipping back.

The Trainer clips the gradients (``max_grad_norm``, 1.0 by default) before any callback runs, so a
callback would see clipped gradients: on a clipped step every layer's norm reads low by the same
factor. The callback sets ``args.max_grad_norm`` to 0 while it trains (the Trainer then only
measures the norm it logs, unscaling AMP gradients for it) and clips with the same norm right
after measuring: the update is the one the Trainer would have made, its logged ``grad_norm`` is
still the pre-clip norm, and gradwatch reads the gradients the backward made. Where the Trainer's
clipping cannot be reproduced (DeepSpeed clips inside its engine; parameters on several device
meshes), it is left alone and the callback says once that it measures clipped gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Any

import torch

from ..exceptions import GradWatchWarning
from ..options import Options, takes_options
from ..watch import GradWatch
from .held import HeldEngine

log = logging.getLogger("gradwatch")

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "gradwatch.GradWatchTrainerCallback needs Hugging Face transformers: "
        "pip install 'gradwatch[hf]'"
    ) from error

# Before transformers 5 the Trainer measured the gradients' norm (unscaling AMP ones) only to clip
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


@takes_options
class GradWatchTrainerCallback(HeldEngine, TrainerCallback):
    """Watches a model while a Hugging Face ``Trainer`` trains it; one line::

        trainer = Trainer(model, args, train_dataset=data,
                          callbacks=[GradWatchTrainerCallback()])

    Only the main process writes, to ``<output_dir>/runs/gradwatch`` (``log_dir=`` to choose):
    point TensorBoard at ``<output_dir>/runs`` and the Trainer's own scalars sit beside it. Every
    process measures; under DDP and FSDP they combine their numbers (see the distributed docs).

    Args:
        log_dir: where rank 0 writes TensorBoard events (default ``<output_dir>/runs/gradwatch``).
        {options}

    Without ``every_n_steps`` the callback measures the steps the Trainer logs
    (``logging_steps``), labelled as the Trainer labels them, so its ``grad_norm`` and gradwatch's
    share a step axis. Gradients are read before clipping (see the module's docs).
    """

    def __init__(self, *, log_dir: str | os.PathLike | None = None, **options: Any) -> None:
        super().__init__()
        self._follow_trainer = "every_n_steps" not in options
        self.options = Options.from_arguments("GradWatchTrainerCallback", options)
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a str or os.PathLike, got {type(log_dir).__name__}")
        self.log_dir = log_dir
        self._engine: GradWatch | None = None
        self._state: dict[str, Any] | None = None  # history kept between train() calls
        self._clip: float | None = None  # the norm the callback clips to, taken from the args
        self._args: Any = None
        self._loss_hook: Any = None
        self._loss: torch.Tensor | None = None  # the step's micro-batch losses added, on device
        self._losses = 0  # how many; 0: they are shares of the step's loss (num_items_in_batch)
        self._share_factor = 1  # ... which the Trainer multiplies by the ranks (see _add_loss)

    # -- attach and detach -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model=None, **kwargs: Any):
        self._detach()  # also after a train() that raised: the Trainer has no event for that
        options = self.options
        every = getattr(state, "logging_steps", None)
        if self._follow_trainer and isinstance(every, int) and every > 0:
            if getattr(args, "logging_strategy", "steps") == "steps":  # a str enum
                options = dataclasses.replace(options, every_n_steps=every)
        log_dir = None
        if state.is_world_process_zero:
            log_dir = self.log_dir or os.path.join(args.output_dir, "runs", "gradwatch")
        engine = GradWatch(model, log_dir=log_dir, options=options)
        if self._state:
            engine.load_state_dict(self._state)
        self._engine = engine
        self._take_clipping(args, model)
        world = getattr(args, "world_size", 1)
        self._share_factor = world if getattr(args, "average_tokens_across_devices", False) else 1
        self._loss_hook = model.register_forward_hook(self._add_loss, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self._detach()

    def _detach(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self._args is not None:  # the Trainer clips again, as it was told to
            self._args.max_grad_norm = self._clip
            self._args = self._clip = None
        self._loss = None
        self._release()

    def _take_clipping(self, args: Any, model: Any) -> None:
        clip = getattr(args, "max_grad_norm", None)
        if not clip or clip <= 0:
            return
        if TRANSFORMERS_MAJOR < 5 or getattr(args, "deepspeed", None) or len(_meshes(model)) > 1:
            text = (
                "gradwatch: the Trainer clips these gradients where gradwatch cannot clip for it "
                "(DeepSpeed, parameters on several device meshes, or transformers < 5): gradient "
                "norms are read after clipping, low by the clipping factor on clipped steps"
            )
            try:
                warnings.warn(text, GradWatchWarning, stacklevel=2)
            except Warning:  # escalated by -W error: logged, never raised into train()
                log.warning(text)
            return
        self._args, self._clip = args, float(clip)
        args.max_grad_norm = 0.0

    # -- one optimizer step ----------------------------------------------------------------------

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._engine is not None:
            self._engine.go_to_step(state.global_step + 1)  # the Trainer logs it so

    def _add_loss(self, module: Any, args: Any, kwargs: dict, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if not (module.training and torch.is_grad_enabled() and isinstance(loss, torch.Tensor)):
            return
        if loss.numel() != 1:
            return
        loss = loss.detach().reshape(())
        # with num_items_in_batch each micro-batch's loss is its share of the step's: they add
        # (counted against every rank's tokens, the Trainer multiplies them by the ranks); else
        # each is its micro-batch's mean, and the step's loss is their mean
        if "num_items_in_batch" in kwargs and self._share_factor > 1:
            loss = loss * self._share_factor
        if self._loss is None:
            self._loss, self._losses = loss, 0
        else:
            self._loss = self._loss + loss
        if "num_items_in_batch" not in kwargs:
            self._losses += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        engine = self._engine
        if engine is None:
            return
        loss, self._loss = self._loss, None
        if loss is not None and self._losses > 1:
            loss = loss / self._losses
        try:
            engine.go_to_step(state.global_step + 1)
            engine.end_step(optimizer=kwargs.get("optimizer"), loss=loss)
        finally:  # the update is the Trainer's, whatever the measurement did
            if self._clip is not None:
                _clip_gradients(kwargs.get("model"), self._clip)

    # -- pickling --------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._engine is not None:  # hooks and writers stay with this process
            state["_state"] = self._engine.state_dict()
        state.update(_engine=None, _loss_hook=None, _loss=None, _args=None, _clip=None)
        return state


def _meshes(model: Any) -> set:
    """The device meshes the model's DTensor parameters live on."""
    return {id(p.device_mesh) for p in model.parameters() if hasattr(p, "device_mesh")}


def _clip_gradients(model: Any, max_norm: float) -> None:
    """Clip as Accelerate does for the Trainer: FSDP1's own method where the model has one,
    else torch's, over every parameter with a gradient (DTensors too)."""
    own = getattr(model, "clip_grad_norm_", None)
    if callable(own):
        own(max_norm)
        return
    params = [p for p in model.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
