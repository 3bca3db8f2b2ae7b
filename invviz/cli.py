"""Command line: ``invviz invert|features|models|layers|demo``.

Every user error ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from .engine import DivergenceError, InversionResult, Settings, Step, invert, resolve_device
from .engine.analyses import (
    channel_gallery,
    channel_mask,
    diversity,
    parse_channels,
    receptive_field_crop,
    restarts,
    window_mask,
)
from .engine.jobs import TimeLeft, time_left_text
from .engine.loop import ADAM_LR, COLOUR_BASES, OPTIMIZERS, PAPER_LR, PAPER_MOMENTUM
from .images import image_grid, load_image, save_image
from .representations import (
    Representation,
    available_models,
    default_input_size,
    layer_table,
    model_layers,
    model_options,
    representation,
)
from .representations._base import ADAM_MOMENTUM, DEFAULT_ITERS
from .representations._shallow import ADAM_LR as SHALLOW_LR
from .representations._shallow import SHALLOW_ITERS
from .representations.efficientnet import (
    BRANCH_GRADIENT,
    DEEP_ADAM_LR,
    DEEP_ADAM_MOMENTUM,
    DEEP_SMOOTHING,
    HEAD_ADAM_LR,
    HEAD_SMOOTHING,
    MID_ADAM_LR,
    MID_BRANCH_GRADIENT,
    MID_SMOOTHING,
    SHALLOW_SMOOTHING,
)


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _number(kind: type, *, minimum: float | None = None, strictly: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value < minimum or (strictly and value == minimum)):
            bound = f"greater than {minimum:g}" if strictly else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


positive_int = _number(int, minimum=1)
non_negative_int = _number(int, minimum=0)
positive_float = _number(float, minimum=0, strictly=True)
non_negative_float = _number(float, minimum=0)
#: Largest --size and --restarts: beyond, one inversion's buffers outgrow a workstation's memory.
MAX_SIZE, MAX_RESTARTS = 4096, 256
#: Largest --iters: a 224² Lite0 head inversion of that many steps takes about a day on a CPU.
MAX_ITERS = 1_000_000


def _folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("got an empty folder name")
    return Path(text)


def code_window(text: str) -> tuple[int, int, int, int]:
    """``"Y,X,H,W"`` in code cells: top-left cell and size of a window."""
    parts = text.split(",")
    if len(parts) != 4 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected Y,X,H,W (four non-negative integers, in code cells), got {text!r}")
    y, x, h, w = (int(part) for part in parts)
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"window height and width must be at least 1, got {text!r}")
    return y, x, h, w


def _add_rep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="input image (any format Pillow reads)")
    parser.add_argument("--rep", required=True, help="MODEL:LAYER, e.g. efficientnet_lite0:blocks.4, alexnet:conv3, hog")
    parser.add_argument("--out", required=True, type=Path, help="output file")
    parser.add_argument("--size", type=positive_int, help="resize (shorter side) and centre-crop to N×N; default: the model's native size")
    parser.add_argument("--weights", help="CNN weights: imagenet (default), random, or a state-dict file")
    parser.add_argument("--cell-size", type=positive_int, help="HOG cell size in pixels (default 8)")
    parser.add_argument("--truncation-slope", type=non_negative_float,
                        help="hog/hogb: gradient let through HOG's 0.2 truncation towards the inside, 0 to 1 (default 0.7; 0: the true gradient)")
    parser.add_argument("--bin-size", type=positive_int, help="dense SIFT bin size in pixels (default 5)")
    parser.add_argument("--step", type=positive_int, help="dense SIFT step in pixels (default 5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="invviz", description="Invert deep and shallow image representations.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    inv = commands.add_parser("invert", help="reconstruct an image from its code at a layer")
    _add_rep_options(inv)
    inv.add_argument("--metrics", type=Path, help="write JSON metrics here")
    inv.add_argument(
        "--iters", type=positive_int, help=f"optimization steps (default {DEFAULT_ITERS}; {SHALLOW_ITERS} for hog, hogb and dsift)"
    )
    inv.add_argument("--seed", type=non_negative_int, default=0, help="random seed of the start noise and jitter (default 0)")
    inv.add_argument("--no-flat-regions", dest="flat_regions", action="store_false",
                     help="hog/hogb/dsift: do not hold the pixels under the target's all-zero cells flat")
    inv.add_argument("--polish", type=non_negative_int,
                     help="rounds of 8-bit polishing after the last step: moves of one grey level kept where they lower the error (default: 2.5 per step for hog/hogb, 10 for dsift, 0 for CNN layers)")
    inv.add_argument("--start-noise", type=non_negative_float,
                     help="deviation of the start image's noise around the mean pixel (default: 0, a flat start, for CNN layers; 0.05 for hog/hogb/dsift and for --restarts)")
    inv.add_argument("--tv", type=non_negative_float, help="TV prior weight (default: per layer)")
    inv.add_argument("--tv-start", type=positive_float,
                     help="TV weight of the first step as a multiple of --tv, falling to it by the last (default 2; for CNN layers of stride 8 or more in runs under 200 steps 2 × 200 / --iters, at most 8; 1: constant)")
    inv.add_argument("--tv-beta", type=positive_float, default=Settings.tv_beta, help=f"TV exponent β (default {Settings.tv_beta:g}; 1 gives spikes)")
    inv.add_argument("--tv-chroma", type=non_negative_float,
                     help="extra TV weight on colour variation (default: 3 for CNN layers of stride 8 or more, else 0)")
    inv.add_argument("--alpha-weight", type=non_negative_float, default=Settings.alpha_weight, help=f"α-norm prior weight (default {Settings.alpha_weight:g})")
    inv.add_argument("--alpha", type=positive_float, default=Settings.alpha, help=f"α-norm exponent (default {Settings.alpha:g})")
    inv.add_argument("--jitter", type=non_negative_int, default=Settings.jitter, help="max random shift in pixels per step (default 0: off)")
    inv.add_argument("--lr", type=positive_float, help=f"learning rate (default: adam {ADAM_LR:g}, {MID_ADAM_LR:g} for efficientnet_lite0 blocks.5-10, {DEEP_ADAM_LR:g} for blocks.11-15, {HEAD_ADAM_LR:g} for its head, {SHALLOW_LR:g} for hog/hogb/dsift; paper {PAPER_LR:g})")
    inv.add_argument("--momentum", type=non_negative_float,
                     help=f"adam's first-moment decay β1, or the paper's SGD momentum; from 0 to below 1 (default {ADAM_MOMENTUM:g}, {DEEP_ADAM_MOMENTUM:g} for efficientnet_lite0 from blocks.3 on; paper {PAPER_MOMENTUM:g})")
    inv.add_argument("--rectifier-smoothing", type=non_negative_float,
                     help=f"how far the network's inner rectifiers are rounded off for the gradient at the first step, shrinking to 0 by the last (pre-activation units, 0 to 3; 0: the true gradient; default: {SHALLOW_SMOOTHING:g} / {MID_SMOOTHING:g} / {DEEP_SMOOTHING:g} at Lite0's stride up to 8 / 16 / 32, {HEAD_SMOOTHING:g} at its head, 0 with --optimizer paper); efficientnet_lite0 past stem only")
    inv.add_argument("--branch-gradient", type=non_negative_float,
                     help=f"with the smoothed gradient, the share of the gradient the residual blocks' branches pass back at the first step, rising to 1 by the last (0 to 1; 1: the true gradient; default {BRANCH_GRADIENT:g} for efficientnet_lite0, {MID_BRANCH_GRADIENT:g} for its blocks.5-10, 1 with --optimizer paper); efficientnet_lite0 past stem only")
    inv.add_argument("--rectifier-slope", type=non_negative_float,
                     help=f"gradient let through to switched-off units of a code ending in a rectifier (ReLU6, ReLU), 0 to 1 (default {Settings.rectifier_slope:g}; 0: the true gradient); only for such codes")
    inv.add_argument("--feature-power", type=positive_float,
                     help="data term (‖Φ(x) − Φ0‖ / ‖Φ0‖)^P (default: 1 with adam, 2, the paper's squared form, with paper)")
    inv.add_argument("--colour-basis", choices=COLOUR_BASES,
                     help="coordinates Adam steps in for colour images: opponent (brightness and two colour-opponent axes, colour at --chroma-rate; the default except rgb at efficientnet_lite0:head) or rgb")
    inv.add_argument("--chroma-rate", type=positive_float,
                     help=f"with the opponent colour basis, the colour axes' step as a share of brightness' (default {Settings.chroma_rate:g})")
    inv.add_argument("--grey", action="store_true",
                     help="reconstruct a grey image (for codes of grey photos; the code itself does not say its photo was grey)")
    inv.add_argument("--optimizer", choices=OPTIMIZERS, default=Settings.optimizer, help="adam (default, fast) or paper (CVPR momentum schedule)")
    inv.add_argument("--quiet", action="store_true", help="no progress bar")
    inv.add_argument("--restarts", type=positive_int, default=1, metavar="K",
                     help="K reconstructions from different random starts: OUT.png, OUT-2.png … OUT-K.png, OUT-grid.png")
    inv.add_argument("--channels", metavar="SPEC",
                     help="channels, e.g. 0-15,32 / first-half / second-half: a gallery of each inverted alone")
    inv.add_argument("--channels-together", action="store_true",
                     help="match the --channels jointly in one reconstruction instead of a gallery")
    inv.add_argument("--window", type=code_window, metavar="Y,X,H,W",
                     help="match only this window of code cells; also writes OUT-rf.png (receptive-field crops)")

    feat = commands.add_parser("features", help="write the code of an image as .npy")
    _add_rep_options(feat)

    commands.add_parser("models", help="list the models")

    lay = commands.add_parser("layers", help="list a model's layers with code shapes and receptive fields")
    lay.add_argument("model")
    lay.add_argument("--size", type=positive_int, help="input size (default: the model's native size, or 224)")
    lay.add_argument("--weights", help="CNN weights used to build the model (default random: shapes do not depend on them)")

    demo = commands.add_parser("demo", help="reconstruct a sample photo at six depths of the bundled model")
    demo.add_argument("--out", type=_folder, default=Path("invviz-demo"), help="output folder")
    demo.add_argument("--iters", type=positive_int, default=DEFAULT_ITERS)
    demo.add_argument("--image", help="an image file instead of the bundled sample")
    demo.add_argument("--device", default="auto")
    return parser


def _representation(args: argparse.Namespace) -> Representation:
    options = {
        name: getattr(args, name)
        for name in ("weights", "cell_size", "truncation_slope", "bin_size", "step")
        if getattr(args, name, None) is not None
    }
    return representation(args.rep, **options)


def _check_output(path: Path, suffixes: tuple[str, ...] = (), option: str = "--out") -> None:
    """Fail before any work if ``path`` cannot be written (wrong suffix, missing or read-only folder,
    a directory in the way)."""
    if suffixes and (path.suffix.lower() not in suffixes or not path.stem):
        raise UsageError(f"{option} needs a file name ending in {' or '.join(suffixes)}, got {str(path)!r}")
    if not path.parent.is_dir():
        raise UsageError(f"{option}: output folder does not exist: {path.parent}")
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a directory")
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{option}: {path} is a link to a missing file")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UsageError(f"{option}: {path} is not writable")


def _check_inputs_kept(args: argparse.Namespace, outputs: Sequence[Path]) -> None:
    """Refuse outputs that would overwrite the input image or the --weights file."""
    inputs = [("the input image", Path(args.image))]
    if getattr(args, "weights", None) and args.weights not in ("imagenet", "random"):
        inputs.append(("the --weights file", Path(args.weights)))
    for path in outputs:
        for what, source in inputs:
            if _same_file(path, source):
                raise UsageError(f"{path} is {what}: choose another --out / --metrics, it would be overwritten")


def _same_file(path: Path, other: Path) -> bool:
    """Whether writing ``path`` would overwrite ``other`` (the same path, a link or a hard link)."""
    if path.resolve() == other.resolve():
        return True
    try:
        return path.exists() and other.exists() and os.path.samefile(path, other)
    except OSError:
        return False


def _check_sizes(args: argparse.Namespace) -> None:
    if getattr(args, "size", None) is not None and args.size > MAX_SIZE:
        raise UsageError(f"--size must be at most {MAX_SIZE}, got {args.size}")
    if getattr(args, "restarts", 1) > MAX_RESTARTS:
        raise UsageError(f"--restarts must be at most {MAX_RESTARTS}, got {args.restarts}")
    if (getattr(args, "iters", None) or 0) > MAX_ITERS:
        raise UsageError(f"--iters must be at most {MAX_ITERS:,}, got {args.iters}")


class ProgressBar:
    """A one-line text progress bar on stderr, redrawn at most ten times a second.

    When stderr is not a terminal (logs, CI) only the finished line is written.
    """

    #: Whether a live bar's line is on the terminal without its newline yet.
    _open_line = False

    @classmethod
    def end_live_line(cls) -> None:
        """End a live bar's unfinished line, so that what follows starts a line of its own."""
        if cls._open_line:
            sys.stderr.write("\n")
            cls._open_line = False

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.live = sys.stderr.isatty()
        self._last = 0.0
        self._time_left = TimeLeft(time.perf_counter())
        self._drawn = 0  # length of the line on screen

    def __call__(self, step: Step) -> None:
        finished = step.step == step.total
        now = time.perf_counter()
        left = self._time_left(step, now)  # sees every step, drawn or not
        if not self.enabled or (not finished and (not self.live or now - self._last < 0.1)):
            return
        self._last = now
        width = 30
        filled = round(width * step.step / step.total)
        error = f" err {step.feature_error[0]:.3f}" if step.feature_error else ""
        phase = " polishing" if step.polishing else ""
        eta = f" · {time_left_text(left)}" if left is not None and not finished else ""
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {step.step}/{step.total}{error}{phase}{eta}"
        # Spaces over what is left of a longer line drawn before.
        padded = line.ljust(self._drawn) if self.live else line
        self._drawn = len(line)
        sys.stderr.write(("\r" if self.live else "") + padded + ("\n" if finished else ""))
        ProgressBar._open_line = self.live and not finished
        sys.stderr.flush()


