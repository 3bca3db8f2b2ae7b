"""NeuronPicker: a layer's activation map over the image; click or drag to select code cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import anywidget
import numpy as np
import traitlets

SelectMode = Literal["replace", "add", "toggle"]
_HERE = Path(__file__).parent


class NeuronPicker(anywidget.AnyWidget):
    """Heatmap of ``activation`` (rows × cols in [0, 1]) drawn over ``image`` (PNG) on a canvas.

    In the browser: a click toggles a cell, a drag selects a rectangle (replacing the selection),
    shift adds (click or drag). The selection is ``mask``, rows × cols booleans, synced both ways;
    from code use ``select_cells`` / ``clear``.
    """

    _esm = _HERE / "picker.js"
    _css = _HERE / "invviz.css"

    image = traitlets.Bytes(b"", help="PNG of the image under the heatmap").tag(sync=True)
    activation = traitlets.List(traitlets.List(traitlets.Float()), help="rows × cols in [0, 1]").tag(
        sync=True
    )
    mask = traitlets.List(traitlets.List(traitlets.Bool()), help="selected cells, rows × cols").tag(sync=True)
    opacity = traitlets.Float(0.55, min=0.0, max=1.0, help="heatmap opacity").tag(sync=True)
    display_size = traitlets.Int(300, help="canvas width in CSS pixels").tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_msg(self._handle_message)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the code grid."""
        return (len(self.activation), len(self.activation[0]) if self.activation else 0)

    @property
    def selected(self) -> list[tuple[int, int]]:
        """Selected cells as ``(row, col)``."""
        return [(r, c) for r, row in enumerate(self.mask) for c, on in enumerate(row) if on]

    def set_activation(self, heat: np.ndarray) -> None:
        """Show a new ``(rows, cols)`` map in [0, 1]; the selection is kept when the grid is unchanged."""
        if heat.ndim != 2:
            raise ValueError(f"activation must be 2-D (rows, cols), got shape {heat.shape}")
        resized = heat.shape != self.shape
        with self.hold_sync():
            self.activation = np.asarray(heat, dtype=float).round(4).tolist()
            if resized:
                self.clear()

    def select_cells(
        self, rows: int | tuple[int, int], cols: int | tuple[int, int], mode: SelectMode = "replace"
    ) -> None:
        """Select one cell or the half-open window ``rows=(r0, r1)``, ``cols=(c0, c1)``.

        ``mode``: ``"replace"`` the selection, ``"add"`` to it, or ``"toggle"`` the cells.
        """
        height, width = self.shape
        r0, r1 = (rows, rows + 1) if isinstance(rows, int) else rows
        c0, c1 = (cols, cols + 1) if isinstance(cols, int) else cols
        if not (0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width):
            raise ValueError(f"cells rows {r0}:{r1}, cols {c0}:{c1} are outside the {height}×{width} grid")
        if mode not in ("replace", "add", "toggle"):
            raise ValueError(f"mode must be replace, add or toggle, got {mode!r}")
        grid = (
            np.zeros((height, width), bool)
            if mode == "replace"
            else np.array(self.mask, bool).reshape(height, width)
        )
        window = grid[r0:r1, c0:c1]
        grid[r0:r1, c0:c1] = ~window if mode == "toggle" else True
        self.mask = grid.tolist()

    def clear(self) -> None:
        height, width = self.shape
        self.mask = [[False] * width for _ in range(height)]

    @traitlets.validate("mask")
    def _check_mask(self, proposal: dict[str, Any]) -> list[list[bool]]:
        mask = proposal["value"]
        if self.activation and (len(mask), len(mask[0]) if mask else 0) != self.shape:
            raise traitlets.TraitError(
                f"mask must be {self.shape[0]}×{self.shape[1]} like the activation map"
            )
        return mask

    def _handle_message(self, _widget: Any, content: dict[str, Any], _buffers: list[bytes]) -> None:
        """What the canvas sends: ``{"kind": "select", "rows": [r0, r1], "cols": [c0, c1], "mode": ...}``."""
        if content.get("kind") == "select":
            self.select_cells(tuple(content["rows"]), tuple(content["cols"]), content["mode"])
