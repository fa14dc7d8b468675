"""Which networks private training can use, checked with Opacus's validator."""

from __future__ import annotations

from torch import nn

from .errors import PrivateModelError

__all__ = ["check_private_model", "fix_private_model"]

_FIX = ("use a model without BatchNorm, e.g. convnet (instance norm), convnet-gn, "
        "convnet-ln or convnet-nn")


def _problems(model: nn.Module) -> list[str]:
    from opacus.validators import ModuleValidator

    out: list[str] = []
    for error in ModuleValidator.validate(model, strict=False):
        text = f"{type(error).__name__}: {str(error).split('. ')[0]}"
        if text not in out:
            out.append(text)
    norms = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        out.append(f"BatchNorm modules: {', '.join(norms)} (their batch statistics mix the "
                   "examples of a batch, so no per-example bound holds)")
    for name, module in model.named_modules():
        if getattr(module, "inplace", False):
            out.append(f"module {name!r} ({type(module).__name__}) works in place, which "
                       "breaks the hooks that record per-sample gradients; build it with "
                       "inplace=False")
    return out


def check_private_model(model: nn.Module, *, spec: str, what: str) -> None:
    """Raise `PrivateModelError` unless Opacus can train `model` privately.

    Args:
        model: the built network.
        spec: its model spec, quoted in the message.
        what: the part of the run that asked (e.g. "dp-dm", "DP-SGD baseline").

    Raises:
        PrivateModelError: BatchNorm (its statistics mix the examples of a batch, so no
            per-example bound holds), modules without per-sample gradient support, or
            in-place activations; the message lists each module problem and the fix.
    """
    problems = _problems(model)
    if problems:
        raise PrivateModelError(
            [f"{what}: model {spec!r} cannot be trained with differential privacy: {p}"
             for p in problems] + [f"{what}: {_FIX}; for the DP-SGD baseline, "
                                   "dp_sgd.fix_model: true lets Opacus replace BatchNorm by "
                                   "GroupNorm"],
            source="private model")


def fix_private_model(model: nn.Module, *, spec: str, what: str) -> nn.Module:
    """Opacus's `ModuleValidator.fix` (BatchNorm -> GroupNorm, ...), then the full check."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    check_private_model(fixed, spec=spec, what=what)
    return fixed
