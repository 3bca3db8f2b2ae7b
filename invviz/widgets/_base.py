"""What every inversion widget shares: image and layer choice, debounced re-runs, one engine job at a
time, progress, and errors shown in the widget.

Threads: trait observers run in the kernel's main thread and only schedule work; the debounce thread
prepares the job (loading a model, an image) and submits it; the engine's worker thread runs it and
calls back with snapshots. The newest request always wins: a new job supersedes the running one, and
callbacks of an older job are recognised by their token and ignored.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import ipywidgets as widgets
import numpy as np
import torch
import traitlets

from ..engine import release_idle_pool
from ..engine.jobs import InversionEngine, Job, Reporter, Snapshot, TaskResult, time_left_text
from ..images import SAMPLES, load_image, png_bytes, sample_image
from ..representations import Representation, available_models, model_is_grey, model_layers, representation
from ._render import save_view

Result = TypeVar("Result", bound=TaskResult)
Work = Callable[[Reporter], Result]


class Debouncer:
    """Calls ``action`` once, ``delay`` seconds after the latest ``poke()``, on one lazily started thread."""

    def __init__(self, delay: float, action: Callable[[], None]) -> None:
        self.delay = delay
        self._action = action
        self._condition = threading.Condition()
        self._deadline: float | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        with self._condition:
            if self._closed:
                return
            self._deadline = time.monotonic() + self.delay
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="invviz-debounce", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def cancel(self) -> None:
        """Forget a pending call (a running one finishes)."""
        with self._condition:
            self._deadline = None
            self._condition.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running; ``False`` on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._deadline is None and not self._busy, timeout)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._deadline = None
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (self._deadline is None or self._deadline > time.monotonic()):
                    self._condition.wait(
                        None if self._deadline is None else self._deadline - time.monotonic()
                    )
                if self._closed:
                    return
                self._deadline = None
                self._busy = True
            try:
                self._action()
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()


def code_array(rep: Representation, image: torch.Tensor) -> np.ndarray:
    """The code of ``image`` ``(3, H, W)`` as a numpy array ``(C, H', W')`` (or ``(D,)``), for display."""
    device = next((p.device for p in rep.parameters()), torch.device("cpu"))
    with torch.no_grad():
        code = rep(image.to(device)[None])[0].float().cpu().numpy()
    release_idle_pool()  # the engine's worker may be computing: leave it the cores
    return code


class InversionWidget(widgets.VBox, Generic[Result]):
    """Base of the widgets that invert an image's code at one layer in engine jobs.

    Subclasses implement ``_prepare()`` (build the job's work; runs off the main thread when
    debounced), ``_show(snapshot)`` (live and final snapshots, worker thread), ``_finish(result)``
    (after the final snapshot, worker thread) and ``_view_panels()`` (PNGs for ``save``). Changing
    any trait named in ``rerun_on`` re-runs the job after ``debounce`` seconds of quiet.
    """

    image_name = traitlets.Unicode("chelsea", help="a bundled sample, or an uploaded image's name")
    model = traitlets.Unicode("efficientnet_lite0")
    layer = traitlets.Unicode("blocks.4")
    iters = traitlets.Int(200, min=1)
    size = traitlets.Int(224, min=8, help="side of the (square) image in pixels")
    running = traitlets.Bool(False, help="a job of this widget is running")
    progress = traitlets.Float(0.0, help="fraction of the current job done, 0 to 1")
    status = traitlets.Unicode("", help="one line about the current job")
    error = traitlets.Unicode("", help="the last error, shown in the widget; empty when all is well")
    original = traitlets.Bytes(b"", help="PNG of the image being inverted")
    grey = traitlets.Bool(False, help="reconstruct grey images (for grey photos; see Settings.grey)")

    rerun_on: tuple[str, ...] = ("image_name", "model", "layer", "iters", "grey")
    #: snapshots per second of this widget's jobs (``None``: the engine's rate).
    snapshot_rate: float | None = None

    def __init__(
        self,
        *,
        engine: InversionEngine | None = None,
        device: str | torch.device = "auto",
        debounce: float = 0.3,
        **traits: Any,
    ) -> None:
        super().__init__(**traits)
        layers = model_layers(self.model)
        if self.layer not in layers:
            self.layer = layers[len(layers) // 2]
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else InversionEngine(device=device)
        self.job: Job | None = None
        self._token: object | None = None
        self._lock = threading.RLock()
        self._local = threading.local()
        self._uploads: dict[str, bytes] = {}
        self._representations: dict[str, Representation] = {}
        self._images: dict[tuple[str, int], torch.Tensor] = {}
        self._debouncer = Debouncer(debounce, self._reporting(self._start))
        self._build_common_controls()
        self.observe(self._reporting(self._on_model), names=["model"])
        self.observe(self._on_error, names=["error"])
        self.observe(self._reporting(lambda _change: self._schedule()), names=list(self.rerun_on))

    # --- public -----------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """``"model:layer"`` as ``invviz.representation`` takes it."""
        return f"{self.model}:{self.layer}"

    def run(self) -> None:
        """Start a job with the current settings now, superseding any running one."""
        self._debouncer.cancel()
        self._reporting(self._start)()

    def stop(self) -> None:
        """Stop the running job; what it reached stays on show."""
        self._debouncer.cancel()
        if self.job is not None:
            self.job.cancel()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a pending re-run has started and the current job has ended (scripts, tests)."""
        began = time.monotonic()
        if not self._debouncer.wait_idle(timeout):
            raise TimeoutError(f"a debounced re-run did not start within {timeout} s")
        job = self.job
        if job is None:
            return
        remaining = None if timeout is None else max(timeout - (time.monotonic() - began), 0.0)
        try:
            job.wait(remaining)
        except TimeoutError:
            raise
        except Exception:  # noqa: BLE001
            return  # a failed job's error is already on show in the widget

    def add_image(self, name: str, data: bytes) -> None:
        """Offer an encoded image (what the upload button does) and select it."""
        load_image(data)  # a file that cannot be decoded fails here, with a clear line
        self._uploads[name] = data
        self._image_choice.options = [*SAMPLES, *self._uploads]
        self.image_name = name

    def settings(self) -> dict[str, object]:
        """The traits that define the job, as JSON-able values."""
        return {name: getattr(self, name) for name in ("size", *self.rerun_on)}

    def save(self, path_prefix: str | Path) -> tuple[Path, Path]:
        """Write ``PREFIX.png`` (what the widget shows) and ``PREFIX.json`` (its settings)."""
        return save_view(path_prefix, self._view_panels(), self.settings())

    def close(self) -> None:
        """Stop the job and the widget's threads, then close the widget and its children."""
        self._debouncer.close()
        if self.job is not None:
            self.job.cancel()
        if self._owns_engine:
            self.engine.close()
        elif self.job is not None:
            self.job.wait()
        _close_tree(self.children)
        super().close()

    # --- for subclasses ---------------------------------------------------------------------------
    def _prepare(self) -> Work[Result]:
        raise NotImplementedError

    def _show(self, snapshot: Snapshot) -> None:
        raise NotImplementedError

    def _finish(self, result: Result) -> None:
        raise NotImplementedError

    def _view_panels(self) -> list[bytes]:
        raise NotImplementedError

    def _schedule(self) -> None:
        """Re-run after the debounce delay (the latest request wins), unless changes are quiet."""
        if not self._is_quiet():
            self._debouncer.poke()

    @contextmanager
    def _quietly(self) -> Iterator[None]:
        """Trait changes this thread makes inside do not schedule a re-run (preparation adjusting traits)."""
        self._local.quiet = True
        try:
            yield
        finally:
            self._local.quiet = False

    def _is_quiet(self) -> bool:
        return getattr(self._local, "quiet", False)

    def _representation(self) -> Representation:
        """The current layer's representation, on the engine's device (cached per spec)."""
        spec = self.spec
        if spec not in self._representations:
            self._representations[spec] = representation(spec).to(self.engine.device)
        return self._representations[spec]

    def _grey(self, rep: Representation) -> bool:
        """``Settings.grey`` for ``rep``: the switch, where the representation is not grey anyway."""
        return self.grey and not rep.grayscale

    def _image(self) -> torch.Tensor:
        """The current image ``(3, size, size)`` in [0, 1] (cached); keeps ``original`` in step."""
        key = (self.image_name, self.size)
        if key not in self._images:
            name = self.image_name
            if name in self._uploads:
                self._images[key] = load_image(self._uploads[name], self.size)
            elif name in SAMPLES:
                self._images[key] = sample_image(name, self.size)
            else:
                raise ValueError(
                    f"unknown image {name!r}; choose a sample ({', '.join(SAMPLES)}) or upload one"
                )
        image = self._images[key]
        self.original = png_bytes(image)
        return image

    def _source_controls(self) -> widgets.VBox:
        """Image chooser and upload, model dropdown, layer slider, iterations, the grey switch."""
        return widgets.VBox(
            [
                widgets.HBox([self._image_choice, self._upload]),
                self._model_choice,
                self._layer_slider,
                self._iters_slider,
                self._grey_box,
            ]
        )

    def _run_controls(self) -> widgets.HBox:
        """Run/stop, progress bar and status line."""
        return widgets.HBox([self._run_button, self._stop_button, self._progress_bar, self._status_label])

    def _reporting(self, action: Callable[..., None]) -> Callable[..., None]:
        """``action`` with any exception shown in the widget's error line instead of lost in a thread."""

        def guarded(*args: Any) -> None:
            try:
                action(*args)
            except Exception as error:  # noqa: BLE001 - shown to the user, that is the point
                self.error = f"{type(error).__name__}: {error}"
                self.status = "failed (see the error below)"
                self.running = False

        return guarded

    # --- machinery --------------------------------------------------------------------------------
    def _build_common_controls(self) -> None:
        wide = control_style()
        self._image_choice = widgets.Dropdown(
            options=list(SAMPLES),
            description="image",
            style=wide["style"],
            layout=widgets.Layout(width="265px"),
        )
        self._upload = widgets.FileUpload(
            accept="image/*", multiple=False, description="upload", layout=widgets.Layout(width="95px")
        )
        self._model_choice = widgets.Dropdown(options=available_models(), description="model", **wide)
        self._layer_slider = widgets.SelectionSlider(
            options=model_layers(self.model), description="layer", continuous_update=False, **wide
        )
        self._iters_slider = widgets.IntSlider(
            min=1, max=1000, description="iterations", continuous_update=False, **wide
        )
        # HOG and SIFT reconstruct grey images anyway (kept up to date by _on_model).
        self._grey_box = widgets.Checkbox(
            description="grey reconstruction", indent=False, disabled=model_is_grey(self.model)
        )
        for trait, control in [
            ("image_name", self._image_choice),
            ("model", self._model_choice),
            ("layer", self._layer_slider),
            ("iters", self._iters_slider),
            ("grey", self._grey_box),
        ]:
            traitlets.link((self, trait), (control, "value"))
        self._upload.observe(self._reporting(self._on_upload), names=["value"])
        self._run_button = widgets.Button(description="Run", icon="play", layout=widgets.Layout(width="80px"))
        self._stop_button = widgets.Button(
            description="Stop", icon="stop", layout=widgets.Layout(width="80px")
        )
        # Through the debouncer, so that loading a model never blocks the kernel's main thread.
        self._run_button.on_click(lambda _button: self._schedule())
        self._stop_button.on_click(lambda _button: self.stop())
        self._progress_bar = widgets.FloatProgress(min=0.0, max=1.0, layout=widgets.Layout(width="200px"))
        self._status_label = widgets.Label().add_class("invviz-status")
        self._error_label = widgets.HTML(layout=widgets.Layout(display="none")).add_class("invviz-error")
        traitlets.dlink((self, "progress"), (self._progress_bar, "value"))
        traitlets.dlink((self, "status"), (self._status_label, "value"))

    def _on_model(self, change: dict[str, Any]) -> None:
        self._grey_box.disabled = model_is_grey(change["new"])
        layers = model_layers(change["new"])
        keep = self.layer if self.layer in layers else layers[len(layers) // 2]
        self._layer_slider.options = layers  # resets the slider (and, linked, the layer) to the first layer
        self.layer = keep

    def _on_upload(self, change: dict[str, Any]) -> None:
        for upload in change["new"]:
            self.add_image(upload["name"], bytes(upload["content"]))

    def _on_error(self, change: dict[str, Any]) -> None:
        message = change["new"]
        self._error_label.value = f"<b>Error</b>: {_escape(message)}" if message else ""
        self._error_label.layout.display = "block" if message else "none"

    def _start(self) -> None:
        with self._lock:
            work = self._prepare()
            token = object()
            self._token = token
            self.error = ""
            self.progress = 0.0
            self.running = True
            self.status = "starting…"
            outcome: list[Result] = []

            def task(reporter: Reporter) -> Result:
                try:
                    result = work(reporter)
                except Exception as error:
                    if self._token is token:
                        self._reporting(_raise)(error)
                    raise
                outcome.append(result)
                return result

            def on_snapshot(snapshot: Snapshot) -> None:
                # A superseded job's late snapshots must not overwrite the newer job's display.
                if self._token is not token:
                    return
                self._reporting(self._show)(snapshot)
                if snapshot.final:
                    if outcome:
                        self._reporting(self._finish)(outcome[0])
                    self.running = False

            self.job = self.engine.submit_task(task, on_snapshot=on_snapshot, max_rate=self.snapshot_rate)


def control_style() -> dict[str, Any]:
    """Keyword arguments that give a labelled control the common width (a fresh layout each call)."""
    return {"style": {"description_width": "115px"}, "layout": widgets.Layout(width="360px")}


def image_panel(
    owner: traitlets.HasTraits, title: str, trait: str, css_class: str, side: int
) -> widgets.VBox:
    """A titled image box showing ``owner``'s PNG trait ``trait`` at ``side`` CSS pixels."""
    image = widgets.Image(
        format="png", layout=widgets.Layout(width=f"{side}px", height=f"{side}px", object_fit="contain")
    )
    image.add_class("invviz-image").add_class(css_class)
    traitlets.dlink((owner, trait), (image, "value"))
    return widgets.VBox([widgets.HTML(f"<b>{title}</b>"), image])


def _close_tree(children: tuple[widgets.Widget, ...]) -> None:
    for child in children:
        _close_tree(getattr(child, "children", ()))
        child.close()


def _raise(error: Exception) -> None:
    raise error


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def progress_line(snapshot: Snapshot) -> str:
    """``"step 40/200 · feature error 0.312 · 6 s left"`` (``"polishing 1020/1400 · …"`` after the
    steps); the time left is the job's ETA, shown while the job runs."""
    progress = snapshot.progress
    error = f" · feature error {progress.feature_error:.3f}" if math.isfinite(progress.feature_error) else ""
    running = not snapshot.final and progress.step < progress.total
    left = f" · {time_left_text(progress.eta)}" if running and progress.eta is not None else ""
    return f"{'polishing' if progress.polishing else 'step'} {progress.step}/{progress.total}{error}{left}"
