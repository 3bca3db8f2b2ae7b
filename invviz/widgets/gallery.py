"""ChannelGallery: one inversion per channel of a layer, as tiles that fill in while the job runs."""

from __future__ import annotations

import math
from typing import Any

import ipywidgets as widgets
import numpy as np
import torch
import traitlets

from ..engine import Settings
from ..engine.analyses import GalleryResult, channel_gallery, parse_channels
from ..engine.jobs import InversionEngine, Reporter, Snapshot
from ._base import InversionWidget, Work, code_array, control_style, image_panel, progress_line
from ._render import activation_map, decode_png, heat_overlay_png
from .tiles import TileGrid

#: Displayed side of the enlarged tile and of its channel's activation.
ENLARGED = 224


class ChannelGallery(InversionWidget[GalleryResult]):
    """Each of ``channels`` (e.g. ``"0-15"``) inverted alone: what that channel encodes.

    Tiles appear as the job reaches them; clicking one (or setting ``selected``) enlarges it beside
    the channel's activation over the image.
    """

    channels = traitlets.Unicode("0-15", help='channel list: "0-15,32", "first-half", "second-half", "all"')
    selected = traitlets.Int(-1, min=-1, help="index of the enlarged tile; -1 = none")
    channel_list = traitlets.List(traitlets.Int(), help="the channels of the tiles, in order")
    feature_errors = traitlets.List(traitlets.Float(), help="per tile, once the gallery is done")
    enlarged = traitlets.Bytes(b"", help="PNG of the selected tile")
    activation = traitlets.Bytes(b"", help="PNG: the selected channel's activation over the image")

    rerun_on = (*InversionWidget.rerun_on, "channels")
    #: Each snapshot re-encodes the running tile and re-sends the grid, in the engine's thread:
    #: four a second keep the tiles live at a third of the default rate's cost.
    snapshot_rate = 4.0

    def __init__(
        self,
        image: str = "chelsea",
        model: str = "efficientnet_lite0",
        layer: str = "blocks.4",
        *,
        iters: int = 150,
        autorun: bool = True,
        engine: InversionEngine | None = None,
        device: str | torch.device = "auto",
        debounce: float = 0.3,
        **traits: Any,
    ) -> None:
        super().__init__(
            image_name=image,
            model=model,
            layer=layer,
            iters=iters,
            engine=engine,
            device=device,
            debounce=debounce,
            **traits,
        )
        self._code: np.ndarray | None = None
        self.grid = TileGrid(tile_size=112)
        traitlets.link((self, "selected"), (self.grid, "selected"))
        self._build()
        self.observe(self._reporting(self._on_select), names=["selected"])
        if autorun:
            self.run()

    @property
    def tiles(self) -> list[bytes]:
        """PNG of each tile (empty bytes while it is still to come)."""
        return list(self.grid.tiles)

    def _prepare(self) -> Work[GalleryResult]:
        rep, image = self._representation(), self._image()
        self._code = code_array(rep, image)
        channels = parse_channels(self.channels, self._code.shape[0])
        settings = Settings(iters=self.iters, grey=self._grey(rep))
        with self.grid.hold_sync():
            self.grid.tiles = [b""] * len(channels)
            self.grid.labels = [f"ch {channel}" for channel in channels]
            self.grid.columns = min(len(channels), 8)
        self.channel_list, self.feature_errors, self.selected = channels, [], -1
        device = self.engine.device

        def work(reporter: Reporter) -> GalleryResult:
            return channel_gallery(
                rep,
                image,
                channels,
                settings=settings,
                device=device,
                on_step=reporter.step,
                stop=reporter.stop,
            )

        return work

    def _show(self, snapshot: Snapshot) -> None:
        tiles = list(self.grid.tiles)
        indices = snapshot.tiles if snapshot.tiles is not None else range(len(tiles))
        for position, index in enumerate(indices):
            tiles[index] = snapshot.png(position)
        self.grid.tiles = tiles
        progress = snapshot.progress
        self.progress = progress.step / progress.total if progress.total else 1.0
        self.status = progress_line(snapshot)
        if self.selected >= 0:
            self.enlarged = tiles[self.selected]

    def _finish(self, result: GalleryResult) -> None:
        self.feature_errors = result.feature_error
        self.grid.labels = [
            f"ch {channel} · {error:.2f}" if math.isfinite(error) else f"ch {channel} · all 0" if channel in result.empty else f"ch {channel}"
            for channel, error in zip(result.channels, result.feature_error)
        ]
        verb = "stopped" if result.stopped else "done"
        self.status = f"{verb} · {len(result.channels)} channels in {result.seconds:.1f} s"

    def _view_panels(self) -> list[bytes]:
        return [*self.grid.tiles, self.enlarged, self.activation]

    def _on_select(self, change: dict[str, Any]) -> None:
        index = change["new"]
        if index < 0 or self._code is None or index >= len(self.channel_list):
            self.enlarged, self.activation = b"", b""
        else:
            self.enlarged = self.grid.tiles[index]
            code = self._code if self._code.ndim == 3 else self._code[:, None, None]
            heat = activation_map(code, self.channel_list[index])
            self.activation = heat_overlay_png(decode_png(self.original), heat)
        self._detail.layout.display = "flex" if index >= 0 else "none"

    def _build(self) -> None:
        channels_text = widgets.Text(
            description="channels",
            continuous_update=False,
            **control_style(),
        )
        traitlets.link((self, "channels"), (channels_text, "value"))
        self._detail = widgets.HBox(
            [
                image_panel(self, "selected tile", "enlarged", "invviz-enlarged", ENLARGED),
                image_panel(
                    self, "its channel's activation", "activation", "invviz-channel-activation", ENLARGED
                ),
            ],
            layout=widgets.Layout(display="none"),
        )
        self.children = [
            widgets.HBox([self._source_controls(), channels_text]),
            self._run_controls(),
            self.grid,
            self._detail,
            self._error_label,
        ]
