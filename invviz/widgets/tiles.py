"""TileGrid: PNG tiles in a grid; clicking one sets ``selected`` (used by the gallery and restarts views)."""

from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets

_HERE = Path(__file__).parent


class TileGrid(anywidget.AnyWidget):
    """``tiles`` (PNG bytes; empty bytes = still computing) with ``labels``; ``selected`` is the clicked index or -1."""

    _esm = _HERE / "tiles.js"
    _css = _HERE / "invviz.css"

    tiles = traitlets.List(traitlets.Bytes()).tag(sync=True)
    labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    columns = traitlets.Int(4).tag(sync=True)
    tile_size = traitlets.Int(112, help="tile width in CSS pixels").tag(sync=True)

    def set_tile(self, index: int, png: bytes) -> None:
        """Replace one tile (a new list, so the change syncs)."""
        tiles = list(self.tiles)
        tiles[index] = png
        self.tiles = tiles