def _invert_command(args: argparse.Namespace) -> None:
    _check_output(args.out, (".png",))
    _check_sizes(args)
    gallery = args.channels is not None and not args.channels_together
    outputs = [args.out] + [_sibling(args.out, str(k)) for k in range(2, args.restarts + 1)]
    outputs += [_sibling(args.out, "grid")] if args.restarts > 1 else []
    outputs += [_sibling(args.out, "rf")] if args.window is not None else []
    for path in outputs[1:]:
        _check_output(path, option=f"--out's companion {path.name}")
    if args.metrics is not None:
        _check_output(args.metrics, option="--metrics")
        if any(_same_file(args.metrics, path) for path in outputs):
            raise UsageError(f"--metrics {args.metrics} would overwrite an image this run writes")
    _check_inputs_kept(args, [*outputs, *([args.metrics] if args.metrics is not None else [])])
    if args.channels_together and args.channels is None:
        raise UsageError("--channels-together needs --channels")
    if gallery and args.restarts > 1:
        raise UsageError("--restarts cannot be combined with a per-channel gallery; add --channels-together")
    rep = _representation(args)
    _check_applicable(args, rep)
    image = load_image(args.image, args.size or rep.native_size, max_side=MAX_SIZE)
    if args.jitter >= max(image.shape[1:]):
        raise UsageError(f"--jitter must be smaller than the image ({image.shape[1]}×{image.shape[2]}), got {args.jitter}")
    if not args.grey and not rep.grayscale and bool((image == image[:1]).all()):
        # The engine only sees the code, which does not say so; the user may want to.
        print(f"note: {args.image} is grey; --grey reconstructs a grey image (lower error on grey photos)", file=sys.stderr)
    settings = Settings(
        iters=args.iters,
        optimizer=args.optimizer,
        lr=args.lr,
        tv_weight=args.tv,
        tv_start=args.tv_start,
        tv_beta=args.tv_beta,
        tv_chroma=args.tv_chroma,
        alpha_weight=args.alpha_weight,
        alpha=args.alpha,
        jitter=args.jitter,
        seed=args.seed,
        rectifier_slope=Settings.rectifier_slope if args.rectifier_slope is None else args.rectifier_slope,
        rectifier_smoothing=args.rectifier_smoothing,
        branch_gradient=args.branch_gradient,
        feature_power=args.feature_power,
        start_noise=args.start_noise,
        flat_regions=args.flat_regions,
        polish=args.polish,
        colour_basis=args.colour_basis,
        chroma_rate=Settings.chroma_rate if args.chroma_rate is None else args.chroma_rate,
        grey=args.grey,
        momentum=args.momentum,
    )
    torch.manual_seed(args.seed)
    progress = ProgressBar(rep.spec, enabled=not args.quiet)
    code_shape = rep.code_shape(*image.shape[1:])
    mask = window_mask(code_shape, args.window) if args.window else None
    channels = parse_channels(args.channels, code_shape[0]) if args.channels is not None else None
    if gallery:
        assert channels is not None
        _gallery_command(args, rep, image, channels, settings, mask, progress)
        return
    if channels is not None:
        selected = channel_mask(code_shape, channels)
        mask = selected if mask is None else mask & selected
    if args.restarts > 1:
        result = restarts(rep, image, args.restarts, mask=mask, settings=settings, device=args.device, on_step=progress)
    else:
        result = invert(rep, image, mask=mask, settings=settings, device=args.device, on_step=progress)
    files = [args.out] + [_sibling(args.out, str(k)) for k in range(2, args.restarts + 1)]
    for file, reconstruction in zip(files, result.images):
        save_image(reconstruction, file)
    extra: dict[str, object] = {}
    if args.restarts > 1:
        save_image(image_grid(result.images), _sibling(args.out, "grid"))
        extra["diversity"] = diversity(result.images)
        print(f"diversity (mean pairwise RMS pixel distance): {extra['diversity']:.4f}")
    _write_receptive_fields(args, rep, image, result.images)
    _report(result, files, args.metrics, extra)


