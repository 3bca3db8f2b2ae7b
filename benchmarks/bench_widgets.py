"""How fast the widgets answer (issue 5), driven from code as a notebook would. Prints a table.

    python3 benchmarks/bench_widgets.py           # about 2 minutes on a 2-core CPU
    python3 benchmarks/bench_widgets.py --quick   # fewer repeats and a 4-channel gallery

- Explorer: seconds from a slider change (the TV weight) to the first live reconstruction of the
  new run, debounce included, and the debounce alone (the widget waits that long for quiet).
- ChannelGallery: seconds to the first tile and to the whole 16-channel gallery of Lite0
  ``blocks.4`` at 224² with the widget's default iterations, through its background job.

Timings are noisy on a shared CPU: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import threading
import time
from typing import Any

import torch

from invviz.widgets import ChannelGallery, Explorer

#: The widgets' default quiet time before a re-run.
DEBOUNCE = inspect.signature(Explorer.__init__).parameters["debounce"].default


def slider_latency(repeats: int) -> list[float]:
    """Seconds from each TV-weight change to the next reconstruction shown."""
    explorer = Explorer(size=224)
    explorer.wait()
    shown = threading.Event()

    def on_reconstruction(_change: dict[str, Any]) -> None:
        shown.set()

    explorer.observe(on_reconstruction, names=["reconstruction"])
    latencies = []
    for repeat in range(repeats):
        shown.clear()
        began = time.perf_counter()
        explorer.tv_weight = 0.01 * (1.5 if repeat % 2 == 0 else 1.0)
        if not shown.wait(30):
            raise RuntimeError("no reconstruction within 30 s of a slider change")
        latencies.append(time.perf_counter() - began)
        explorer.wait()
    explorer.close()
    return latencies


def gallery_times(channels: str) -> tuple[float, float, int]:
    """Seconds to the first tile and to the end of the gallery, and the number of tiles."""
    began = time.perf_counter()
    first: list[float] = []
    gallery = ChannelGallery(channels=channels)

    def on_tiles(change: dict[str, Any]) -> None:
        if not first and any(change["new"]):
            first.append(time.perf_counter() - began)

    gallery.grid.observe(on_tiles, names=["tiles"])
    gallery.wait()
    total = time.perf_counter() - began
    tiles = len(gallery.channel_list)
    gallery.close()
    return (first[0] if first else float("nan")), total, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 slider changes and a 4-channel gallery")
    args = parser.parse_args()
    latencies = slider_latency(3 if args.quick else 6)
    first_tile, total, tiles = gallery_times("0-3" if args.quick else "0-15")
    rows = [
        ("Explorer: slider change → first live reconstruction (s, median)", f"{statistics.median(latencies):.2f}",
         "<= 1.0", statistics.median(latencies) <= 1.0),
        ("  worst of the changes (s)", f"{max(latencies):.2f}", "<= 1.0", max(latencies) <= 1.0),
        ("  of which debounce (s)", f"{DEBOUNCE:.2f}", "", None),
        (f"ChannelGallery: first tile on show (live, of {tiles}) (s)", f"{first_tile:.1f}", "", None),
        (f"ChannelGallery: all {tiles} tiles, blocks.4, 224² (s)", f"{total:.1f}",
         "<= 120" if tiles == 16 else "", (total <= 120) if tiles == 16 else None),
    ]
    width = max(len(name) for name, *_ in rows)
    print(f"{'measure':<{width}}  {'value':>8}  {'target':<8} ok")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<{width}}  {value:>8}  {target:<8} {verdict}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
