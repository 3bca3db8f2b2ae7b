"""HOG (UoCTTI variant) and HOGb as differentiable torch modules, equal to VLFeat's ``vl_hog``.

Follows ``vl_hog_put_image`` + ``vl_hog_extract`` (VLFeat 0.9.21) step by step: central-difference
gradients on interior pixels, each assigned to the nearest of 18 directed orientations (HOGb: split
between the two nearest), bilinear spatial pooling into cells, UoCTTI block normalization
(four 2×2 blocks, ``1/sqrt(norm + 1e-4)``, clamp 0.2) and the 31-dimensional projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register_representation
from ._base import _cells
from ._geometry import Box, Window, window_box
from ._glyphs import ORIENTATIONS, render_hog
from ._shallow import ShallowRepresentation, check_positive_int, gray_255, safe_sqrt
from ._surrogates import check_slope, reviving_clamp

__all__ = ["HOG", "HOGb", "render_hog"]

CLAMP = 0.2
#: Share of the gradient that reaches a truncated (0.2) bin, in the direction that brings it back
#: under the truncation (``reviving_clamp``). The true gradient there is zero: a bin the
#: reconstruction has truncated but the photo has not could never come down. On the 8
#: scikit-image photos at 256² (400 steps at Adam 0.02, VLFeat on the 8-bit result) 0.7 took HOG's mean
#: error from 0.133 to 0.128 (rocket 0.189 → 0.171, retina 0.203 → 0.193, astronaut 0.140 →
#: 0.131; chelsea 0.096 → 0.098 the most any photo lost) and HOGb's from 0.065 to 0.061 (retina
#: 0.161 → 0.147, coffee 0.053 → 0.047; rocket 0.119 → 0.121); dense SIFT's own 0.2 truncation
#: gained nothing from it (within ±0.001 on 7 photos), so it keeps the true gradient. Values
#: are unchanged: only the backward pass differs.
TRUNCATION_SLOPE = 0.7


def hog_cells(pixels: int, cell_size: int) -> int:
    """Number of HOG cells along an axis of ``pixels`` (the last cell is at least half inside)."""
    return (pixels + cell_size // 2) // cell_size


def _orientation_table(like: Tensor) -> tuple[Tensor, Tensor]:
    """Unit vectors of the 18 directed orientations ``k*pi/9``, in ``like``'s dtype and device.

    Returns ``(cos, sin)``, each ``(18,)``. In float32 they equal VLFeat's table (rounded from
    double); in float64 they stay exact, so that gradients near a bin centre stay smooth.
    """
    angles = torch.arange(ORIENTATIONS, dtype=torch.float64) * math.pi / ORIENTATIONS
    cos = angles.cos().to(like)
    sin = angles.sin().to(like)
    return torch.cat([cos, -cos]), torch.cat([sin, -sin])


def _cell_weights(pixels: int, cell_size: int, like: Tensor) -> Tensor:
    """Bilinear weight of each interior pixel ``1 .. pixels-2`` in each cell along one axis.

    ``(cells, pixels - 2)``; a pixel on a cell centre goes wholly to that cell, one between two
    centres is split linearly, and weight falling outside the cell array is dropped (as VLFeat does).
    """
    position = torch.arange(1, pixels - 1, dtype=torch.float64, device=like.device)
    offset = (position + 0.5) / cell_size - 0.5
    left = offset.floor()
    right_share = offset - left
    cell = torch.arange(hog_cells(pixels, cell_size), dtype=torch.float64, device=like.device)[:, None]
    weights = (cell == left) * (1 - right_share) + (cell == left + 1) * right_share
    return weights.to(like.dtype)


def _uoctti_normalize(histograms: Tensor, truncation_slope: float = 0.0) -> Tensor:
    """UoCTTI block normalization and projection: ``(B, 18, R, C)`` cell histograms -> ``(B, 31, R, C)``.

    ``truncation_slope``: the reviving gradient of the 0.2 truncation (0: the true gradient)."""
    undirected = histograms[:, :ORIENTATIONS] + histograms[:, ORIENTATIONS:]
    energy = undirected.square().sum(1, keepdim=True)
    # VLFeat clamps neighbour indices at the border, i.e. border blocks reuse the edge cells.
    padded = F.pad(energy, (1, 1, 1, 1), mode="replicate")
    blocks = padded[..., :-1, :-1] + padded[..., :-1, 1:] + padded[..., 1:, :-1] + padded[..., 1:, 1:]
    # The four 2x2 blocks containing each cell: upper-left, upper-right, lower-left, lower-right.
    factors = torch.stack(
        [blocks[..., :-1, :-1], blocks[..., :-1, 1:], blocks[..., 1:, :-1], blocks[..., 1:, 1:]], 1
    )
    factors = (factors + 1e-4).rsqrt()
    directed = reviving_clamp(factors * histograms[:, None], -math.inf, CLAMP, truncation_slope)
    undirected = reviving_clamp(factors * undirected[:, None], -math.inf, CLAMP, truncation_slope)
    texture = undirected.sum(2) / math.sqrt(2 * ORIENTATIONS)
    return torch.cat([0.5 * directed.sum(1), 0.5 * undirected.sum(1), texture], 1)


@register_representation("hog")
class HOG(ShallowRepresentation):
    """HOG, VLFeat's UoCTTI variant: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 31, R, C)``.

    ``R = (H + cell_size // 2) // cell_size`` (likewise ``C``). Channels: 18 contrast-sensitive
    orientations ``k*20°``, 9 contrast-insensitive ones, 4 texture energies (VLFeat's order).
    """

    #: split each gradient between its two nearest orientations (HOGb) instead of the nearest one.
    bilinear: ClassVar[bool] = False

    def __init__(self, layer: str, cell_size: int = 8, truncation_slope: float = TRUNCATION_SLOPE) -> None:
        """``truncation_slope``: share of the gradient let through to bins truncated at 0.2, toward
        bringing them back under it (see ``TRUNCATION_SLOPE``); 0 is the true gradient."""
        super().__init__(layer)
        self.cell_size = check_positive_int("cell_size", cell_size)
        self.truncation_slope = check_slope("truncation_slope", truncation_slope)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, 31, R, C)``."""
        gray = gray_255(images)
        height, width = gray.shape[-2:]
        smallest = max(self.cell_size, 4)
        if height < smallest or width < smallest:
            raise ValueError(
                f"{self.model} needs an image of at least {smallest}×{smallest} pixels "
                f"(one cell at cell_size={self.cell_size}), got {height}×{width}"
            )
        bins, weights = self._orientations(gray)
        per_pixel = gray.new_zeros(gray.shape[0], 2 * ORIENTATIONS, height - 2, width - 2)
        per_pixel = per_pixel.scatter_add_(1, bins, weights)
        # Pooled into cells one axis at a time, as plain matrix products over the last dimension
        # (an einsum of the two did the same arithmetic through two transposed copies, 4 ms at 256²).
        along_x = per_pixel @ _cell_weights(width, self.cell_size, gray).T
        histograms = _cell_weights(height, self.cell_size, gray) @ along_x
        return _uoctti_normalize(histograms, self.truncation_slope)

    def _orientations(self, gray: Tensor) -> tuple[Tensor, Tensor]:
        """The two nearest directed orientation bins of the interior pixels and the mass given to each.

        ``(B, H, W)`` -> bins and weights, each ``(B, 2, H-2, W-2)``. HOGb splits the gradient
        magnitude between the two bins by angle; HOG gives it all to the nearest one.
        """
        gx = gray[:, 1:-1, 2:] - gray[:, 1:-1, :-2]
        gy = gray[:, 2:, 1:-1] - gray[:, :-2, 1:-1]
        magnitude = safe_sqrt(gx * gx + gy * gy)[:, None]
        cos, sin = _orientation_table(gray)
        with torch.no_grad():
            # The same float operations as VLFeat 0.9.21 (scores of the unnormalized gradient), so
            # that near-ties, and the ill-conditioned acos below, come out the same.
            scores = (
                gx[:, None] * cos[:ORIENTATIONS, None, None] + gy[:, None] * sin[:ORIENTATIONS, None, None]
            )
            nearest = _first_argmax(scores.abs())
            nearest_score = scores.gather(1, nearest)
            nearest_bin = nearest + ORIENTATIONS * (nearest_score < 0)
            second = _first_argmax(scores.abs().scatter(1, nearest, -1.0))
            second_bin = second + ORIENTATIONS * (scores.gather(1, second) < 0)
            # torch's float32 sqrt can be an ulp off sqrtf, and acos near 1 magnifies that
            # 1000-fold: take the correctly rounded square root by way of float64.
            rounded_magnitude = (gx * gx + gy * gy).double().sqrt().to(gx.dtype)[:, None]
            cos_angle = nearest_score.abs() / rounded_magnitude.clamp(min=1e-10)
            exact_angle = cos_angle.clamp(max=1).acos()
        # acos has an infinite slope at a perfectly aligned gradient; atan2(|cross|, dot) is the same
        # angle with a finite derivative, so it carries the gradient while acos fixes the value.
        dot = gx[:, None] * cos[nearest_bin] + gy[:, None] * sin[nearest_bin]
        cross = gx[:, None] * sin[nearest_bin] - gy[:, None] * cos[nearest_bin]
        moving = magnitude > 0
        smooth_angle = torch.atan2(
            torch.where(moving, cross, torch.zeros_like(cross)).abs(),
            torch.where(moving, dot, torch.ones_like(dot)),
        )
        angle = smooth_angle + (exact_angle - smooth_angle).detach()
        second_share = angle / (math.pi / ORIENTATIONS)
        bins = torch.cat([nearest_bin, second_bin], 1)
        split = magnitude * torch.cat([1 - second_share, second_share], 1)
        if self.bilinear:
            return bins, split
        # Nearest-bin assignment has no derivative with respect to the gradient's angle, so an
        # inversion could only rescale edges, never turn them (HOG error stuck at 0.25-0.40 on
        # 256² photos). The backward pass borrows HOGb's split (a straight-through estimator);
        # ``split - split.detach()`` is exactly 0, so the values stay VLFeat's to the bit.
        nearest_only = torch.cat([magnitude, torch.zeros_like(magnitude)], 1).detach()
        return bins, nearest_only + (split - split.detach())

    def windows(self) -> Sequence[Window]:
        """Gradient (3 px), bilinear cell pooling, then the 3×3 cells of block normalization.

        A cell gathers pixels from ``cell_size // 2`` before its start to ``cell_size // 2`` past
        its end. The pooling window's cell count is ``ceil(n / cell_size)``, one more than the
        true count when the remainder is below half a cell, see :meth:`receptive_field`.
        """
        cell, half = self.cell_size, self.cell_size // 2
        return [
            Window(kernel=3, padding=1),
            Window(kernel=cell + 2 * half, stride=cell, padding=half, ceil_mode=True),
            Window(kernel=3, padding=1),
        ]

    def receptive_field(
        self,
        row: int | tuple[int, int],
        col: int | tuple[int, int],
        height: int,
        width: int,
        clip: bool = True,
    ) -> Box:
        """As :meth:`Representation.receptive_field`, checked against HOG's true cell count.

        Windows with symmetric padding cannot express VLFeat's rounded cell count
        ``(n + cell_size // 2) // cell_size``, so it is checked here before the (exact) box is built.
        """
        self._check_cells(row, col, height, width)
        return super().receptive_field(row, col, height, width, clip)

    def flat_support(self, row: int, col: int, height: int, width: int) -> Box:
        """The pixels whose gradients enter cell ``(row, col)``'s histogram: the receptive field
        without the block normalization, which only divides the histogram."""
        self._check_cells(row, col, height, width)
        return window_box(self.windows()[:-1], height, width, (row, row + 1), (col, col + 1)).clip(height, width)

    def _check_cells(
        self, row: int | tuple[int, int], col: int | tuple[int, int], height: int, width: int
    ) -> None:
        for name, cells, pixels in (("row", row, height), ("col", col, width)):
            start, stop = _cells(name, cells)
            count = hog_cells(pixels, self.cell_size)
            if not 0 <= start < stop <= count:
                raise ValueError(f"HOG {name} {start}:{stop} is outside the code's {count} {name}s")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cell_size={self.cell_size}"


@register_representation("hogb")
class HOGb(HOG):
    """HOG with VLFeat's bilinear orientation assignment, smoother to invert (paper's HOGb)."""

    bilinear: ClassVar[bool] = True


def _first_argmax(values: Tensor) -> Tensor:
    """``values.argmax(1, keepdim=True)`` (the first of equal maxima) for ``(B, K, H, W)``, with
    few ``K``: one pass per ``K``, several times faster on the CPU than torch's reduction over a
    strided dimension (HOG's forward pass at 256²: 25 → 11 ms)."""
    best = values[:, 0].clone()
    index = torch.zeros_like(best)
    for k in range(1, values.shape[1]):
        higher = values[:, k] > best
        torch.maximum(best, values[:, k], out=best)
        index.add_(higher * (k - index))  # k where higher (small integers: exact in float)
    return index.long()[:, None]