def _check_applicable(args: argparse.Namespace, rep: Representation) -> None:
    """Refuse options that would do nothing for this representation, rather than ignore them."""
    if args.rectifier_slope is not None and not rep.ends_in_rectifier:
        raise UsageError(
            f"--rectifier-slope applies to codes that end in a rectifier (e.g. efficientnet_lite0:stem "
            f"or :head, alexnet:relu5); {rep.spec} does not"
        )
    if args.rectifier_smoothing is not None and not rep.smooths_rectifiers:
        raise UsageError(
            f"--rectifier-smoothing applies to networks with inner rectifiers it smooths (efficientnet_lite0 "
            f"past stem); {rep.spec} has none"
        )
    if args.branch_gradient is not None and not rep.smooths_rectifiers:
        raise UsageError(
            f"--branch-gradient applies to networks whose gradient the engine smooths (efficientnet_lite0 "
            f"past stem); {rep.spec} is not one"
        )
    smoothing_off = args.rectifier_smoothing == 0 or (args.rectifier_smoothing is None and args.optimizer == "paper")
    if args.branch_gradient is not None and args.branch_gradient != 1 and smoothing_off:
        raise UsageError(
            "--branch-gradient acts through the smoothed gradient, which "
            + ("--rectifier-smoothing 0" if args.rectifier_smoothing == 0 else "--optimizer paper")
            + " turns off; give --rectifier-smoothing above 0 too"
        )
    if not args.flat_regions and not rep.zero_means_flat:
        raise UsageError(f"--no-flat-regions applies to hog, hogb and dsift only, not {rep.spec}")
    if args.polish and not rep.is_spatial:
        raise UsageError(f"--polish needs a spatial code; {rep.spec} is a vector")
    if args.grey and rep.grayscale:
        raise UsageError(f"--grey: {rep.spec} reconstructs grey images already")
    grey = rep.spec if rep.grayscale else "--grey" if args.grey else None
    if args.tv_chroma is not None and grey:
        raise UsageError(f"--tv-chroma weighs colour, and {grey} reconstructs grey images")
    for option, given in (("--colour-basis", args.colour_basis), ("--chroma-rate", args.chroma_rate)):
        if given is not None and grey:
            raise UsageError(f"{option} applies to colour images, and {grey} reconstructs grey ones")
        if given is not None and args.optimizer != "adam":
            raise UsageError(f"{option} applies to the adam optimizer, not {args.optimizer}")
    if args.chroma_rate is not None and (args.colour_basis or rep.default_colour_basis()) == "rgb":
        raise UsageError(
            "--chroma-rate applies to the opponent colour basis"
            + ("" if args.colour_basis else f"; {rep.spec} steps in rgb by default, add --colour-basis opponent")
        )


