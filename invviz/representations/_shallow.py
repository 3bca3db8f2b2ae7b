"""Pieces shared by the hand-designed representations (HOG, dense SIFT)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._base import Representation

#: Defaults for inverting HOG, HOGb and dense SIFT, from sweeps on 256² scikit-image photos (error
#: of the 8-bit result, measured with VLFeat: ``benchmarks/bench_table1.py``). These codes are
#: normalized per cell, so nearly blind to contrast: a CNN-sized TV weight buys no feature error and
#: only flattens the image, until 8-bit rounding flips gradient orientations (HOG on chelsea: 0.030
#: → 0.001 took the error from 0.153 to 0.103). Adam at 0.02 beat 0.05 and 0.1 on every photo tried
#: (200 steps). With 400 steps and HOG's truncation slope, 0.01 beat 0.02 where it matters, on the
#: hardest photos (rocket, retina, astronaut): HOG mean 0.128 → 0.124 (rocket 0.171 → 0.163),
#: HOGb 0.061 → 0.057 (rocket 0.121 → 0.093 and 0.095 with another seed, under the 0.10 bound;
#: retina 0.147 → 0.141), dense SIFT 0.068 → 0.063 (retina 0.200 → 0.169), while the easiest
#: photos lost up to 0.003 (HOGb hubble 0.024 → 0.027). 0.007 was no better for HOG or HOGb.
TV_WEIGHT = 0.001
ADAM_LR = 0.01
#: Default steps. Per-cell normalization makes flat regions' faint gradients count fully, and those
#: converge slowly: on the 8 photos 400 steps rather than 200 took HOG from 0.154 to 0.140 mean
#: error, and dense SIFT from 0.071 to 0.068 (every photo lower; rocket 0.1003 → 0.0905, the one
#: above the 0.10 bound at 200), at twice the time (6.6 → 12 s per 256² inversion, one thread).
SHALLOW_ITERS = 400
#: Rounds of 8-bit polishing per optimization step (``engine.polish``; dense SIFT overrides it).
POLISH_PER_STEP = 2.5


class ShallowRepresentation(Representation):
    """Base of the hand-designed codes: one layer, any image size, luminance only."""

    layers: ClassVar[tuple[str, ...]] = ("features",)
    native_size: ClassVar[int | None] = None
    grayscale: ClassVar[bool] = True
    # A cell's normalized gradient histogram is zero exactly when its gradients all are.
    zero_means_flat: ClassVar[bool] = True
    polish_per_step: ClassVar[float] = POLISH_PER_STEP

    def default_tv_weight(self) -> float:
        return TV_WEIGHT

    def default_iters(self) -> int:
        return SHALLOW_ITERS

    def default_adam_lr(self) -> float | None:
        return ADAM_LR

    def default_polish(self, iters: int) -> int:
        """Polishing rounds after ``iters`` steps, in proportion to them (a quick look stays quick)."""
        return round(self.polish_per_step * iters)

    def default_pyramid_levels(self) -> int:
        return 4  # what HOG, HOGb and DSIFT were tuned and measured with (Table 1)

    def default_start_noise(self) -> float:
        return 0.05  # their gradient vanishes on a flat image: a flat start would never move


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
