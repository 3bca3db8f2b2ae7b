"""Widgets without a browser: drive traits and methods, assert state (small images, few steps)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from invviz.widgets import ChannelGallery, Explorer, NeuronPicker, RestartsView
from invviz.widgets._render import decode_png

SIZE = 64
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "00_explorer.ipynb"


@pytest.fixture
def explorer() -> Iterator[Explorer]:
    widget = Explorer(size=SIZE, iters=10, autorun=False)
    yield widget
    widget.close()


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def click(picker: NeuronPicker, rows: list[int], cols: list[int], mode: str) -> None:
    """What the canvas sends on a click (one cell) or a drag (a window)."""
    picker._handle_message(picker, {"kind": "select", "rows": rows, "cols": cols, "mode": mode}, [])


def test_package_ships_front_end() -> None:
    files = resources.files("invviz.widgets")
    for name in ("picker.js", "tiles.js", "invviz.css"):
        assert (files / name).is_file(), name
    assert "export default" in (files / "picker.js").read_text()


def test_explorer_runs_and_shows_images(explorer: Explorer) -> None:
    assert decode_png(explorer.original).shape == (SIZE, SIZE, 3)
    assert explorer.picker.shape == (8, 8)  # blocks.4 has stride 8
    explorer.run()
    explorer.wait(60)
    assert explorer.error == ""
    assert decode_png(explorer.reconstruction).shape == (SIZE, SIZE, 3)
    assert explorer.result is not None and explorer.result.steps == 10
    assert explorer.feature_error == pytest.approx(explorer.result.feature_error[0])
    assert explorer.status.startswith("done") and not explorer.running and explorer.progress == 1.0


def test_explorer_grey_reconstructs_a_grey_image(explorer: Explorer) -> None:
    explorer.grey = True
    explorer.run()
    explorer.wait(60)
    assert explorer.error == "" and explorer.result is not None and explorer.result.settings.grey
    assert _is_grey(decode_png(explorer.reconstruction))
    assert not explorer._grey_box.disabled
    explorer.model = "hog"  # grey anyway: the box is off at once, and the setting is not passed on
    assert explorer._grey_box.disabled
    explorer.wait(60)
    assert explorer._grey_box.disabled and explorer.error == ""
    assert explorer.result is not None and not explorer.result.settings.grey


def test_slider_change_supersedes_the_running_job(explorer: Explorer) -> None:
    explorer.iters = 2000  # long enough to be caught running (also schedules a run)
    explorer.run()
    first = explorer.job
    assert first is not None
    wait_for(lambda: explorer.reconstruction != b"")
    explorer.tv_weight = 2.0
    wait_for(lambda: explorer.job is not first)
    explorer.iters = 10
    explorer.wait(60)
    assert first.state == "cancelled"
    assert explorer.job is not None and explorer.job.state == "done"
    assert explorer.result is not None and explorer.result.settings.tv_weight == 2.0


def test_picker_click_drag_and_shift_click() -> None:
    picker = NeuronPicker()
    picker.set_activation(np.linspace(0, 1, 20).reshape(4, 5))
    click(picker, [1, 2], [2, 3], "toggle")
    assert picker.selected == [(1, 2)]
    click(picker, [1, 2], [2, 3], "toggle")
    assert picker.selected == []
    click(picker, [0, 2], [1, 4], "replace")  # a drag over a 2x3 window
    assert picker.selected == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    click(picker, [3, 4], [0, 1], "add")  # shift-click
    assert len(picker.selected) == 7 and (3, 0) in picker.selected
    click(picker, [0, 1], [0, 1], "replace")
    assert picker.selected == [(0, 0)]
    with pytest.raises(ValueError, match="outside the 4×5 grid"):
        picker.select_cells((3, 5), 0)
    picker.set_activation(np.zeros((2, 2)))  # a new grid clears the selection
    assert picker.mask == [[False, False], [False, False]]


def test_selection_reconstructs_from_neurons_with_receptive_field_crops(explorer: Explorer) -> None:
    explorer.run()
    explorer.wait(60)
    whole = explorer.reconstruction
    explorer.select_cells((1, 3), (2, 4))
    assert explorer.rf_box  # the crops appear at once, before the new job's first snapshot
    explorer.wait(60)
    assert explorer.error == ""
    assert explorer.reconstruction != whole
    rep = explorer._code_rep
    assert rep is not None
    box = rep.receptive_field((1, 3), (2, 4), SIZE, SIZE)
    assert explorer.rf_box == list(box.as_tuple())
    crop = decode_png(explorer.rf_original)
    assert crop.shape[0] / crop.shape[1] == pytest.approx(box.height / box.width, rel=0.05)
    assert decode_png(explorer.rf_reconstruction).shape == crop.shape
    mask = explorer._code_mask()
    assert mask is not None and mask[:, 1:3, 2:4].all() and mask.sum() == mask.shape[0] * 4
    explorer.channel = 5  # with cells selected, a channel narrows the neurons and re-runs
    mask = explorer._code_mask()
    assert mask is not None and mask.sum() == 4 and mask[5, 1:3, 2:4].all()
    explorer.wait(60)
    explorer.clear_selection()
    assert explorer.rf_box == [] and explorer.rf_original == b""
    assert explorer._code_mask() is None


def test_layer_and_model_change_update_the_picker(explorer: Explorer) -> None:
    explorer.layer = "blocks.1"
    explorer.wait(60)
    assert explorer.picker.shape == (16, 16)
    assert explorer.result is not None and explorer.result.spec == "efficientnet_lite0:blocks.1"
    rep = explorer._code_rep
    assert rep is not None and explorer.result.settings.tv_weight == rep.default_tv_weight()
    assert explorer.result.settings.tv_chroma == 0.0  # stride 4: plain TV
    explorer.layer = "blocks.10"  # the TV weight follows the layer's default...
    explorer.wait(60)
    assert explorer.result.settings.tv_weight == explorer._representation().default_tv_weight()
    assert explorer.result.settings.tv_chroma == 3.0 and explorer.tv_chroma == 3.0  # so does the colour TV
    explorer.tv_weight = 0.5  # ... until the user sets one
    explorer.tv_chroma = 1.5
    explorer.layer = "blocks.1"
    explorer.wait(60)
    assert explorer.result.settings.tv_weight == 0.5 and explorer.result.settings.tv_chroma == 1.5
    explorer.model = "hog"
    explorer.wait(60)
    assert explorer.layer == "features" and explorer.error == ""
    assert explorer.result is not None and explorer.result.spec == "hog:features"
    # HOG is polished on the 8-bit grid after its 10 steps; the loss plot holds the steps only.
    assert explorer.result.polished == 25 and explorer.progress == 1.0
    assert explorer._history and all(step <= 10 for step, _ in explorer._history)


def test_errors_are_shown_in_the_widget(explorer: Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    explorer.model = "alexnet"  # its ImageNet weights are not in the cache here
    explorer.wait(60)
    assert "alexnet" in explorer.error and explorer._error_label.layout.display == "block"
    assert not explorer.running
    explorer.model = "efficientnet_lite0"
    explorer.wait(60)
    assert explorer.error == "" and explorer._error_label.layout.display == "none"

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom in the worker")

    monkeypatch.setattr("invviz.widgets.explorer.invert", broken)
    explorer.run()
    explorer.wait(60)
    assert explorer.error == "RuntimeError: boom in the worker"
    assert explorer.job is not None and explorer.job.state == "failed" and not explorer.running

    junk = {
        "name": "junk.png",
        "type": "image/png",
        "size": 4,
        "content": memoryview(b"junk"),
        "last_modified": datetime.now(),
    }
    explorer._upload.value = (junk,)  # what the upload button sets
    assert "junk.png" not in explorer._image_choice.options
    assert explorer.error.startswith("ValueError")


def test_upload_offers_the_image(explorer: Explorer, tmp_path: Path) -> None:
    from invviz.images import sample_path

    explorer.add_image("my cat.jpg", sample_path("coffee").read_bytes())
    assert explorer.image_name == "my cat.jpg" and "my cat.jpg" in explorer._image_choice.options
    explorer.wait(60)
    assert explorer.error == "" and decode_png(explorer.original).shape == (SIZE, SIZE, 3)


def test_storm_of_slider_changes_ends_with_the_last() -> None:
    baseline = threading.active_count()
    other = Explorer(size=SIZE, iters=10, autorun=False)
    submitted = []
    submit = other.engine.submit_task

    def counting(*args: Any, **kwargs: Any) -> Any:
        job = submit(*args, **kwargs)
        submitted.append(job)
        return job

    other.engine.submit_task = counting  # type: ignore[method-assign]
    values = [0.01 * (i + 1) for i in range(200)]
    for index, value in enumerate(values):
        other.tv_weight = value
        if index % 50 == 49 and index < 199:
            time.sleep(0.5)  # let a debounced run start, so the next one has something to supersede
    other.wait(60)
    assert other.error == ""
    assert other.result is not None and other.result.settings.tv_weight == values[-1]
    assert 2 <= len(submitted) <= 5  # debounced: a handful of jobs for 200 changes
    assert submitted[-1] is other.job and other.job.state == "done"
    assert all(job.state in ("cancelled", "done") for job in submitted[:-1])
    other.close()
    wait_for(lambda: threading.active_count() == baseline, timeout=5)


def test_close_joins_every_thread() -> None:
    baseline = threading.active_count()
    widget = Explorer(size=SIZE, iters=500)
    widget.tv_weight = 3.0
    wait_for(lambda: widget.running)
    widget.close()
    assert threading.active_count() == baseline


def test_save_writes_view_and_settings(explorer: Explorer, tmp_path: Path) -> None:
    explorer.run()
    explorer.wait(60)
    explorer.select_cells(1, 1)
    explorer.wait(60)
    image_path, settings_path = explorer.save(tmp_path / "views" / "explorer")
    panels = decode_png(image_path.read_bytes())
    assert panels.shape[0] >= SIZE and panels.shape[1] > 2 * SIZE
    settings = json.loads(settings_path.read_text())
    assert settings["layer"] == "blocks.4" and settings["tv_weight"] == explorer.tv_weight
    assert settings["mask"][1][1] is True and settings["size"] == SIZE


def test_gallery_fills_tiles_progressively_and_enlarges_on_click() -> None:
    gallery = ChannelGallery(size=48, iters=6, channels="0-3", autorun=False)
    filled: list[int] = []
    gallery.grid.observe(lambda change: filled.append(sum(1 for t in change["new"] if t)), names=["tiles"])
    try:
        gallery.run()
        gallery.wait(60)
        assert gallery.error == "" and gallery.status.startswith("done")
        assert filled[0] == 0 and filled[1] == 1 and filled[-1] == 4  # blank grid, then tile by tile
        assert filled == sorted(filled)
        assert gallery.channel_list == [0, 1, 2, 3] and len(gallery.feature_errors) == 4
        assert all(decode_png(tile).shape == (48, 48, 3) for tile in gallery.tiles)
        gallery.grid.selected = 2  # what a click on the third tile does in the browser
        assert gallery.selected == 2 and gallery.enlarged == gallery.tiles[2]
        assert decode_png(gallery.activation).shape == (48, 48, 3)
        assert gallery._detail.layout.display == "flex"
        gallery.grid.selected = -1
        assert gallery.enlarged == b"" and gallery._detail.layout.display == "none"
        gallery.channels = "0-9999"
        gallery.wait(60)
        assert "out of range" in gallery.error
    finally:
        gallery.close()


def test_restarts_view_shows_k_different_reconstructions() -> None:
    view = RestartsView(size=48, iters=6, k=3, autorun=False)
    try:
        view.run()
        view.wait(60)
        assert view.error == "" and len(view.tiles) == 3 and len(set(view.tiles)) == 3
        assert view.diversity > 0 and len(view.feature_errors) == 3
        view.k = 2
        view.wait(60)
        assert len(view.tiles) == 2
        view.grey = True  # re-runs, grey
        view.wait(60)
        assert view.error == "" and all(_is_grey(decode_png(tile)) for tile in view.tiles)
    finally:
        view.close()


def test_grey_switch_starts_off_for_grey_models() -> None:
    view = RestartsView(model="dsift", size=32, iters=2, autorun=False)
    try:
        assert view._grey_box.disabled
        view.model = "efficientnet_lite0"
        assert not view._grey_box.disabled
    finally:
        view.close()


def test_gallery_grey_switch() -> None:
    gallery = ChannelGallery(size=32, iters=3, channels="0-1", grey=True, autorun=False)
    try:
        gallery.run()
        gallery.wait(60)
        assert gallery.error == "" and all(_is_grey(decode_png(tile)) for tile in gallery.tiles)
    finally:
        gallery.close()


def _is_grey(pixels: Any) -> bool:
    return bool(pixels.std() > 0 and (pixels == pixels[..., :1]).all())


def test_notebook_runs(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert all(cell.get("outputs", []) == [] for cell in notebook.cells)
    os.environ["INVVIZ_FAST"] = "1"
    try:
        NotebookClient(
            notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["INVVIZ_FAST"]
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in output.get("data", {}) for output in outputs)


def test_the_status_line_shows_the_time_left_while_running() -> None:
    from invviz.engine.jobs import Progress, Snapshot
    from invviz.widgets._base import progress_line

    def line(step: int, eta: float | None, final: bool = False, polishing: bool = False) -> str:
        progress = Progress(step, 200, {}, 0.25, eta, 1.0, polishing=polishing)
        return progress_line(Snapshot(progress, torch.zeros(1, 3, 2, 2), final))

    assert line(40, 12.4) == "step 40/200 · feature error 0.250 · 12 s left"
    assert line(40, 600.0).endswith("· 10 min left")
    assert line(150, 3.0, polishing=True).startswith("polishing 150/200")
    assert line(40, None) == line(200, 0.0, final=True).replace("200/200", "40/200") == "step 40/200 · feature error 0.250"