def _gallery_command(
    args: argparse.Namespace,
    rep: Representation,
    image: torch.Tensor,
    channels: list[int],
    settings: Settings,
    mask: torch.Tensor | None,
    progress: ProgressBar,
) -> None:
    """``--channels`` without ``--channels-together``: each channel inverted alone, one grid OUT.png."""
    tiles = channel_gallery(
        rep, image, channels, mask=mask, settings=settings, device=args.device, on_step=lambda step, _: progress(step)
    )
    save_image(image_grid(tiles.images), args.out)
    _write_receptive_fields(args, rep, image, tiles.images)
    for channel, error in zip(tiles.channels, tiles.feature_error):
        if channel in tiles.empty:
            print(f"{args.out} channel {channel}: all zero in the target code, left blank")
        else:
            print(f"{args.out} channel {channel}: feature error {error:.4f}")
    if args.metrics is not None:
        args.metrics.write_text(json.dumps({**tiles.metrics(), "file": str(args.out)}, indent=2))


def _sibling(path: Path, suffix: str) -> Path:
    """``out.png`` → ``out-SUFFIX.png``."""
    return path.with_name(f"{path.stem}-{suffix}{path.suffix}")


def _write_receptive_fields(args: argparse.Namespace, rep: Representation, image: torch.Tensor, images: torch.Tensor) -> None:
    """With ``--window``: OUT-rf.png, the window's receptive field in the original and each reconstruction."""
    if args.window is None:
        return
    y, x, h, w = args.window
    box = rep.receptive_field((y, y + h), (x, x + w), *image.shape[1:])
    crops = [receptive_field_crop(picture, box) for picture in [image, *images]]
    save_image(image_grid(crops, columns=len(crops)), _sibling(args.out, "rf"))
    print(f"{_sibling(args.out, 'rf')}: receptive field rows {box.top}:{box.bottom}, cols {box.left}:{box.right}")


