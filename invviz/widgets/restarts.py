"""RestartsView: K reconstructions of one code from different random starts, and how much they differ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import torch
import traitlets
from torch import Tensor

from ..engine import InversionResult, Settings
from ..engine.analyses import diversity, restarts
from ..engine.jobs import InversionEngine, Reporter, Snapshot
from ._base import InversionWidget, Work, control_style, progress_line
from .tiles import TileGrid


@dataclass
class RestartsOutcome:
    """The restarts' result and its diversity; ``images`` is what the engine publishes as the final snapshot."""

    images: Tensor
    result: InversionResult
    diversity: float


class RestartsView(InversionWidget[RestartsOutcome]):
    """``k`` reconstructions side by side: what differs between them is what the layer is invariant to.

    ``diversity`` is their mean pairwise RMS pixel distance (0 to 1).
    """

    k = traitlets.Int(4, min=1, help="number of random starts")
    seed = traitlets.Int(0, min=0)
    diversity = traitlets.Float(math.nan, help="mean pairwise RMS distance of the reconstructions")
    feature_errors = traitlets.List(traitlets.Float(), help="per reconstruction, once done")

    rerun_on = (*InversionWidget.rerun_on, "k", "seed")

    def __init__(
        self,
        image: str = "chelsea",
        model: str = "efficientnet_lite0",
        layer: str = "blocks.4",
        *,
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
            engine=engine,
            device=device,
            debounce=debounce,
            **traits,
        )
        self.grid = TileGrid(tile_size=160)
        self._diversity_label = widgets.HTML().add_class("invviz-diversity")
        traitlets.dlink(
            (self, "diversity"),
            (self._diversity_label, "value"),
            lambda value: (
                f"diversity <b>{value:.3f}</b> (mean pairwise RMS distance)" if math.isfinite(value) else ""
            ),
        )
        k_slider = widgets.IntSlider(
            min=1,
            max=12,
            description="restarts",
            continuous_update=False,
            **control_style(),
        )
        traitlets.link((self, "k"), (k_slider, "value"))
        self.children = [
            widgets.HBox([self._source_controls(), k_slider]),
            self._run_controls(),
            self.grid,
            self._diversity_label,
            self._error_label,
        ]
        if autorun:
            self.run()

    @property
    def tiles(self) -> list[bytes]:
        """PNG of each reconstruction."""
        return list(self.grid.tiles)

    def _prepare(self) -> Work[RestartsOutcome]:
        rep, image = self._representation(), self._image()
        settings = Settings(iters=self.iters, seed=self.seed, grey=self._grey(rep))
        k = self.k
        with self.grid.hold_sync():
            self.grid.tiles = [b""] * k
            self.grid.labels = [f"start {index + 1}" for index in range(k)]
            self.grid.columns = min(k, 6)
        self.diversity, self.feature_errors = math.nan, []
        device = self.engine.device

        def work(reporter: Reporter) -> RestartsOutcome:
            result = restarts(
                rep, image, k, settings=settings, device=device, on_step=reporter.step, stop=reporter.stop
            )
            return RestartsOutcome(result.images, result, diversity(result.images))

        return work

    def _show(self, snapshot: Snapshot) -> None:
        self.grid.tiles = [snapshot.png(index) for index in range(len(snapshot.images))]
        progress = snapshot.progress
        self.progress = progress.step / progress.total if progress.total else 1.0
        self.status = progress_line(snapshot)

    def _finish(self, outcome: RestartsOutcome) -> None:
        self.diversity = outcome.diversity
        self.feature_errors = outcome.result.feature_error
        verb = "stopped" if outcome.result.stopped else "done"
        self.status = (
            f"{verb} · {self.k} starts, {outcome.result.steps} steps in {outcome.result.seconds:.1f} s"
        )

    def _view_panels(self) -> list[bytes]:
        return list(self.grid.tiles)
