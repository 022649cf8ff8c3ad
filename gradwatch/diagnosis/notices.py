"""What gradwatch tells the user about its own measurement of a step (not about the model): the
layers it could not measure, and a step it could see little of. Pure functions of the report;
the engine emits the messages, once each."""

from __future__ import annotations

import weakref

from torch import nn

from ..report import Report


def leave_out(report: Report, failed: dict[str, Exception]) -> None:
    """The layers whose hooks failed on this step: their statistics from hooks (perhaps partial)
    are left out, and ``report.unmeasured`` names them with the error, input side first."""
    position = {name: i for i, name in enumerate(report.layers)}
    for name in sorted(failed, key=lambda name: position.get(name, -1)):
        error = failed[name]
        report.unmeasured[name] = f"{type(error).__name__}: {error}"
        s = report.layers.get(name)
        if s is not None:
            s.signal = s.signal_norm = s.saturation = s.dead_units = s.active_units = s.units = None
            s.samples_per_unit = None


def unmeasured_message(report: Report, names: list[str]) -> str:
    """One warning for the layers ``names`` of ``report.unmeasured``."""
    shown = ", ".join(f"`{name or '(root)'}`" for name in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return (
        f"gradwatch could not measure {shown}{more} on step {report.step} "
        f"({report.unmeasured[names[0]]}); the statistics from their hooks are left out of the "
        "report (Report.unmeasured says why), the other layers are measured; training continues"
    )


def coverage(step: int, forwards: int, any_grad: bool, trainable: bool) -> list[tuple[str, str]]:
    """(key, message) for what the step lacked: trainable parameters, gradients, a forward."""
    out = []
    if not trainable:
        out.append(
            (
                "no-params",
                "gradwatch: the model has no trainable parameters; only activations are watched",
            )
        )
    elif not any_grad:
        out.append(
            (
                "no-grad",
                f"gradwatch step {step}: no parameter has a gradient; "
                "call gw.step() after loss.backward() and before optimizer.zero_grad()",
            )
        )
    if forwards == 0:
        out.append(
            (
                "no-forward",
                f"gradwatch step {step}: no training forward pass "
                "of the model was seen (model in eval mode, run under no_grad, called "
                "through .forward(), or compiled before gradwatch attached?); backward "
                "signal and activation statistics are missing",
            )
        )
    return out


class Repeats:
    """Tells a ``step()`` call that comes with the very gradients of the previous call: no
    backward ran in between (it would have written into them, or made new ones). The tensor is
    held weakly: a new gradient may reuse a freed one's ``id``."""

    def __init__(self) -> None:
        self.grad: weakref.ref | None = None
        self.version = -1

    def same_gradients(self, model: nn.Module) -> bool:
        """Looks at the first trainable parameter only: a check on every step, cheap."""
        grad = next((p.grad for p in model.parameters() if p.requires_grad), None)
        same = (
            grad is not None
            and self.grad is not None
            and self.grad() is grad
            and grad._version == self.version
        )
        self.grad = weakref.ref(grad) if grad is not None else None
        self.version = grad._version if grad is not None else -1
        return same


def step_twice(step: int) -> str:
    return (
        f"gradwatch: gw.step() was called for step {step} with the same gradients as the call "
        "before it, with no backward in between; call it once per optimizer step, after "
        "loss.backward() (each call counts a step, so the step numbers now run ahead)"
    )
