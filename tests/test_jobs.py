"""The background job API: snapshots and their throttle, supersede, cancel, wait, divergence, errors,
and many rapid requests without leaking threads or deadlocking."""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support import tiny_net
from torch import Tensor

from invviz.engine import DivergenceError, InversionResult, Settings, Step, match
from invviz.engine.jobs import InversionEngine, Job, Reporter, Snapshot
from invviz.engine.objectives import Context, Objective
from invviz.representations import Representation

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

from conftest import TINY_SIZE as SIZE


@pytest.fixture
def engine() -> Iterator[InversionEngine]:
    with InversionEngine(device="cpu") as engine:
        yield engine


def resident_memory() -> int:
    """Current resident set size in bytes (Linux)."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("needs /proc to measure memory")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def counting_objective(rep: Representation, image: Tensor, calls: list[int], nan_at: int | None = None) -> Objective:
    """``match`` plus a zero term that counts evaluations (and returns NaN at evaluation ``nan_at``)."""

    def count(ctx: Context) -> Tensor:
        calls.append(1)
        value = math.nan if len(calls) == nan_at else 0.0
        return ctx.images.new_full((ctx.images.shape[0],), value)

    with torch.no_grad():
        target = rep(image[None])
    return match(rep, target) + Objective((("count", 1.0, count),))


def test_runs_and_publishes_first_and_final_snapshots(engine: InversionEngine, image: Tensor) -> None:
    seen: list[Snapshot] = []
    job = engine.submit(tiny_net(), image, settings=Settings(iters=30), on_snapshot=seen.append)
    result = job.wait(30)
    assert isinstance(result, InversionResult) and result.steps == 30
    assert job.state == "done" and job.done and job.error is None and job.result is result
    assert seen[0].progress.step <= 3 and not seen[0].final
    assert seen[-1].final and sum(s.final for s in seen) == 1
    assert job.latest is seen[-1]
    assert torch.equal(seen[-1].images, result.images)
    queued = [job.snapshots.get_nowait() for _ in range(job.snapshots.qsize())]
    assert queued == seen
    progress = job.progress
    assert progress is not None and progress.step == progress.total == 30 and progress.eta == 0
    assert set(progress.terms) == {"feature", "tv", "alpha"}
    # The loss really dropped, and the snapshot's feature error is the step's mean over the batch.
    assert seen[-1].progress.feature_error < seen[0].progress.feature_error
    assert seen[-1].images.dtype == torch.float32 and seen[-1].images.shape == (1, 3, SIZE, SIZE)
    assert seen[-1].png().startswith(b"\x89PNG")


@pytest.mark.parametrize("per_job", [False, True], ids=["engine rate", "job rate"])
def test_snapshots_are_throttled(image: Tensor, per_job: bool) -> None:
    """A task stepping every 2 ms for ~0.6 s publishes at most ``max_rate`` snapshots a second,
    the engine's or (when given) the job's own."""
    max_rate = 8.0 if per_job else 20.0
    times: list[tuple[float, Snapshot]] = []
    images = image[None]

    def task(reporter: Reporter) -> InversionResult:
        for step in range(1, 301):
            reporter.step(Step(step, 300, {"feature": [1.0 / step]}, [1.0 / step], images, 0.0))
            time.sleep(0.002)
        return InversionResult(images, [0.0], {}, Settings(), 0.0, 300)

    with InversionEngine(device="cpu", max_rate=20.0 if per_job else max_rate) as engine:
        job = engine.submit_task(
            task, on_snapshot=lambda s: times.append((time.perf_counter(), s)), max_rate=max_rate if per_job else None
        )
        job.wait(30)
    regular = [(t, s) for t, s in times if not s.final]
    assert regular[0][1].progress.step == 1
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(regular)]
    assert min(gaps) >= 1 / max_rate - 5e-3  # the copy between the throttle's clock and the callback varies
    assert 3 <= len(regular) <= max_rate * (regular[-1][0] - regular[0][0]) + 1
    assert times[-1][1].final and times[-1][1].progress.step == 300


def test_supersede_stops_the_older_job_within_one_iteration(engine: InversionEngine, image: Tensor) -> None:
    rep = tiny_net()
    calls: list[int] = []
    started = threading.Event()
    old = engine.submit(
        rep,
        image,
        settings=Settings(iters=1_000_000),
        objective=counting_objective(rep, image, calls),
        on_snapshot=lambda s: started.set(),
    )
    assert started.wait(30)
    new = engine.submit(tiny_net(), image, settings=Settings(iters=5, seed=1))
    at_supersede = len(calls)
    partial = old.wait(30)
    assert len(calls) - at_supersede <= 1
    assert old.state == "cancelled" and isinstance(partial, InversionResult) and partial.stopped
    assert old.latest is not None and old.latest.final
    result = new.wait(30)
    assert new.state == "done" and isinstance(result, InversionResult) and result.settings.seed == 1


def test_cancel_running_and_pending(engine: InversionEngine, image: Tensor) -> None:
    started = threading.Event()
    running = engine.submit(tiny_net(), image, settings=Settings(iters=1_000_000), on_snapshot=lambda s: started.set())
    pending = engine.submit(tiny_net(), image, settings=Settings(iters=5), supersede=False)
    assert started.wait(30)
    assert pending.state == "pending" and not pending.done
    pending.cancel()
    assert pending.state == "cancelled" and pending.wait(0) is None and pending.latest is None
    with pytest.raises(TimeoutError):
        running.wait(0.05)
    running.cancel()
    partial = running.wait(30)
    assert running.state == "cancelled"
    assert isinstance(partial, InversionResult) and partial.stopped and 0 < partial.steps < 1_000_000


def test_divergence_fails_and_keeps_the_last_good_image(engine: InversionEngine, image: Tensor) -> None:
    rep = tiny_net()
    calls: list[int] = []
    seen: list[Snapshot] = []
    job = engine.submit(
        rep,
        image,
        settings=Settings(iters=50),
        objective=counting_objective(rep, image, calls, nan_at=5),
        on_snapshot=seen.append,
    )
    with pytest.raises(DivergenceError, match="diverged at step 5"):
        job.wait(30)
    assert job.state == "failed" and isinstance(job.error, DivergenceError)
    assert job.progress is not None and job.progress.step == 4
    assert job.latest is not None and job.latest.final
    assert torch.isfinite(job.latest.images).all()
    assert torch.equal(job.latest.images, job.error.last_good)


@pytest.mark.parametrize("where", ["task", "arguments", "callback"])
def test_exceptions_are_captured(engine: InversionEngine, image: Tensor, where: str) -> None:
    def task(reporter: Reporter) -> InversionResult:
        raise RuntimeError("boom")

    def callback(snapshot: Snapshot) -> None:
        raise RuntimeError("boom")

    job: Job
    if where == "task":
        job = engine.submit_task(task)
    elif where == "arguments":
        job = engine.submit(tiny_net(), image[0])  # (H, W) is not an image
    else:
        job = engine.submit(tiny_net(), image, settings=Settings(iters=3), on_snapshot=callback)
    with pytest.raises((RuntimeError, ValueError)) as raised:
        job.wait(30)
    assert job.state == "failed" and job.error is raised.value
    # The engine keeps working after a failed job.
    assert engine.submit(tiny_net(), image, settings=Settings(iters=2)).wait(30) is not None


def test_engine_arguments_and_closing(image: Tensor) -> None:
    with pytest.raises(ValueError, match="max_rate"):
        InversionEngine(device="cpu", max_rate=0)
    with InversionEngine(device="cpu") as engine, pytest.raises(ValueError, match="max_rate"):
        engine.submit_task(lambda reporter: None, max_rate=-1)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="device"):
        InversionEngine(device="tpu")
    engine = InversionEngine(device="cpu")
    engine.close()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(tiny_net(), image)


def test_a_dropped_engine_stops_its_thread(image: Tensor) -> None:
    baseline = threading.active_count()
    engine = InversionEngine(device="cpu")
    engine.submit(tiny_net(), image, settings=Settings(iters=2)).wait(30)
    assert threading.active_count() == baseline + 1
    del engine
    deadline = time.monotonic() + 10
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == baseline


def test_many_rapid_requests(image: Tensor) -> None:
    """1,000 start/supersede/cancel cycles: the last request wins, no thread or memory leak."""
    rep = tiny_net()
    baseline = threading.active_count()
    memory = resident_memory()
    jobs: list[Job] = []
    with InversionEngine(device="cpu") as engine:
        for index in range(1000):
            job = engine.submit(rep, image, settings=Settings(iters=3, seed=index), supersede=index % 5 != 0)
            if index % 3 == 0:
                job.cancel()
            elif index % 50 == 1:  # now and then let it get running, so the next request supersedes a live loop
                while job.progress is None and not job.done:
                    time.sleep(0.001)
            jobs.append(job)
        last = engine.submit(rep, image, settings=Settings(iters=3, seed=1000))
        result = last.wait(30)
        for job in jobs:
            job.wait(30)  # raises if any failed
    assert threading.active_count() == baseline
    assert last.state == "done" and isinstance(result, InversionResult) and result.settings.seed == 1000
    assert all(job.state in ("done", "cancelled") for job in jobs)
    assert all(job.state == "cancelled" for job in jobs[::3])
    assert resident_memory() - memory < 200 * 2**20


def test_the_eta_counts_polishing_rounds_at_their_own_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 steps of 1 s, then 20 polishing rounds: the rounds are priced at ``ROUND_COST`` steps
    until timed, the first round's set-up is not taken for a round's cost, then rounds cost what
    they measure (the old estimate, elapsed / step × what is left, said 20 s after the steps)."""
    from invviz.engine import jobs

    clock = [0.0]
    monkeypatch.setattr(jobs.time, "perf_counter", lambda: clock[0])
    job = Job(lambda reporter: InversionResult(torch.zeros(1, 3, 2, 2), [], {}, Settings(), 0.0, 0), None)
    reporter = Reporter(job, max_rate=10.0)
    images = torch.zeros(1, 3, 2, 2)

    def event(number: int, seconds: float, polishing: bool) -> float | None:
        clock[0] += seconds
        reporter.step(Step(number, 30, {}, [0.5], images, clock[0], polishing=polishing, rounds=20))
        assert job.progress is not None
        return job.progress.eta

    etas = [event(number, 1.0, False) for number in range(1, 11)]
    assert etas[0] is None  # the first step includes the run's set-up
    assert etas[1] == pytest.approx(8 + 20 * jobs.ROUND_COST)
    assert etas[-1] == pytest.approx(20 * jobs.ROUND_COST)
    assert event(11, 5.0, True) == pytest.approx(19 * jobs.ROUND_COST)  # set-up: not a round's cost
    assert event(12, 0.25, True) == pytest.approx(18 * 0.25)
    assert event(13, 0.75, True) == pytest.approx(17 * 0.5)
    assert event(30, 0.5, True) == 0