def _report(
    result: InversionResult, files: Sequence[Path], metrics: Path | None, extra: dict[str, object] | None = None
) -> None:
    if metrics is not None:  # before anything is printed, which could fail on an odd file name
        record = result.metrics()
        record["results"] = [{"file": str(f), "feature_error": e} for f, e in zip(files, result.feature_error)]
        record.update(extra or {})
        metrics.write_text(json.dumps(record, indent=2))
    for file, error in zip(files, result.feature_error):
        polished = f" + {result.polished} polishing rounds" if result.polished else ""
        print(f"{file}: feature error {error:.4f} ({result.steps} iterations{polished}, {result.seconds:.1f} s)")


def _features_command(args: argparse.Namespace) -> None:
    _check_output(args.out, (".npy",))
    _check_sizes(args)
    _check_inputs_kept(args, [args.out])
    rep = _representation(args)
    device = resolve_device(args.device)
    image = load_image(args.image, args.size or rep.native_size, max_side=MAX_SIZE)
    code = rep.to(device).code_of(image[None].to(device))[0]
    if not bool(torch.isfinite(code).all()):
        raise UsageError("the code has NaN or infinite entries (are the weights sound?); nothing written")
    with open(args.out, "wb") as file:  # np.save(path) would add ".npy" to "F.NPY"
        np.save(file, code.float().cpu().numpy().astype(np.float32))
    print(f"{args.out}: {rep.spec} code of shape {tuple(code.shape)}")


