"""What gradwatch tells the user about its own measurement of a step (not about the model): the
layers it could not measure, and a step it could see little of. Pure functions of the report;
the engine emits the messages, once each."""

from __future__ import annotations

from torch import nn

from .report import Report


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


def coverage(
    step: int, forwards: int, any_grad: bool, params: list[nn.Parameter]
) -> list[tuple[str, str]]:
    """(key, message) for what the step lacked: trainable parameters, gradients, a forward."""
    out = []
    if not any(p.requires_grad for p in params):
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
