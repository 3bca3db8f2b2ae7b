"""Explorer: invert one image at one layer, live, with every knob of the objective on a slider."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import torch
import traitlets

from ..engine import InversionResult, Settings, invert
from ..engine.jobs import InversionEngine, Reporter, Snapshot
from ..images import SAMPLES
from ..representations import Representation
from ._base import InversionWidget, Work, code_array, control_style, image_panel, progress_line
from ._render import activation_map, crop_png, loss_svg
from .picker import NeuronPicker, SelectMode

#: Displayed side of the original and the reconstruction, in CSS pixels.
PANEL = 224
#: Displayed long side of the receptive-field crops.
CROP = 128


class Explorer(InversionWidget[InversionResult]):
    """The original beside its live reconstruction from one layer's code, under TV and α-norm priors.

    Click or drag on the neuron picker to reconstruct from just those code cells (of every channel, or
    of ``channel`` when one is chosen); the receptive field of the selection is cropped from the
    original and the reconstruction. Every control is a trait; changing one re-runs, debounced.

    ``Explorer(size=64, iters=10)`` gives a quick one (tests, slow machines). ``image`` is a bundled
    sample name or a path to an image file.
    """

    tv_weight = traitlets.Float(0.01, help="weight of the TV^β prior; follows the layer's default until set")
    tv_beta = traitlets.Float(2.0, help="β of the TV^β prior")
    tv_chroma = traitlets.Float(
        0.0, min=0.0, help="TV's extra weight on colour variation; follows the layer's default until set"
    )
    alpha_weight = traitlets.Float(1e-4, help="weight of the α-norm prior")
    alpha = traitlets.Float(6.0, help="α of the α-norm prior")
    jitter = traitlets.Int(0, min=0, help="largest random shift per step in pixels (0: off)")
    seed = traitlets.Int(0, min=0)
    mask = traitlets.List(
        traitlets.List(traitlets.Bool()), help="selected code cells, rows × cols (empty: all)"
    )
    channel = traitlets.Int(
        -1, min=-1, help="channel shown on the picker and selected with the cells; -1 = all"
    )
    reconstruction = traitlets.Bytes(b"", help="PNG of the live reconstruction")
    feature_error = traitlets.Float(math.nan, help="‖Φ(x) − Φ0‖ / ‖Φ0‖ over the selected code")
    rf_box = traitlets.List(
        traitlets.Int(), help="receptive field of the selection: top, left, bottom, right"
    )
    rf_original = traitlets.Bytes(b"", help="PNG crop of the original inside the receptive field")
    rf_reconstruction = traitlets.Bytes(b"", help="PNG crop of the reconstruction inside the receptive field")

    rerun_on = (
        *InversionWidget.rerun_on,
        "tv_weight",
        "tv_beta",
        "tv_chroma",
        "alpha_weight",
        "alpha",
        "jitter",
        "seed",
        "mask",
    )

    def __init__(
        self,
        image: str = "chelsea",
        model: str = "efficientnet_lite0",
        layer: str = "blocks.4",
        *,
        tv_weight: float | None = None,
        autorun: bool = True,
        engine: InversionEngine | None = None,
        device: str | torch.device = "auto",
        debounce: float = 0.3,
        **traits: Any,
    ) -> None:
        super().__init__(model=model, layer=layer, engine=engine, device=device, debounce=debounce, **traits)
        # The TV traits take each layer's defaults until the user sets them.
        self._follows_layer = {"tv_weight": tv_weight is None, "tv_chroma": "tv_chroma" not in traits}
        if tv_weight is not None:
            self.tv_weight = tv_weight
        if image in SAMPLES:
            self.image_name = image
        else:
            self.add_image(Path(image).name, Path(image).read_bytes())
        self.result: InversionResult | None = None
        self._code: np.ndarray | None = None
        self._code_key: tuple[str, str, int] | None = None
        self._code_rep: Representation | None = None
        self._history: list[tuple[int, float]] = []
        self.picker = NeuronPicker()
        traitlets.link((self, "mask"), (self.picker, "mask"))
        self._build()
        self.observe(self._reporting(self._on_selection), names=["mask", "channel"])
        self.observe(self._on_tv_choice, names=["tv_weight", "tv_chroma"])
        self._refresh_code()
        if autorun:
            self.run()

    # --- public -----------------------------------------------------------------------------------
    def select_cells(
        self, rows: int | tuple[int, int], cols: int | tuple[int, int], mode: SelectMode = "replace"
    ) -> None:
        """Select code cells as a click or drag on the picker would (see ``NeuronPicker.select_cells``)."""
        self.picker.select_cells(rows, cols, mode)

    def clear_selection(self) -> None:
        """Reconstruct from the whole code again."""
        self.picker.clear()

    def settings(self) -> dict[str, object]:
        return {**super().settings(), "channel": self.channel, "feature_error": self.feature_error}

    # --- job --------------------------------------------------------------------------------------
    def _prepare(self) -> Work[InversionResult]:
        rep, image = self._refresh_code()
        settings = Settings(
            iters=self.iters,
            tv_weight=self.tv_weight,
            tv_beta=self.tv_beta,
            tv_chroma=self.tv_chroma,
            alpha_weight=self.alpha_weight,
            alpha=self.alpha,
            jitter=self.jitter,
            seed=self.seed,
            grey=self._grey(rep),
        )
        mask = self._code_mask()
        device = self.engine.device

        def work(reporter: Reporter) -> InversionResult:
            self._history = []
            return invert(
                rep,
                image,
                mask=mask,
                settings=settings,
                device=device,
                on_step=reporter.step,
                stop=reporter.stop,
            )

        return work

    def _show(self, snapshot: Snapshot) -> None:
        self.reconstruction = snapshot.png(0)
        progress = snapshot.progress
        self.progress = progress.step / progress.total if progress.total else 1.0
        if progress.terms:  # polishing rounds report the feature error only, not the loss
            self._history.append((progress.step, sum(progress.terms.values())))
        if self._history:
            steps, losses = zip(*self._history)
            self._loss_plot.value = loss_svg(steps, losses, total=progress.total)
        if math.isfinite(progress.feature_error):
            self.feature_error = progress.feature_error
        self.status = progress_line(snapshot)
        self._update_crops()

    def _finish(self, result: InversionResult) -> None:
        self.result = result
        self.feature_error = result.feature_error[0]
        verb = "stopped" if result.stopped else "done"
        self.status = f"{verb} · {result.steps} steps in {result.seconds:.1f} s · feature error {self.feature_error:.3f}"

    def _view_panels(self) -> list[bytes]:
        return [self.original, self.reconstruction, self.rf_original, self.rf_reconstruction]

    # --- code, selection, crops -------------------------------------------------------------------
    def _refresh_code(self) -> tuple[Representation, torch.Tensor]:
        """Load the layer and image; recompute the code when either changed and show it on the picker."""
        rep, image = self._representation(), self._image()
        key = (self.spec, self.image_name, self.size)
        if key != self._code_key:
            self._code = code_array(rep, image)
            self._code_key, self._code_rep = key, rep
            spatial = self._code.ndim == 3
            self._channel_slider.max = self._code.shape[0] - 1 if spatial else -1
            # Adjusting traits to the new layer (a new grid clears the selection) is part of this run.
            with self._quietly():
                self.picker.image = self.original
                self._show_activation()
                if self._follows_layer["tv_weight"]:
                    self.tv_weight = rep.default_tv_weight()
                if self._follows_layer["tv_chroma"]:
                    self.tv_chroma = rep.default_tv_chroma()
        return rep, image

    def _show_activation(self) -> None:
        code = self._code
        heat = activation_map(code, self.channel) if code is not None and code.ndim == 3 else np.zeros((0, 0))
        self.picker.set_activation(heat)

    def _code_mask(self) -> torch.Tensor | None:
        """The selection as a mask of the code ``(C, H', W')``; ``None`` when nothing is selected."""
        cells = np.array(self.mask, dtype=bool)
        if self._code is None or not cells.any():
            return None
        mask = np.zeros(self._code.shape, dtype=bool)
        mask[slice(None) if self.channel < 0 else self.channel] = cells
        return torch.from_numpy(mask)

    def _on_selection(self, change: dict[str, Any]) -> None:
        if change["name"] == "channel":
            self._show_activation()
        self._update_crops()
        if change["name"] == "mask" or any(any(row) for row in self.mask):
            self._schedule()

    def _on_tv_choice(self, change: dict[str, Any]) -> None:
        if not self._is_quiet():
            self._follows_layer[change["name"]] = False  # the user chose it: keep it across layers

    def _update_crops(self) -> None:
        rows = [r for r, row in enumerate(self.mask) if any(row)]
        cols = [c for c in range(len(self.mask[0]) if self.mask else 0) if any(row[c] for row in self.mask)]
        rep = self._code_rep
        if not rows or rep is None:
            self.rf_box, self.rf_original, self.rf_reconstruction = [], b"", b""
        else:
            box = rep.receptive_field((rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1), self.size, self.size)
            self.rf_box = list(box.as_tuple())
            self.rf_original = crop_png(self.original, box, CROP)
            self.rf_reconstruction = crop_png(self.reconstruction, box, CROP) if self.reconstruction else b""
        self._crops.layout.display = "flex" if rows else "none"

    # --- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        def slider(
            kind: type[widgets.Widget], trait: str, description: str, **options: Any
        ) -> widgets.Widget:
            control = kind(description=description, continuous_update=False, **control_style(), **options)
            traitlets.link((self, trait), (control, "value"))
            return control

        sliders = [
            slider(
                widgets.FloatLogSlider,
                "tv_weight",
                "TV weight",
                base=10,
                min=-5,
                max=3,
                step=0.1,
                readout_format=".2g",
            ),
            slider(widgets.FloatSlider, "tv_beta", "TV β", min=1.0, max=3.0, step=0.1),
            slider(widgets.FloatSlider, "tv_chroma", "TV colour", min=0.0, max=10.0, step=0.5),
            slider(
                widgets.FloatLogSlider,
                "alpha_weight",
                "α-norm weight",
                base=10,
                min=-8,
                max=0,
                step=0.1,
                readout_format=".2g",
            ),
            slider(widgets.FloatSlider, "alpha", "α", min=1.0, max=12.0, step=0.5),
            slider(widgets.IntSlider, "jitter", "jitter (px)", min=0, max=32),
        ]
        self._channel_slider = slider(widgets.IntSlider, "channel", "channel (−1: all)", min=-1, max=-1)

        self._loss_plot = widgets.HTML(loss_svg([], [], total=self.iters))
        self._feature_label = widgets.HTML().add_class("invviz-feature-error")
        traitlets.dlink(
            (self, "feature_error"),
            (self._feature_label, "value"),
            lambda e: f"feature error <b>{e:.3f}</b>" if math.isfinite(e) else "",
        )
        self._crops = widgets.HBox(
            [
                image_panel(self, "receptive field: original", "rf_original", "invviz-rf-original", CROP),
                image_panel(
                    self, "… and reconstruction", "rf_reconstruction", "invviz-rf-reconstruction", CROP
                ),
            ],
            layout=widgets.Layout(display="none"),
        )
        self.picker.display_size = PANEL
        picker_panel = widgets.VBox(
            [widgets.HTML("<b>neurons</b> (click, drag, shift+click)"), self.picker, self._channel_slider]
        )
        self.children = [
            widgets.HBox([self._source_controls(), widgets.VBox(sliders)]),
            self._run_controls(),
            widgets.HBox(
                [
                    image_panel(self, "original", "original", "invviz-original", PANEL),
                    image_panel(self, "reconstruction", "reconstruction", "invviz-reconstruction", PANEL),
                    picker_panel,
                ]
            ),
            widgets.HBox([self._crops, widgets.VBox([self._loss_plot, self._feature_label])]),
            self._error_label,
        ]
