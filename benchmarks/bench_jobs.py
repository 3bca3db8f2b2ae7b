"""Speed and memory of background jobs and galleries (issue 4). Prints a table.

    python3 benchmarks/bench_jobs.py            # about 2-3 minutes on a 2-core CPU
    python3 benchmarks/bench_jobs.py --quick    # a rough look in well under a minute
    python3 benchmarks/bench_jobs.py --only gpu # just the batched-gallery throughput (needs CUDA)

Timings are noisy on a shared CPU: check ``uptime`` first, and compare numbers from one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

from invviz import Settings, invert, representation, sample_image
from invviz.engine import InversionResult, Step
from invviz.engine.analyses import channel_gallery
from invviz.engine.jobs import InversionEngine, Job, Reporter, Snapshot
from invviz.representations import Representation

SPEC = "efficientnet_lite0:blocks.4"
GALLERY_SPEC = "efficientnet_lite0:blocks.10"
SIZE = 224


@dataclass
class Row:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None


def first_snapshot_latency(rep: Representation, image: torch.Tensor, repeats: int) -> list[float]:
    """Seconds from ``submit`` to the first snapshot; the first entry is the engine's first job."""
    latencies = []
    with InversionEngine(device="cpu") as engine:
        for _ in range(repeats):
            arrived = threading.Event()

            def on_snapshot(snapshot: Snapshot, event: threading.Event = arrived) -> None:
                event.set()

            began = time.perf_counter()
            job = engine.submit(rep, image, settings=Settings(iters=1000), on_snapshot=on_snapshot)
            arrived.wait()
            latencies.append(time.perf_counter() - began)
            job.cancel()
            job.wait()
    return latencies


def bare_iteration(rep: Representation, image: torch.Tensor, iters: int) -> float:
    """Seconds per forward + backward of the truncated net alone, ``(1, 3, H, W)``."""
    x = image[None].clone().requires_grad_(True)
    rep(x).square().sum().backward()  # warm-up
    began = time.perf_counter()
    for _ in range(iters):
        x.grad = None
        rep(x).square().sum().backward()
    return (time.perf_counter() - began) / iters


def job_iteration(engine: InversionEngine, rep: Representation, image: torch.Tensor, iters: int) -> float:
    """Seconds per iteration of a background job, from its first to its last step."""
    seen: list[Snapshot] = []
    engine.submit(rep, image, settings=Settings(iters=iters + 1), on_snapshot=seen.append).wait()
    first, last = seen[0].progress, seen[-1].progress
    return (last.elapsed - first.elapsed) / (last.step - first.step)


def invert_iteration(rep: Representation, image: torch.Tensor, iters: int) -> float:
    """Seconds per iteration of ``invert`` called directly (no job machinery)."""
    times: dict[int, float] = {}

    def record(step: Step) -> None:
        times[step.step] = step.seconds

    invert(rep, image, settings=Settings(iters=iters + 1), device="cpu", on_step=record)
    return (times[iters + 1] - times[1]) / iters


def bookkeeping_per_step(image: torch.Tensor, seconds: float) -> float:
    """Seconds a job spends per step on progress and throttled snapshots (``Reporter.step``), run
    for ``seconds`` so the snapshot copies happen at the real rate."""
    never_run = InversionResult(image[None], [], {}, Settings(), 0.0, 0)
    reporter = Reporter(Job(lambda _: never_run, None), max_rate=10.0)
    terms = {"feature": [0.5], "tv": [0.1], "alpha": [0.01]}
    began = time.perf_counter()
    steps = 0
    while time.perf_counter() - began < seconds:
        steps += 1
        reporter.step(Step(steps, 10**9, terms, [0.7], image[None], 0.0))
    return (time.perf_counter() - began) / steps


