"""Clamps whose gradient also reaches the entries they clamp (a one-sided straight-through estimator).

The true gradient of a clamped entry is zero, so gradient descent can never bring it back inside
its range once it is out: a switched-off ReLU unit the target has on stays off, a HOG bin
truncated at 0.2 that the target has lower stays high. ``reviving_clamp`` has the values of
``clamp`` and lets ``slope`` of the gradient through to clamped entries, in the direction that
brings them back inside only. Used by the engine for codes that end in a clamp (``match``'s
``rectifier_slope``) and by HOG for its 0.2 truncation (``truncation_slope``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, autograd


def check_slope(name: str, value: object) -> float:
    """``value`` as a float if it is a number from 0 to 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number from 0 to 1, got {value!r}")
    return float(value)


class RevivingClamp(autograd.Function):
    """``pre.clamp(low, high)`` whose gradient also reaches clamped entries, scaled by ``slope``, in
    the direction that would bring them back inside."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, low: float, high: float, slope: float) -> Tensor:
        ctx.save_for_backward(pre)
        ctx.bounds, ctx.slope = (low, high), slope
        return pre.clamp(low, high)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (pre,) = ctx.saved_tensors
        low, high = ctx.bounds
        inside = (pre > low) & (pre < high)
        # A descent step moves ``pre`` by −grad: up where grad < 0, down where grad > 0.
        reviving = ((pre <= low) & (grad < 0)) | ((pre >= high) & (grad > 0))
        weight = inside.to(grad.dtype).add_(reviving.to(grad.dtype), alpha=ctx.slope)
        return grad * weight, None, None, None


def reviving_clamp(pre: Tensor, low: float, high: float, slope: float) -> Tensor:
    """``pre.clamp(low, high)``; with ``slope`` > 0, ``RevivingClamp``'s gradient (0: the true one)."""
    if slope == 0:
        return pre.clamp(low, high)
    result: Tensor = RevivingClamp.apply(pre, low, high, slope)
    return result
