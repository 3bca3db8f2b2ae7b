"""The paper's Table 1 for invviz: how well HOG, HOGb and dense SIFT are inverted. Prints tables.

    python3 benchmarks/bench_table1.py          # 8 photos x 3 representations, ~10-20 min on one CPU thread
    python3 benchmarks/bench_table1.py --quick  # 2 photos, 50 iterations: a rough look in about a minute

Each scikit-image photo shipped in its wheel is resized (shorter side) and centre-cropped to 256²,
inverted with default settings, and written as 8 bits, as the CLI's PNG is. The error is measured
with VLFeat itself (``tests/vlfeat.py``, ctypes on ``libvl.so``), not with invviz's own HOG/SIFT:

- relative error ``‖Φ(x) − Φ0‖ / ‖Φ0‖`` (the issue's acceptance measure);
- the paper's normalization, ``‖Φ(x) − Φ0‖² / mean_{i≠j} ‖Φ0_i − Φ0_j‖²`` over this image set's codes,
  in %, comparable in kind (not in images: the paper used 100 ILSVRC-2012 val images) with its Table 1.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The one VLFeat ctypes wrapper lives with the tests, which use it as their oracle.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photos import SKIMAGE_PHOTOS, photo
from vlfeat import LIBVL, gray_255, vl_dsift, vl_hog

from invviz import Settings, invert, representation
from invviz.images import to_uint8
from invviz.representations import Representation

SIZE = 256
SPECS = ("hog", "hogb", "dsift")
#: Table 1 of the CVPR paper as commonly quoted (% error, mean ± std over 100 ILSVRC images).
PAPER = {"hoggle": (66.2, 13.7), "hog": (28.1, 7.9), "hogb": (10.7, 5.2), "dsift": (10.9, 7.5)}


@dataclass
class Outcome:
    photo: str
    spec: str
    relative: float
    squared_distance: float
    seconds: float


def vlfeat_code(rep: Representation, image: torch.Tensor) -> np.ndarray:
    """VLFeat's own code of ``(3, H, W)`` in [0, 1], with the representation's parameters."""
    gray = gray_255(image.numpy())
    if rep.model == "dsift":
        return vl_dsift(gray, rep.bin_size, rep.step)
    return vl_hog(gray, rep.cell_size, bilinear=rep.bilinear)


def run(spec: str, names: list[str], iters: int | None) -> tuple[list[Outcome], float]:
    """Invert each photo; returns the outcomes and the mean squared pairwise code distance."""
    rep = representation(spec)
    originals = {name: photo(name, SIZE) for name in names}
    codes = {name: vlfeat_code(rep, image) for name, image in originals.items()}
    pairs = list(itertools.combinations(names, 2))
    spread = statistics.fmean(float(np.sum((codes[a] - codes[b]) ** 2)) for a, b in pairs) if pairs else float("nan")
    outcomes = []
    for name, image in originals.items():
        began = time.perf_counter()
        result = invert(rep, image, settings=Settings(iters=iters), device="cpu")
        seconds = time.perf_counter() - began
        written = torch.from_numpy(to_uint8(result.image)).permute(2, 0, 1).float() / 255
        difference = vlfeat_code(rep, written) - codes[name]
        squared = float(np.sum(difference**2))
        relative = float(np.sqrt(squared / np.sum(codes[name] ** 2)))
        outcomes.append(Outcome(name, spec, relative, squared / spread, seconds))
        print(f"  {spec:<6} {name:<22} relative {relative:.4f}  paper-normalized {100 * squared / spread:6.2f} %  "
              f"{seconds:5.1f} s", file=sys.stderr, flush=True)
    return outcomes, spread


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 photos and 50 iterations")
    parser.add_argument("--iters", type=int, help="iterations per inversion (default: each representation's, --quick 50)")
    parser.add_argument("--photos", nargs="+", choices=SKIMAGE_PHOTOS, help="a subset of the photos")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: timings comparable on a shared CPU)")
    args = parser.parse_args()
    if LIBVL is None:
        sys.exit("VLFeat's libvl.so not found (apt-get install libvlfeat1)")
    torch.set_num_threads(args.threads)
    names = list(args.photos or (SKIMAGE_PHOTOS[:2] if args.quick else SKIMAGE_PHOTOS))
    iters = args.iters or (50 if args.quick else None)
    if len(names) < 2:
        parser.error("the paper's normalization needs at least 2 photos")

    results = {spec: run(spec, names, iters) for spec in SPECS}
    def steps(spec: str) -> str:
        resolved = Settings(iters=iters).resolved(representation(spec))
        return f"{spec} {resolved.iters} + {resolved.polish} polishing rounds"

    counts = ", ".join(steps(spec) for spec in SPECS)
    print(f"\nTable 1 — {len(names)} scikit-image photos at {SIZE}², default settings, iterations: {counts}, "
          f"error of the 8-bit result measured with VLFeat, {args.threads} CPU thread(s)")
    print(f"{'rep':<7} {'‖Φ(x)−Φ0‖/‖Φ0‖':<17} {'paper-normalized %':<20} {'paper (ILSVRC) %':<18} s / inversion")
    print(f"{'hoggle':<7} {'—':<17} {'—':<20} {'{} ± {}'.format(*PAPER['hoggle']):<18} —")
    for spec, (outcomes, _) in results.items():
        relative = mean_std([o.relative for o in outcomes])
        normalized = f"{statistics.fmean(100 * o.squared_distance for o in outcomes):.1f} ± " \
                     f"{statistics.pstdev(100 * o.squared_distance for o in outcomes):.1f}"
        paper = "{} ± {}".format(*PAPER[spec])
        seconds = statistics.fmean(o.seconds for o in outcomes)
        print(f"{spec:<7} {relative:<17} {normalized:<20} {paper:<18} {seconds:.1f}")

    print("\nPer photo: relative error ‖Φ(x)−Φ0‖/‖Φ0‖")
    print(f"{'photo':<22} " + " ".join(f"{spec:>7}" for spec in SPECS))
    for index, name in enumerate(names):
        print(f"{name:<22} " + " ".join(f"{results[spec][0][index].relative:7.4f}" for spec in SPECS))
    print("\nmean squared pairwise code distance (paper's normalizer): "
          + ", ".join(f"{spec} {spread:.4g}" for spec, (_, spread) in results.items()))


if __name__ == "__main__":
    main()