def _models_command(args: argparse.Namespace) -> None:
    for name in available_models():
        layers = model_layers(name)
        span = layers[0] if len(layers) == 1 else f"{layers[0]} … {layers[-1]}"
        print(f"{name:<20} {len(layers):>3} layer{'s' if len(layers) != 1 else ' '}  {span}")
    print("Any torchvision classification model is accepted too, with its module paths as layers.")


def _layers_command(args: argparse.Namespace) -> None:
    _check_sizes(args)
    takes_weights = "weights" in model_options(args.model)
    if args.weights is not None and not takes_weights:
        raise UsageError(f"{args.model} has no weights; --weights applies to CNN models")
    if args.weights == "":
        raise UsageError("--weights got an empty name")
    options = {"weights": args.weights or "random"} if takes_weights else {}
    size = args.size or default_input_size(args.model)
    rows = layer_table(args.model, size, **options)  # all computed before the table starts
    width = max(14, *(len(row.layer) for row in rows))  # module paths can be long (a ViT's)
    print(f"{'layer':<{width}} {'code shape':<18} {'receptive field':<16} stride   (input {size}×{size})")
    for row in rows:
        if row.code_shape is None:
            shape, field, stride = "-", row.note, ""
        else:
            shape = "×".join(str(n) for n in row.code_shape)
            box = row.receptive_field
            field = "whole image" if box is None else f"{box.height}×{box.width} px"
            stride = "-" if row.stride is None else str(row.stride)
        print(f"{row.layer:<{width}} {shape:<18} {field:<16} {stride}".rstrip())


