"""Pictures the widgets show, made from PNG bytes and numpy arrays (no torch: safe in any thread)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..representations import Box

#: Stops of the heatmap colour ramp (dark violet → orange → pale yellow), in [0, 255].
_RAMP = np.array([[20, 10, 60], [140, 30, 110], [240, 110, 40], [252, 240, 160]], dtype=np.float64)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → ``(H, W, 3)`` uint8."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def encode_png(array: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 → PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def crop_png(data: bytes, box: Box, display: int = 128) -> bytes:
    """The ``box`` of a PNG image, scaled (nearest, so pixels stay visible) to ``display`` px on its long side."""
    pixels = decode_png(data)[box.top : box.bottom, box.left : box.right]
    scale = display / max(pixels.shape[:2])
    size = (max(round(pixels.shape[1] * scale), 1), max(round(pixels.shape[0] * scale), 1))
    return encode_png(np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)))


def normalize(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant map becomes zeros)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def activation_map(code: np.ndarray, channel: int = -1) -> np.ndarray:
    """``(C, H', W')`` code → ``(H', W')`` in [0, 1]: one channel, or the channels' summed magnitude (-1)."""
    if channel >= code.shape[0]:
        raise ValueError(f"channel {channel} is out of range; this layer has {code.shape[0]} channels")
    return normalize(np.abs(code).sum(0) if channel < 0 else code[channel])


def heat_overlay_png(image: np.ndarray, heat: np.ndarray, opacity: float = 0.6) -> bytes:
    """``heat`` ``(H', W')`` in [0, 1] coloured and blended over ``image`` ``(H, W, 3)`` uint8."""
    positions = heat * (len(_RAMP) - 1)
    low = np.clip(np.floor(positions).astype(int), 0, len(_RAMP) - 2)
    fraction = (positions - low)[..., None]
    colours = _RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction
    height, width = image.shape[:2]
    # Nearest upsampling keeps each code cell a visible block.
    rows = np.minimum(np.arange(height) * heat.shape[0] // height, heat.shape[0] - 1)
    cols = np.minimum(np.arange(width) * heat.shape[1] // width, heat.shape[1] - 1)
    blended = image * (1 - opacity) + colours[rows][:, cols] * opacity
    return encode_png(blended.round().astype(np.uint8))


def loss_svg(
    steps: Sequence[int], losses: Sequence[float], total: int, width: int = 240, height: int = 110
) -> str:
    """A small log-scale plot of the total loss against the step, as inline SVG."""
    frame = (
        f'<svg class="invviz-loss-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" style="font: 10px sans-serif">'
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="white" stroke="#ccc"/>'
    )
    points = [(s, math.log10(v)) for s, v in zip(steps, losses) if v > 0 and math.isfinite(v)]
    if not points:
        return frame + f'<text x="8" y="{height / 2}" fill="#888">loss appears here</text></svg>'
    low = min(y for _, y in points)
    high = max(y for _, y in points)
    span = max(high - low, 1e-6)
    left, top, right, bottom = 34, 8, width - 6, height - 16

    def place(step: int, value: float) -> str:
        x = left + (right - left) * step / max(total, 1)
        y = bottom - (bottom - top) * (value - low) / span
        return f"{x:.1f},{y:.1f}"

    line = " ".join(place(s, y) for s, y in points)
    return (
        frame
        + f'<polyline points="{line}" fill="none" stroke="#c0392b" stroke-width="1.5"/>'
        + f'<text x="3" y="{top + 8}" fill="#555">{10**high:.2g}</text>'
        + f'<text x="3" y="{bottom}" fill="#555">{10**low:.2g}</text>'
        + f'<text x="{left}" y="{height - 4}" fill="#555">loss (log) over {total} steps</text></svg>'
    )


def save_view(
    path_prefix: str | Path, panels: Sequence[bytes], settings: dict[str, object], pad: int = 4
) -> tuple[Path, Path]:
    """Write the non-empty PNG ``panels`` side by side to ``PREFIX.png`` and ``settings`` to ``PREFIX.json``."""
    arrays = [decode_png(panel) for panel in panels if panel]
    if not arrays:
        raise ValueError("nothing to save yet: no image has been computed")
    height = max(a.shape[0] for a in arrays)
    width = sum(a.shape[1] for a in arrays) + pad * (len(arrays) + 1)
    canvas = np.full((height + 2 * pad, width, 3), 255, dtype=np.uint8)
    left = pad
    for array in arrays:
        canvas[pad : pad + array.shape[0], left : left + array.shape[1]] = array
        left += array.shape[1] + pad
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    image_path, settings_path = (
        prefix.with_name(prefix.name + ".png"),
        prefix.with_name(prefix.name + ".json"),
    )
    Image.fromarray(canvas).save(image_path)
    settings_path.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return image_path, settings_path
