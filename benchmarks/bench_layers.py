"""Per-layer reconstruction quality and cost of invviz's default inversion on EfficientNet-Lite0.

Prints one row per layer: iterations, seconds, relative feature error ‖Φ(x) − Φ0‖ / ‖Φ0‖ of the
8-bit PNG result, and roughness (mean absolute neighbour difference) relative to the original —
for invviz's defaults and for a naive baseline (Adam on raw pixels, constant rate, fixed small TV).
A second table compares one engine iteration with a bare forward+backward of the truncated net.

    python benchmarks/bench_layers.py                 # the demo's six layers, two photos
    python benchmarks/bench_layers.py --all           # every layer from stem to head, four photos
    python benchmarks/bench_layers.py --device cuda
    python benchmarks/bench_layers.py --images held-out   # scikit-image photos the defaults were not tuned on
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from photos import GREY_PHOTOS, SKIMAGE_PHOTOS, photo, photo_names

from invviz import Settings, invert, representation, roughness
from invviz.demo import DEMO_LAYERS
from invviz.engine import Context, Step, match, tv
from invviz.images import SAMPLES
from invviz.representations._base import DEFAULT_ITERS

ALL_LAYERS = ("stem", *(f"blocks.{i}" for i in range(16)), "head")


def quantized(image: torch.Tensor) -> torch.Tensor:
    """What a PNG stores: 8-bit values."""
    return (image * 255).round() / 255


def relative_error(rep: torch.nn.Module, image: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        code = rep(quantized(image)[None].to(target.device))
    return float((code - target).norm() / target.norm())


def naive(rep, image: torch.Tensor, iters: int, device: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Adam (rate 0.05) on raw pixels from mid-gray noise, TV weight 0.003, no pyramid, no decay."""
    with torch.no_grad():
        target = rep(image[None].to(device))
    generator = torch.Generator().manual_seed(0)
    pixels = (0.5 + 0.05 * torch.randn(1, 3, *image.shape[1:], generator=generator)).to(device).requires_grad_(True)
    objective = match(rep, target) + 0.003 * tv(2)
    optimizer = torch.optim.Adam([pixels], lr=0.05)
    for _ in range(iters):
        optimizer.zero_grad()
        objective(Context(pixels)).sum().backward()
        optimizer.step()
        with torch.no_grad():
            pixels.clamp_(0, 1)
    return pixels.detach()[0].cpu()


def per_iteration_cost(layer: str, device: str, repeats: int = 40) -> dict[str, float]:
    """Median seconds per step of one engine step (``engine``) and of three bare forward+backward
    passes of the truncated net on the same 224² input: ``bare`` (``rep(x)``, the representation
    as users call it: scaling, channels-last on the CPU, padding, then the net), ``nchw`` (the
    same stages fed torch's default layout) and ``prepared`` (``rep.forward_prepared`` of the
    input ``rep.input_layout`` prepares, which the CPU engine writes itself: the net alone).

    Interleaved step by step: after each engine step the callback times one pass of each on the
    same input, and the engine's step is timed from the end of one callback to the start of the
    next, so load from elsewhere (this kind of machine swings ±20 %) hits all alike."""
    rep = representation("efficientnet_lite0", layer=layer).to(device)
    image = photo("chelsea", 224)
    x = image[None].to(device).requires_grad_(True)
    prepared = rep.input_layout(224, 224).prepare(x.detach()).requires_grad_(True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"bare": [], "nchw": [], "prepared": [], "engine": []}
    resumed: list[float] = []

    def nchw_pass() -> None:
        # The same stages the representation runs, fed NCHW as they are (no layout change).
        code = x * 2 - 1
        for stage in rep.stages:
            code = stage(code)
        code.square().sum().backward()

    passes = {
        "bare": lambda: rep(x).square().sum().backward(),
        "nchw": nchw_pass,
        "prepared": lambda: rep.forward_prepared(prepared).square().sum().backward(),
    }

    def interleave(step: Step) -> None:
        sync()
        if resumed:
            times["engine"].append(time.perf_counter() - resumed[-1])
        for name, run in passes.items():
            began = time.perf_counter()
            x.grad = prepared.grad = None
            run()
            sync()
            times[name].append(time.perf_counter() - began)
        resumed.append(time.perf_counter())

    invert(rep, image, settings=Settings(iters=repeats + 5), device=device, on_step=interleave)
    # The first steps warm up allocator and caches for all.
    return {name: statistics.median(values[5:]) for name, values in times.items()}


