"""Compare inversion settings on EfficientNet-Lite0 layers over many photos at once. Prints a table.

    python3 benchmarks/sweep_settings.py --layers head --set rectifier_slope=0,0.5,1
    python3 benchmarks/sweep_settings.py --layers blocks.4,blocks.8 --set iters=200,1000 --device cuda
    python3 benchmarks/sweep_settings.py --layers blocks.4 --set tv_beta=1,2 --set tv_weight=0.003,0.01
    python3 benchmarks/sweep_settings.py --layers blocks.4,blocks.10 --images grey --set grey=true

``--set FIELD=V1,V2`` (any ``invviz.Settings`` field, repeatable: every combination is run, after a
row with the defaults). All photos (default: the 8 scikit-image photos at 224²) are inverted as one
batch with per-photo losses, which is what makes a sweep cheap on a GPU (an H200 does a 200-step
batch of 8 in 1-2 s); on a 2-core CPU a batch costs about as much as its photos one by one.

Per row: error ``‖Φ(png) − Φ0‖ / ‖Φ0‖`` of the 8-bit result (mean / max), roughness relative to the
photo (max), and how many photos meet the foundation issue's bounds (error ≤ 0.15, roughness ≤ 1.5);
``--per-photo`` adds a line with each photo's error / roughness.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import torch
from bench_layers import quantized, relative_error
from photos import SKIMAGE_PHOTOS, photo, photo_names

from invviz import Settings, invert, representation, roughness

ERROR_BOUND, ROUGHNESS_BOUND = 0.15, 1.5


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise SystemExit(f"--set: {value!r} is not true or false")
    return value.lower() in ("true", "1")


def parse_grid(assignments: list[str]) -> list[dict[str, object]]:
    """``["a=1,2", "b=x"]`` → every combination as keyword dicts, typed like the Settings fields."""
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    axes = []
    for assignment in assignments:
        name, _, values = assignment.partition("=")
        if name not in fields or not values:
            raise SystemExit(f"--set takes FIELD=V1,V2 with a Settings field ({', '.join(fields)}); got {assignment!r}")
        kind = str(fields[name].type)
        cast = int if kind.startswith("int") else float if kind.startswith("float") else str
        if kind.startswith("bool"):
            cast = _boolean
        axes.append([(name, cast(value)) for value in values.split(",")])
    return [dict(combination) for combination in itertools.product(*axes)] if axes else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="blocks.4,head", help="comma-separated Lite0 layers")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2", help="settings to sweep")
    parser.add_argument("--images", help="comma-separated photos, or a set: 'colour' (the 8 colour photos), 'held-out', 'grey' (default: all 8)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-photo", action="store_true", help="also print each photo's error and roughness")
    args = parser.parse_args()
    names = photo_names(args.images, SKIMAGE_PHOTOS)
    photos = torch.stack([photo(name, args.size) for name in names])
    grid = [{}, *parse_grid(args.set)]

    print(f"EfficientNet-Lite0, {args.size}², {len(names)} photos ({', '.join(names)}), device {args.device}")
    header = f"| {'layer':<9} | {'settings':<34} | {'error mean/max':>14} | {'rough. max':>10} | {'meet':>4} | {'s':>6} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for layer in args.layers.split(","):
        rep = representation("efficientnet_lite0", layer=layer).to(args.device)
        with torch.no_grad():
            targets = rep(photos.to(args.device))
        for overrides in grid:
            began = time.perf_counter()
            result = invert(
                rep,
                target=targets,
                size=(args.size, args.size),
                batch=len(names),
                settings=Settings(**overrides),  # type: ignore[arg-type]
                device=args.device,
            )
            seconds = time.perf_counter() - began
            images = result.images
            errors = [relative_error(rep, images[i], targets[i : i + 1]) for i in range(len(names))]
            rough = [roughness(quantized(images[i])) / roughness(photos[i]) for i in range(len(names))]
            meet = sum(e <= ERROR_BOUND and r <= ROUGHNESS_BOUND for e, r in zip(errors, rough))
            label = ", ".join(f"{key}={value}" for key, value in overrides.items()) or "defaults"
            print(
                f"| {layer:<9} | {label:<34} | {f'{statistics.mean(errors):.3f}/{max(errors):.3f}':>14} | "
                f"{max(rough):>10.2f} | {meet:>2}/{len(names)} | {seconds:>6.1f} |",
                flush=True,
            )
            if args.per_photo:
                cells = (f"{name} {e:.3f}/{r:.2f}" for name, e, r in zip(names, errors, rough))
                print(f"|   {' · '.join(cells)}", flush=True)


if __name__ == "__main__":
    main()
