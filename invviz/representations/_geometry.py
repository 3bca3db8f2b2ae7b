"""Receptive-field geometry derived from a chain of windowed operations.

A convolution, pooling window or histogram cell maps code cell ``i`` of its output to the input
pixels ``[start + i * jump, start + i * jump + size)``. Composing the chain of such windows gives
the exact box of input pixels a code cell depends on. Padding may depend on the input size
(TensorFlow's "same" padding, used by EfficientNet-Lite), so the composition walks the chain with
the actual spatial size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Padding = int | Literal["same"]


@dataclass(frozen=True)
class Window:
    """One windowed operation along both spatial axes (square kernels, as every model here uses).

    ``padding`` is the number of pixels added before the first element, or ``"same"`` for
    TensorFlow's rule (total padding ``max((ceil(n / s) - 1) * s + k - n, 0)``, the smaller half
    first). ``ceil_mode`` follows ``nn.MaxPool2d``.
    """

    kernel: int
    stride: int = 1
    padding: Padding = 0
    dilation: int = 1
    ceil_mode: bool = False

    def pad_before(self, n: int) -> int:
        if self.padding == "same":
            total = max((math.ceil(n / self.stride) - 1) * self.stride + self.extent - n, 0)
            return total // 2
        return int(self.padding)

    @property
    def extent(self) -> int:
        return (self.kernel - 1) * self.dilation + 1

    def output_size(self, n: int) -> int:
        if self.padding == "same":
            return math.ceil(n / self.stride)
        span = n + 2 * int(self.padding) - self.extent
        steps = math.ceil(span / self.stride) if self.ceil_mode else span // self.stride
        return steps + 1


@dataclass(frozen=True)
class AxisGeometry:
    """Receptive field along one axis: cell ``i`` sees input ``[start + i*jump, start + i*jump + size)``."""

    start: int
    jump: int
    size: int
    cells: int


@dataclass(frozen=True)
class Box:
    """A box of input pixels, ``[top, bottom) × [left, right)``; may extend past the image."""

    top: int
    left: int
    bottom: int
    right: int

    def clip(self, height: int, width: int) -> Box:
        return Box(max(self.top, 0), max(self.left, 0), min(self.bottom, height), min(self.right, width))

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.bottom, self.right)


def axis_geometry(windows: Sequence[Window], n: int) -> AxisGeometry:
    """Compose ``windows`` along one axis of an input of ``n`` pixels."""
    start, jump, size = 0, 1, 1
    for window in windows:
        start -= window.pad_before(n) * jump
        size += (window.extent - 1) * jump
        jump *= window.stride
        n = window.output_size(n)
    return AxisGeometry(start=start, jump=jump, size=size, cells=n)


def window_box(
    windows: Sequence[Window], height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]
) -> Box:
    """Input box (unclipped) seen by code cells ``rows[0] <= r < rows[1]``, ``cols[0] <= c < cols[1]``."""
    gy = axis_geometry(windows, height)
    gx = axis_geometry(windows, width)
    if not (0 <= rows[0] < rows[1] <= gy.cells and 0 <= cols[0] < cols[1] <= gx.cells):
        raise ValueError(
            f"code window rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]} is outside the code "
            f"of {gy.cells}×{gx.cells} cells"
        )
    return Box(
        top=gy.start + rows[0] * gy.jump,
        left=gx.start + cols[0] * gx.jump,
        bottom=gy.start + (rows[1] - 1) * gy.jump + gy.size,
        right=gx.start + (cols[1] - 1) * gx.jump + gx.size,
    )


def _clipped_axis(windows: Sequence[Window], n: int, cells: tuple[int, int]) -> tuple[int, int]:
    """Input range ``[start, stop)`` that output cells ``cells`` read along one axis, kept inside
    every layer's own extent on the way back (a padded position reads no pixel, and a position a
    layer drops, as floor-mode pooling does with trailing ones, is read by no cell)."""
    sizes = [n]
    for window in windows:
        sizes.append(window.output_size(sizes[-1]))
    start, stop = cells
    for window, size in zip(reversed(windows), reversed(sizes[:-1])):
        pad = window.pad_before(size)
        start = max(start * window.stride - pad, 0)
        stop = min((stop - 1) * window.stride - pad + window.extent, size)
    return start, stop


def clipped_window_box(
    windows: Sequence[Window], height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]
) -> Box:
    """The pixels of the image that code cells ``rows`` × ``cols`` depend on: ``window_box`` within
    the image, and tighter where a layer drops positions at the border (floor-mode pooling)."""
    window_box(windows, height, width, rows, cols)  # checks the cells
    top, bottom = _clipped_axis(windows, height, rows)
    left, right = _clipped_axis(windows, width, cols)
    return Box(top, left, bottom, right)