def _pair(values: list[float], digits: int) -> str:
    """``mean/max`` of ``values``, each to ``digits`` decimals."""
    return f"{statistics.mean(values):.{digits}f}/{max(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every layer stem…head and all four photos")
    parser.add_argument("--layers", help="comma-separated layers (default: the demo's six)")
    parser.add_argument(
        "--images",
        help=f"comma-separated photos, or a set: 'colour' (the 8 colour photos), 'held-out', 'grey' (default: chelsea,coffee; any of {','.join(SKIMAGE_PHOTOS + GREY_PHOTOS)})",
    )
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    layers = ALL_LAYERS if args.all else tuple(args.layers.split(",")) if args.layers else DEMO_LAYERS
    names = photo_names(args.images, SAMPLES if args.all else ("chelsea", "coffee"))
    photos = {name: photo(name, 224) for name in names}

    print(f"EfficientNet-Lite0, 224², {args.iters} iterations, photos: {', '.join(names)}, device {args.device}")
    print("error = ‖Φ(png) − Φ0‖/‖Φ0‖ (mean / max over photos); roughness = recon/original (mean / max)")
    header = f"| {'layer':<9} | {'iters':>5} | {'s/inversion':>11} | {'error':>13} | {'roughness':>11} |"
    if not args.no_baseline:
        header += f" {'naive error':>13} | {'naive rough.':>12} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for layer in layers:
        rep = representation("efficientnet_lite0", layer=layer).to(args.device)
        errors, rough, seconds, naive_errors, naive_rough = [], [], [], [], []
        for original in photos.values():
            with torch.no_grad():
                target = rep(original[None].to(args.device))
            result = invert(rep, original, settings=Settings(iters=args.iters), device=args.device)
            seconds.append(result.seconds)
            errors.append(relative_error(rep, result.image, target))
            rough.append(roughness(quantized(result.image)) / roughness(original))
            if not args.no_baseline:
                baseline = naive(rep, original, args.iters, args.device)
                naive_errors.append(relative_error(rep, baseline, target))
                naive_rough.append(roughness(quantized(baseline)) / roughness(original))
        row = (
            f"| {layer:<9} | {args.iters:>5} | {statistics.mean(seconds):>11.1f} | "
            f"{_pair(errors, 3):>13} | {_pair(rough, 2):>11} |"
        )
        if not args.no_baseline:
            row += f" {_pair(naive_errors, 3):>13} | {_pair(naive_rough, 2):>12} |"
        print(row, flush=True)

    print("\nPer-iteration cost (224², batch 1): engine step vs bare forward+backward of the truncated net")
    print("(bare: rep(x) as users call it, channels-last on the CPU; bare NCHW: the same net fed torch's default")
    print(" layout; prepared: the net alone on the input the CPU engine writes itself, rep.forward_prepared)")
    print(
        f"| {'layer':<9} | {'bare ms':>8} | {'NCHW ms':>8} | {'prepared ms':>11} | {'engine ms':>9} | {'ratio':>5} "
        f"| {'vs NCHW':>7} | {'vs prepared':>11} |"
    )
    print("|-----------|----------|----------|-------------|-----------|-------|---------|-------------|")
    for layer in ("stem", "blocks.1", "blocks.4", "blocks.10", "head"):
        cost = per_iteration_cost(layer, args.device)
        engine = cost["engine"]
        print(
            f"| {layer:<9} | {cost['bare'] * 1e3:>8.1f} | {cost['nchw'] * 1e3:>8.1f} | {cost['prepared'] * 1e3:>11.1f} "
            f"| {engine * 1e3:>9.1f} | {engine / cost['bare']:>5.2f} | {engine / cost['nchw']:>7.2f} "
            f"| {engine / cost['prepared']:>11.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
