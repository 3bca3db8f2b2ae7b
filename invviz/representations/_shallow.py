"""Pieces shared by the hand-designed representations (HOG, dense SIFT)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is a positive ``int``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def gray_255(images: Tensor) -> Tensor:
    """Luminance in the paper's units, ``255 * gray - 128``.

    ``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, H, W)``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    gray = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    return gray * 255 - 128


def safe_sqrt(x: Tensor, below: float = 0.0) -> Tensor:
    """``sqrt(x)``, but exactly 0 with a zero gradient where ``x <= below``.

    A plain ``sqrt`` has an infinite gradient at 0, which flat image regions hit all the time.
    """
    keep = x > below
    return torch.where(keep, torch.where(keep, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))