PEAK_RSS_SCRIPT = """
import resource, sys
from invviz import Settings, representation, sample_image
from invviz.engine.jobs import InversionEngine
rep = representation(sys.argv[1])
with InversionEngine(device="cpu") as engine:
    engine.submit(rep, sample_image("chelsea", 224), settings=Settings(iters=int(sys.argv[2]))).wait()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(spec: str, iters: int) -> int:
    """Peak resident memory in bytes of a fresh process running one 224² job (Linux: ru_maxrss in KiB)."""
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, spec, str(iters)], capture_output=True, text=True, check=True
    )
    return int(completed.stdout.split()[-1])


def gallery_seconds(rep: Representation, image: torch.Tensor, channels: int, iters: int, device: str, chunk: int | None) -> float:
    began = time.perf_counter()
    channel_gallery(rep, image, list(range(channels)), settings=Settings(iters=iters), device=device, chunk=chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def cpu_rows(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    rep = representation(SPEC)
    image = sample_image("chelsea", SIZE)
    rows = []

    latencies = first_snapshot_latency(rep, image, repeats=2 if quick else 4)
    warm = statistics.median(latencies[1:])
    rows.append(Row("first snapshot, first job (s)", f"{latencies[0]:.2f}", "<= 1.0", latencies[0] <= 1.0))
    rows.append(Row("first snapshot, later jobs (s, median)", f"{warm:.2f}", "<= 1.0", warm <= 1.0))

    iters = 10 if quick else 20
    # This kind of machine's speed drifts by ±20 % over seconds, so each round measures the three
    # back to back (order rotated) and the ratios are taken within a round: the median over rounds.
    with InversionEngine(device="cpu") as engine:
        measures = {
            "bare": lambda: bare_iteration(rep, image, iters),
            "loop": lambda: invert_iteration(rep, image, iters),
            "job": lambda: job_iteration(engine, rep, image, iters),
        }
        rounds: list[dict[str, float]] = []
        for repeat in range(3 if quick else 12):
            names = list(measures)[repeat % 3 :] + list(measures)[: repeat % 3]
            rounds.append({name: measures[name]() for name in names})
    job_bare = statistics.median(r["job"] / r["bare"] for r in rounds)
    job_loop = statistics.median(r["job"] / r["loop"] for r in rounds)
    loop = statistics.median(r["loop"] for r in rounds)
    bookkeeping = bookkeeping_per_step(image, 1.0)
    for name, label in (("bare", "bare forward+backward"), ("loop", "invert() loop"), ("job", "background job")):
        rows.append(Row(f"{label} (ms/iter, median)", f"{1e3 * statistics.median(r[name] for r in rounds):.1f}"))
    rows.append(Row("job / bare forward+backward (median of rounds)", f"{job_bare:.3f}", "<= 1.05", job_bare <= 1.05))
    rows.append(Row("job / invert() (job machinery alone)", f"{job_loop:.3f}"))
    rows.append(Row("job bookkeeping per step (ms, measured alone)", f"{1e3 * bookkeeping:.3f}"))
    rows.append(Row("  as a fraction of an invert() step", f"{bookkeeping / loop:.4f}", "<= 0.01", bookkeeping / loop <= 0.01))

    for spec in [SPEC] if quick else [SPEC, "efficientnet_lite0:logits"]:
        peak = peak_rss(spec, 5 if quick else 20) / 2**30
        rows.append(Row(f"peak RSS, one 224² job, {spec.split(':')[1]} (GiB)", f"{peak:.2f}", "<= 1.5 GB", peak * 2**30 <= 1.5e9))

    gallery_iters = 5 if quick else 20
    seconds = gallery_seconds(rep, image, 16, gallery_iters, "cpu", chunk=None)
    rows.append(Row(f"16-channel gallery, {gallery_iters} iters, CPU (s)", f"{seconds:.1f}"))
    rows.append(Row("  per image-iteration (ms)", f"{1e3 * seconds / (16 * gallery_iters):.1f}"))
    return rows


def gpu_rows(quick: bool, channels: int = 64) -> list[Row]:
    if not torch.cuda.is_available():
        return [Row("64-channel gallery, batched vs one by one", "skipped: no CUDA")]
    rep = representation(GALLERY_SPEC)  # blocks.4 has only 40 channels
    image = sample_image("chelsea", SIZE)
    iters = 20 if quick else 50
    singles = 4 if quick else 8
    gallery_seconds(rep, image, channels, 2, "cuda", chunk=None)  # warm-up: cuDNN autotuning, allocator
    batched = gallery_seconds(rep, image, channels, iters, "cuda", chunk=None)
    one_by_one = gallery_seconds(rep, image, singles, iters, "cuda", chunk=1)
    ratio = (channels / batched) / (singles / one_by_one)
    name = torch.cuda.get_device_name()
    return [
        Row(f"{channels}-channel gallery, blocks.10, {iters} iters, batched, {name} (s)", f"{batched:.2f}"),
        Row(f"one by one, per channel (s, mean of {singles})", f"{one_by_one / singles:.2f}"),
        Row("batched / one-by-one throughput", f"{ratio:.1f}x", ">= 8x", ratio >= 8),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations and repeats")
    parser.add_argument("--only", choices=("cpu", "gpu"), help="run only the CPU or only the GPU rows")
    args = parser.parse_args()
    rows = []
    if args.only != "gpu":
        rows += cpu_rows(args.quick)
    if args.only != "cpu":
        rows += gpu_rows(args.quick)
    width = max(len(row.name) for row in rows)
    print(f"{'measure':<{width}}  {'value':>10}  {'target':<10} ok")
    for row in rows:
        ok = "" if row.ok is None else ("yes" if row.ok else "NO")
        print(f"{row.name:<{width}}  {row.value:>10}  {row.target:<10} {ok}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