def _attach_window_values(argv: list[str]) -> list[str]:
    """``--window -1,0,2,2`` → ``--window=-1,0,2,2``: argparse would take the value for an option
    and say only "expected one argument"; attached, it reaches ``code_window``'s own message."""
    for index in range(len(argv) - 1):
        value = argv[index + 1]
        if argv[index] == "--window" and value[:1] == "-" and value[1:2].isdigit():
            return [*argv[:index], f"--window={value}", *_attach_window_values(argv[index + 2 :])]
    return argv


def _demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo

    _check_sizes(args)
    if args.image == "":
        raise UsageError("--image got an empty file name")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; the demo writes a folder")
    if not os.access(next(p for p in (args.out, *args.out.parents) if p.exists()), os.W_OK):
        raise UsageError(f"--out {args.out} cannot be created or written")
    from .demo import output_files

    for path in output_files(args.out):
        if args.out.is_dir():
            _check_output(path, option=f"--out's {path.name}")
        if args.image is not None and _same_file(path, Path(args.image)):
            raise UsageError(f"the demo would overwrite its --image {args.image} with {path.name}; choose another --out")
    run_demo(args.out, iters=args.iters, image=args.image, device=args.device)


def _error_line(message: str) -> None:
    """The one line an error gets on stderr: after any progress bar drawn on the terminal, with
    newlines (in file names) escaped."""
    ProgressBar.end_live_line()
    print(f"invviz: error: {message}".replace("\n", "\\n").replace("\r", "\\r"), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # file names that are not valid text still print
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        with warnings.catch_warnings():
            # Library warnings (torch, torchvision, Pillow) are not the user's to act on here.
            warnings.simplefilter("ignore")
            args = parser.parse_args(_attach_window_values(list(sys.argv[1:] if argv is None else argv)))
            command = {
                "invert": _invert_command,
                "features": _features_command,
                "models": _models_command,
                "layers": _layers_command,
                "demo": _demo_command,
            }[args.command]
            command(args)
    except (UsageError, ValueError, DivergenceError) as error:
        _error_line(str(error))
        return 2
    except OSError as error:  # e.g. a disk that filled up while writing
        where = f": {error.filename}" if error.filename else ""
        _error_line(f"{error.strerror or error}{where}")
        return 2
    except (MemoryError, RuntimeError) as error:
        # An allocation this machine cannot make (a huge --size with many restarts or channels).
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        _error_line("not enough memory for this run; use a smaller --size or fewer --restarts / --channels")
        return 2
    except KeyboardInterrupt:
        print("invviz: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
