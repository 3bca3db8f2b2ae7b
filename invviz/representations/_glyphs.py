"""Render a HOG code as oriented bars, like VLFeat's ``vl_hog_render``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

#: HOG's undirected orientations; a code has 2*9 directed + 9 undirected + 4 texture channels.
ORIENTATIONS = 9


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """C's ``lround`` for non-negative values (``np.round`` rounds halves to even)."""
    floor = np.floor(values)
    return (floor + (values - floor >= 0.5)).astype(np.int64)


def hog_glyphs(glyph_size: int = 21) -> np.ndarray:
    """One bar per undirected orientation, drawn across the gradient (along the edge).

    ``(9, glyph_size, glyph_size)`` float32 images with ones on the bar.
    """
    glyphs = np.zeros((ORIENTATIONS, glyph_size, glyph_size), np.float32)
    middle = (glyph_size - 1) / 2
    for orientation in range(ORIENTATIONS):
        angle = math.fmod(orientation * math.pi / ORIENTATIONS + math.pi / 2, math.pi)
        half_x = glyph_size * math.cos(angle) / 2
        half_y = glyph_size * math.sin(angle) / 2
        if angle <= math.pi / 4 or angle >= 3 * math.pi / 4:
            # Mostly horizontal: one pixel per column, so the bar has no gaps.
            skip = int((1 - abs(math.cos(angle))) / 2 * glyph_size)
            cols = np.arange(skip, glyph_size - skip)
            slope = half_y / half_x
            rows = _round_half_away(slope * cols + (1 - slope) * middle)
        else:
            skip = int((1 - math.sin(angle)) / 2 * glyph_size)
            rows = np.arange(skip, glyph_size - skip)
            slope = half_x / half_y
            cols = _round_half_away(slope * rows + (1 - slope) * middle)
        glyphs[orientation, rows, cols] = 1
    return glyphs


def render_hog(code: Tensor | np.ndarray, glyph_size: int = 21) -> np.ndarray:
    """Picture of a HOG code: each cell drawn as bars weighted by its orientation energies.

    ``(31, R, C)`` -> ``(R * glyph_size, C * glyph_size)``; a batch ``(B, 31, R, C)`` gives
    ``(B, R * glyph_size, C * glyph_size)``. float32, same scale as the code.
    """
    array = code.detach().float().cpu().numpy() if isinstance(code, torch.Tensor) else np.asarray(code)
    if array.ndim not in (3, 4) or array.shape[-3] != 3 * ORIENTATIONS + 4:
        raise ValueError(f"expected a HOG code of shape (31, R, C) or (B, 31, R, C), got {array.shape}")
    array = array.astype(np.float32, copy=False)
    # Directed and undirected energies of one orientation all show as the same bar.
    weights = (
        array[..., :ORIENTATIONS, :, :]
        + array[..., ORIENTATIONS : 2 * ORIENTATIONS, :, :]
        + array[..., 2 * ORIENTATIONS : 3 * ORIENTATIONS, :, :]
    )
    cells = np.einsum("...krc,kij->...rcij", weights, hog_glyphs(glyph_size))
    # Where bars cross, the sum may exceed every single weight; VLFeat clips back into range.
    low = np.minimum(weights.min(-3), 0)[..., None, None]
    high = np.maximum(weights.max(-3), 0)[..., None, None]
    cells = np.clip(cells, low, high)
    rows, cols = weights.shape[-2:]
    image = np.swapaxes(cells, -3, -2)
    return image.reshape(*image.shape[:-4], rows * glyph_size, cols * glyph_size)
