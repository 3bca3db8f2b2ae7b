"""Inversions in a background thread: jobs with progress, throttled snapshots, cancel and supersede.

One ``InversionEngine`` owns one worker thread; only that thread touches torch for a job. Callers
(widgets, notebooks) read ``job.progress`` / ``job.latest``, take snapshots from ``job.snapshots`` or
an ``on_snapshot`` callback, and stop a job with ``job.cancel()`` or by submitting a newer one.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, Self

import torch
from torch import Tensor

from ..images import png_bytes
from ..representations import Representation
from ._device import resolve_device
from ._threads import release_idle_pool
from .loop import DivergenceError, InversionResult, Settings, Step, invert
from .objectives import Objective

JobState = Literal["pending", "running", "done", "cancelled", "failed"]

#: Snapshots a job's queue keeps when nobody drains it; the oldest are dropped first, so the final
#: snapshot is always there. Bounded because a gallery snapshot can be tens of megabytes.
SNAPSHOT_QUEUE_SIZE = 32
#: A polishing round's cost in steps, for the ETA until rounds are timed (at 256² measured 0.6-0.8
#: for HOG, 0.35-0.45 for DSIFT).
ROUND_COST = 0.6
#: Steps within which the first snapshot is published whatever the throttle says.
FIRST_SNAPSHOT_STEPS = 3


class TaskResult(Protocol):
    """What a task returns: ``InversionResult`` or ``GalleryResult`` (images ``(N, 3, H, W)``)."""

    images: Tensor


@dataclass(frozen=True)
class Progress:
    """Where a job stands. ``terms`` and ``feature_error`` are means over the batch (NaN if unknown);
    ``eta``: seconds left (``TimeLeft``; ``None`` before anything is timed); ``elapsed``: seconds
    since the job started; ``polishing``: the steps are done and the result is being polished
    (``Settings.polish``)."""

    step: int
    total: int
    terms: dict[str, float]
    feature_error: float
    eta: float | None
    elapsed: float
    polishing: bool = False


@dataclass(frozen=True)
class Snapshot:
    """A detached copy of a job's images ``(B, 3, H, W)`` float32 on the CPU in [0, 1].

    ``tiles`` is ``None`` when ``images`` is the whole batch; otherwise ``images[i]`` is entry
    ``tiles[i]`` of the batch (a gallery publishes only the chunk being optimized).
    """

    progress: Progress
    images: Tensor
    final: bool
    tiles: list[int] | None = None

    def png(self, index: int = 0) -> bytes:
        """PNG bytes of ``images[index]`` (encode in the caller's thread, not in the worker)."""
        return png_bytes(self.images[index])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _detached(images: Tensor) -> Tensor:
    return images.detach().to("cpu", torch.float32, copy=True).clamp_(0, 1)


class TimeLeft:
    """Estimates the seconds a run has left from its ``Step`` s, seen one by one (``invert``'s
    ``on_step``): the steps and polishing rounds still to come, each at its own measured cost (a
    round, until one is timed, at ``ROUND_COST`` steps). The first round's time is not a round's:
    it includes polishing's set-up (the choice of rounding offset), and the first step's is not a
    step's either: it includes the run's set-up (moving the model, the target code, the kernels),
    which made the first estimates of a process's first run tens of times too long."""

    def __init__(self, began: float) -> None:
        self._last_event = began
        self._spent = {False: 0.0, True: 0.0}
        self._seen = {False: 0, True: 0}

    def __call__(self, step: Step, now: float) -> float | None:
        """Seconds left after ``step``, seen at ``now`` (``time.perf_counter``); ``None`` if unknown."""
        setting_up = not self._seen[step.polishing]  # the first step, or the first round
        self._spent[step.polishing] += 0.0 if setting_up else now - self._last_event
        self._seen[step.polishing] += 1
        self._last_event = now
        steps, rounds = self._seen[False], self._seen[True]
        per_step = self._spent[False] / (steps - 1) if steps > 1 else None
        per_round = self._spent[True] / (rounds - 1) if rounds > 1 else None
        if per_round is None and per_step is not None:
            per_round = per_step * ROUND_COST
        if per_round is None or per_step is None:  # no step before the first polishing round
            return None
        left = max(step.total - step.step, 0)
        rounds_left = min(max(step.rounds - rounds, 0), left)
        steps_left = left - rounds_left
        return steps_left * per_step + rounds_left * per_round


def time_left_text(seconds: float | None) -> str:
    """``"12 s left"``, ``"3 min left"`` (from 90 s on); ``""`` when unknown."""
    if seconds is None:
        return ""
    return f"{seconds:.0f} s left" if seconds < 90 else f"{seconds / 60:.0f} min left"


class Reporter:
    """The worker-side half of a job: publishes progress and throttled snapshots, holds ``stop``."""

    def __init__(self, job: Job, max_rate: float) -> None:
        self.job = job
        self.stop = job._stop
        self._interval = 1.0 / max_rate
        self._began = time.perf_counter()
        self._last_published: float | None = None
        self._time_left = TimeLeft(self._began)

    def step(self, step: Step, tiles: list[int] | None = None) -> None:
        """Record ``step`` as the job's progress; publish a snapshot if the throttle allows.

        Usable as ``invert(on_step=reporter.step)`` and ``channel_gallery(on_step=reporter.step)``.
        """
        now = time.perf_counter()
        elapsed = now - self._began
        progress = Progress(
            step=step.step,
            total=step.total,
            terms={name: _mean(values) for name, values in step.terms.items()},
            feature_error=_mean(step.feature_error),
            eta=self._time_left(step, now),
            elapsed=elapsed,
            polishing=step.polishing,
        )
        self.job.progress = progress
        due = (
            step.step <= FIRST_SNAPSHOT_STEPS
            if self._last_published is None
            else now - self._last_published >= self._interval
        )
        if due:
            self._last_published = now
            self.job._publish(Snapshot(progress, _detached(step.images), final=False, tiles=tiles))

    on_step = step

    def final(self, images: Tensor) -> None:
        """Publish the final snapshot of ``images`` ``(B, 3, H, W)``, whatever the throttle says."""
        progress = self.job.progress or Progress(0, 0, {}, math.nan, None, time.perf_counter() - self._began)
        self.job._publish(Snapshot(progress, _detached(images), final=True))


Task = Callable[[Reporter], TaskResult]
SnapshotCallback = Callable[[Snapshot], None]


class Job:
    """A handle on one submitted inversion. Read it from any thread; it is updated by the worker."""

    def __init__(self, task: Task, on_snapshot: SnapshotCallback | None, max_rate: float | None = None) -> None:
        self.state: JobState = "pending"
        self.max_rate = max_rate
        self.progress: Progress | None = None
        self.latest: Snapshot | None = None
        self.snapshots: queue.Queue[Snapshot] = queue.Queue(maxsize=SNAPSHOT_QUEUE_SIZE)
        self.result: TaskResult | None = None
        self.error: BaseException | None = None
        self._task = task
        self._on_snapshot = on_snapshot
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Stop the job: a pending one ends now, a running one within one iteration."""
        self._stop.set()
        with self._lock:
            if self.state == "pending":
                self._finish("cancelled")

    def wait(self, timeout: float | None = None) -> TaskResult | None:
        """Block until the job ends; return its result (partial if cancelled, ``None`` if it never
        started), or raise its error. ``TimeoutError`` if ``timeout`` seconds pass first."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job still {self.state} after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        step = f" step {self.progress.step}/{self.progress.total}" if self.progress else ""
        return f"<Job {self.state}{step}>"

    # --- worker side --------------------------------------------------------------------------
    def _publish(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        while True:
            try:
                self.snapshots.put_nowait(snapshot)
                break
            except queue.Full:
                try:
                    self.snapshots.get_nowait()
                except queue.Empty:
                    pass
        if self._on_snapshot is not None:
            self._on_snapshot(snapshot)

    def _finish(self, state: JobState) -> None:
        self.state = state
        self._task = None  # type: ignore[assignment]  # release what the task closed over
        self._finished.set()

    def _run(self, max_rate: float) -> None:
        with self._lock:
            if self.state != "pending":
                return
            self.state = "running"
            task = self._task
        reporter = Reporter(self, self.max_rate or max_rate)
        state: JobState = "failed"
        try:
            result = self.result = task(reporter)
            state = "cancelled" if self._stop.is_set() else "done"
            reporter.final(result.images)
        except DivergenceError as error:
            self.error = error
            try:
                reporter.final(error.last_good)
            except Exception as callback_error:  # noqa: BLE001  # reported with, not instead of, the divergence
                error.add_note(f"then the on_snapshot callback raised {callback_error!r}")
        except BaseException as error:  # noqa: BLE001  # even SystemExit: the worker must live on to run the next job
            self.error = error
        finally:
            if state != "failed" and self.error is not None:
                state = "failed"
            with self._lock:
                self._finish(state)


def _work(jobs: queue.SimpleQueue[Job | None], max_rate: float) -> None:
    # Holds no reference to the engine, so an engine that is dropped gets collected and stops this.
    while (job := jobs.get()) is not None:
        job._run(max_rate)
        if jobs.empty():
            release_idle_pool()  # so torch in other threads runs at full speed between jobs


def _check_rate(max_rate: float) -> None:
    if isinstance(max_rate, bool) or not isinstance(max_rate, (int, float)) or not max_rate > 0 or not math.isfinite(max_rate):
        raise ValueError(f"max_rate must be a positive number of snapshots per second, got {max_rate!r}")


class InversionEngine:
    """Runs inversions one at a time in one background (daemon) worker thread, started lazily.

    ``device``: where jobs run (``"auto"``: CUDA when present). ``max_rate``: most snapshots per
    second each job publishes (plus its first and final ones). Use as a context manager, or call
    ``close()``, to stop and join the worker.
    """

    def __init__(self, device: str | torch.device = "auto", max_rate: float = 10.0) -> None:
        _check_rate(max_rate)
        self.device = resolve_device(device)
        self.max_rate = float(max_rate)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._active: list[Job] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, self._jobs.put, None)

    def submit(
        self,
        rep: Representation,
        image: Tensor | None = None,
        *,
        target: Tensor | None = None,
        size: tuple[int, int] | None = None,
        mask: Tensor | None = None,
        settings: Settings | None = None,
        batch: int = 1,
        init: Tensor | None = None,
        objective: Objective | None = None,
        supersede: bool = True,
        on_snapshot: SnapshotCallback | None = None,
        max_rate: float | None = None,
    ) -> Job:
        """Start ``invert(rep, image, ...)`` in the worker (same keywords); see ``submit_task``."""
        device = self.device

        def task(reporter: Reporter) -> InversionResult:
            return invert(
                rep,
                image,
                target=target,
                size=size,
                mask=mask,
                settings=settings,
                objective=objective,
                batch=batch,
                init=init,
                device=device,
                on_step=reporter.step,
                stop=reporter.stop,
            )

        return self.submit_task(task, supersede=supersede, on_snapshot=on_snapshot, max_rate=max_rate)

    def submit_task(
        self,
        fn: Task,
        *,
        supersede: bool = True,
        on_snapshot: SnapshotCallback | None = None,
        max_rate: float | None = None,
    ) -> Job:
        """Run ``fn(reporter)`` in the worker; it returns a result with ``images`` ``(N, 3, H, W)``.

        ``supersede=True`` cancels every running and pending job first (the latest request wins).
        ``on_snapshot`` is called in the worker thread: it must not touch torch, and an exception
        it raises fails the job. ``max_rate`` overrides the engine's snapshots per second for this job.
        """
        if max_rate is not None:
            _check_rate(max_rate)
        job = Job(fn, on_snapshot, max_rate)
        release_idle_pool()  # this thread's idle OpenMP threads would halve the worker's speed
        with self._lock:
            if self._closed:
                raise RuntimeError("this InversionEngine is closed; create a new one")
            self._active = [active for active in self._active if not active.done]
            if supersede:
                for active in self._active:
                    active.cancel()
            self._active.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_work, args=(self._jobs, self.max_rate), name="invviz-engine", daemon=True
                )
                self._thread.start()
            self._jobs.put(job)
        return job

    def cancel(self) -> None:
        """Cancel every running and pending job."""
        with self._lock:
            for job in self._active:
                job.cancel()

    def close(self, timeout: float | None = None) -> None:
        """Cancel all jobs and join the worker thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for job in self._active:
                job.cancel()
            self._active.clear()
        self._finalizer()  # queues the sentinel that ends the worker
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
