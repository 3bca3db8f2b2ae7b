"""Clamps whose gradient also reaches the entries they clamp (a one-sided straight-through estimator).

The true gradient of a clamped entry is zero, so gradient descent can never bring it back inside
its range once it is out: a switched-off ReLU unit the target has on stays off, a HOG bin
truncated at 0.2 that the target has lower stays high. ``reviving_clamp`` has the values of
``clamp`` and lets ``slope`` of the gradient through to clamped entries, in the direction that
brings them back inside only. Used by the engine for codes that end in a clamp (``match``'s
``rectifier_slope``) and by HOG for its 0.2 truncation (``truncation_slope``).

Inside a network, the gradient of ReLU6 can be that of a smoothed ReLU6
(``smoothed_relu6_grad``): while the calling thread is inside ``rectifier_smoothing(width)`` (the
engine's steps), a network that supports it (EfficientNet-Lite0) takes its input gradient with
each inner ReLU6's gradient smoothed, and with its residual blocks' branches passing ``branch`` of
their gradient back while their skip connections pass all of theirs. Its values are always the
network's own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, autograd

_smoothing = threading.local()


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


def smoothed_relu6_weight(pre: Tensor, width: float) -> Tensor:
    """The derivative of ReLU6 with its corners rounded off by parabolas ``width`` (0 < ``width`` ≤ 3)
    wide on either side, at ``pre``: min(pre + width, 6 + width − pre) / (2 width), clamped to
    [0, 1] (1 inside (``width``, 6 − ``width``), falling linearly to 0 at −``width`` and
    6 + ``width``). Units just off, or just saturated, still pass part of the gradient, and the
    gradient changes gradually as units switch instead of jumping."""
    return torch.minimum(pre, 6 - pre).add_(width).mul_(0.5 / width).clamp_(0, 1)


#: ``(grad, pre, width, in_place) → the gradient of pre``: the smoothed ReLU6's backward, written
#: into ``grad`` itself when ``in_place`` (the caller owns it), else into a new tensor.
Backward = Callable[[Tensor, Tensor, float, bool], Tensor]


def smoothed_relu6_grad(grad: Tensor, pre: Tensor, width: float, in_place: bool = False) -> Tensor:
    """The smoothed ReLU6's gradient of ``pre`` in torch (the CPU engine's kernel falls back to it)."""
    weight = smoothed_relu6_weight(pre, width)
    return grad.mul_(weight) if in_place else weight.mul_(grad)


MAX_SMOOTHING = 3.0


def check_smoothing(value: object) -> float:
    """``value`` as a float if it is a number from 0 to ``MAX_SMOOTHING``, else a ``ValueError``
    naming ``rectifier_smoothing``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SMOOTHING:
        raise ValueError(f"rectifier_smoothing must be a number from 0 to {MAX_SMOOTHING:g}, got {value!r}")
    return float(value)


@contextmanager
def rectifier_smoothing(width: float, backward: Backward | None = None, branch: float = 1.0) -> Iterator[None]:
    """While inside, in this thread, networks that support it take their input gradient with each
    inner ReLU6's gradient smoothed by this ``width`` (0: ReLU6's own, and nothing else changed),
    computed by ``backward`` (default: torch's formulation; the engine passes its one-pass CPU
    kernel), and with ``branch`` (1: all) of the gradient passed back through each residual
    block's convolutions, the skip connection passing all of its own."""
    check_smoothing(width)
    check_slope("branch_gradient", branch)
    before = getattr(_smoothing, "state", None)
    _smoothing.state = (width, backward or smoothed_relu6_grad, branch) if width > 0 else None
    try:
        yield
    finally:
        _smoothing.state = before


def current_smoothing() -> tuple[float, Backward, float] | None:
    """The width (> 0), backward and branch share of the innermost ``rectifier_smoothing`` this
    thread is in, or ``None`` (outside any, or inside one of width 0)."""
    state: tuple[float, Backward, float] | None = getattr(_smoothing, "state", None)
    return state
