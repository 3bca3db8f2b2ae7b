"""The paper's analyses on top of ``invert``: random restarts, channel and neuron subsets, receptive fields.

All synchronous; run them inside ``InversionEngine.submit_task`` to get them in the background.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from ..representations import Box, Representation
from ._device import resolve_device
from .loop import (
    START_NOISE,
    DivergenceError,
    InversionResult,
    Settings,
    Step,
    StopSignal,
    _check_image,
    image_channels,
    invert,
    polishing,
    random_start,
)
from .objectives import check_mask

#: Channel groups ``parse_channels`` knows, as the paper's "neural streams" figure splits them.
CHANNEL_GROUPS = ("all", "first-half", "second-half")


def restarts(
    rep: Representation,
    image: Tensor,
    k: int,
    *,
    mask: Tensor | None = None,
    settings: Settings | None = None,
    device: str | torch.device = "auto",
    on_step: Callable[[Step], None] | None = None,
    stop: StopSignal | None = None,
) -> InversionResult:
    """``k`` reconstructions of ``image`` ``(3, H, W)`` from different random starts, in one batch.

    What differs between them is what the code is invariant to (the paper's Fig. 7). The starts
    are the mean pixel plus noise of ``settings.start_noise``, at least 0.05 where it is ``None``
    (a single inversion of a CNN layer starts flat by default). Returns images ``(k, 3, H, W)``.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"number of restarts must be a positive integer, got {k!r}")
    settings = settings or Settings()
    if isinstance(settings, Settings):  # invert says what else it is not
        if k > 1 and settings.start_noise == 0:
            raise ValueError("restarts from a start without noise (start_noise 0) would all be the same image")
        if settings.start_noise is None:
            # Also for k = 1: each seed is then a different restart.
            settings = replace(settings, start_noise=START_NOISE)
    # invert validates the mask against the code.
    return invert(rep, image, mask=mask, settings=settings, batch=int(k), device=device, on_step=on_step, stop=stop)


def diversity(images: Tensor) -> float:
    """Mean pairwise RMS pixel distance of reconstructions ``(K, 3, H, W)`` (0 for one image)."""
    if images.dim() != 4:
        raise ValueError(f"diversity needs a batch of images (K, C, H, W), got {tuple(images.shape)}")
    count = images.shape[0]
    if count < 2:
        return 0.0
    flat = images.detach().double().flatten(1)
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    return float(distances.sum() / (count * (count - 1)))


def parse_channels(text: str, channels: int) -> list[int]:
    """Channel indices from ``"0-15,32,40-47"`` (ranges inclusive), ``"all"``, ``"first-half"`` or
    ``"second-half"``, for a code with ``channels`` channels. Raises ``ValueError`` on anything else."""
    spec = text.strip().lower()
    half = channels // 2
    groups = {"all": range(channels), "first-half": range(half), "second-half": range(half, channels)}
    if spec in groups:
        selected = list(groups[spec])
        if not selected:
            raise ValueError(f"channel group {spec!r} is empty for a code with {channels} channel(s)")
        return selected
    if not spec:
        raise ValueError("no channels given; use e.g. 0-15,32 or " + ", ".join(CHANNEL_GROUPS))
    selected = []
    for part in spec.split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None:
            raise ValueError(
                f"bad channel list {text!r}: {part.strip()!r} is not N or N-M; "
                f"use e.g. 0-15,32 or {', '.join(CHANNEL_GROUPS)}"
            )
        first = int(found.group(1))
        last = int(found.group(2)) if found.group(2) is not None else first
        if last < first:
            raise ValueError(f"bad channel range {part.strip()!r} in {text!r}: the end is before the start")
        if last >= channels:
            raise ValueError(f"channel {last} is out of range: the code has channels 0-{channels - 1}")
        selected.extend(range(first, last + 1))
    return _checked_channels(selected, channels)


def _checked_channels(selected: Sequence[int], channels: int) -> list[int]:
    if not selected:
        raise ValueError("no channels selected")
    outside = [c for c in selected if not 0 <= c < channels]
    if outside:
        raise ValueError(f"channel {outside[0]} is out of range: the code has channels 0-{channels - 1}")
    repeated = sorted({c for c in selected if selected.count(c) > 1})
    if repeated:
        raise ValueError(f"channel {repeated[0]} is listed more than once")
    return list(selected)


def channel_mask(code_shape: Sequence[int], channels: Sequence[int]) -> Tensor:
    """Boolean mask of ``code_shape`` (``(C, H, W)`` or ``(D,)``) selecting whole channels (entries)."""
    selected = _checked_channels([int(c) for c in channels], code_shape[0])
    mask = torch.zeros(tuple(code_shape), dtype=torch.bool)
    mask[selected] = True
    return mask


def window_mask(code_shape: Sequence[int], window: tuple[int, int, int, int]) -> Tensor:
    """Boolean mask ``(C, H, W)`` selecting code cells ``y ≤ row < y + h``, ``x ≤ col < x + w``."""
    if len(code_shape) != 3:
        raise ValueError(f"a window needs a spatial code (C, H, W); this code is {tuple(code_shape)}")
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 4
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in window)
    ):
        raise ValueError(f"a window is (y, x, height, width), four integers in code cells, got {window!r}")
    y, x, h, w = (int(n) for n in window)
    _, height, width = code_shape
    if h < 1 or w < 1:
        raise ValueError(f"window height and width must be at least 1, got {h}×{w}")
    if y < 0 or x < 0 or y + h > height or x + w > width:
        raise ValueError(
            f"window rows {y}:{y + h}, cols {x}:{x + w} is outside the code of {height}×{width} cells"
        )
    mask = torch.zeros(tuple(code_shape), dtype=torch.bool)
    mask[:, y : y + h, x : x + w] = True
    return mask


@dataclass
class GalleryResult:
    """One reconstruction per channel, ``images`` ``(N, 3, H, W)`` on the CPU in [0, 1].

    ``feature_error[i]`` is the error on channel ``channels[i]`` alone (NaN for tiles a stop
    left unstarted and for ``empty`` channels, whose images are black). ``empty``: the channels
    whose target is all zero (in the mask), left out: there is nothing of them to match.
    """

    images: Tensor
    channels: list[int]
    feature_error: list[float]
    seconds: float
    settings: Settings
    stopped: bool = False
    spec: str = ""
    empty: list[int] = field(default_factory=list)

    def metrics(self) -> dict[str, object]:
        return {
            "rep": self.spec,
            "seconds": self.seconds,
            "stopped": self.stopped,
            "channels": [{"channel": c, "feature_error": e} for c, e in zip(self.channels, self.feature_error)],
            "empty_channels": self.empty,
            "settings": asdict(self.settings),
        }


def channel_gallery(
    rep: Representation,
    image: Tensor,
    channels: Sequence[int],
    *,
    mask: Tensor | None = None,
    settings: Settings | None = None,
    device: str | torch.device = "auto",
    chunk: int | None = None,
    on_tile: Callable[[int, Tensor, float], None] | None = None,
    on_step: Callable[[Step, list[int]], None] | None = None,
    stop: StopSignal | None = None,
) -> GalleryResult:
    """Invert ``image`` ``(3, H, W)`` once per channel, matching that channel alone.

    ``mask`` (optional, as ``check_mask`` takes it) further restricts every tile, e.g. to a window.
    ``chunk`` tiles are optimized per batch: all of them on CUDA, one on the CPU, where batching
    costs more per image than it saves. Every tile starts from the same random image it would get
    in one batch, so the result does not depend on ``chunk``. ``on_tile(index, image (3, H, W),
    feature_error)`` runs as each tile finishes; ``on_step(step, tiles)`` after every step, with
    the chunk's images and their indices (``step`` counts over the whole gallery).
    """
    settings = settings or Settings()
    if not isinstance(settings, Settings):
        raise ValueError(f"settings must be an invviz.Settings, got {type(settings).__name__}")  # noqa: TRY004
    _check_image(image)
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in channels):
        raise ValueError(f"channels must be integers, got {list(channels)!r}")
    settings = settings.resolved(rep)
    assert settings.iters is not None
    per_tile = settings.iters + polishing(rep, settings)  # each tile's steps and polishing rounds
    dev = resolve_device(device)
    height, width = _image_size(image)
    rep = rep.to(dev)
    target = rep.code_of(image.to(dev, torch.float32)[None])
    code_shape = tuple(target.shape[1:])
    channels = _checked_channels([int(c) for c in channels], code_shape[0])
    masks = torch.zeros((len(channels), *code_shape), dtype=torch.bool)
    for index, channel in enumerate(channels):
        masks[index, channel] = True
    if mask is not None:
        masks &= check_mask(mask, code_shape)
    selected = target.abs().mul(masks.to(dev)).flatten(1).sum(1).cpu()
    live = torch.nonzero(selected != 0).flatten().tolist()
    if not live:
        which = f"channel {channels[0]}" if len(channels) == 1 else f"all {len(channels)} channels"
        raise ValueError(f"{which} of the target code {'is' if len(channels) == 1 else 'are'} all zero (in the mask): nothing to match")
    if chunk is None:
        chunk = len(channels) if dev.type == "cuda" else 1
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")

    count = len(channels)
    colour = image_channels(rep, settings)
    assert settings.start_noise is not None
    starts = random_start(count, colour, height, width, settings.seed, settings.start_noise, grey=settings.grey)
    images = torch.zeros(count, 3, height, width)
    errors = [math.nan] * count
    began = time.perf_counter()
    # Tiles of all-zero channels are skipped; the others keep the starts they would have in one batch.
    chunks = [live[first : first + chunk] for first in range(0, len(live), chunk)]
    stopped = False
    for number, tiles in enumerate(chunks):
        if stop is not None and stop.is_set():
            stopped = True
            break
        offset = number * per_tile

        def chunk_step(step: Step, tiles: list[int] = tiles, offset: int = offset) -> None:
            assert on_step is not None
            total = len(chunks) * per_tile
            on_step(replace(step, step=offset + step.step, total=total, rounds=len(chunks) * step.rounds), tiles)

        try:
            result = invert(
                rep,
                target=target,
                size=(height, width),
                mask=masks[tiles],
                settings=settings,
                batch=len(tiles),
                init=starts[tiles],
                device=dev,
                on_step=chunk_step if on_step is not None else None,
                stop=stop,
            )
        except DivergenceError as error:
            images[tiles] = error.last_good
            raise DivergenceError(offset + error.step, images) from error
        images[tiles] = result.images
        for index, tile_error in zip(tiles, result.feature_error):
            errors[index] = tile_error
            if on_tile is not None:
                on_tile(index, images[index], tile_error)
        if result.stopped:
            stopped = True
            break
    return GalleryResult(
        images=images,
        channels=channels,
        feature_error=errors,
        seconds=time.perf_counter() - began,
        settings=settings,
        stopped=stopped,
        spec=rep.spec,
        empty=[channels[i] for i in sorted(set(range(count)) - set(live))],
    )


def receptive_field_crop(image: Tensor, box: Box) -> Tensor:
    """The part ``(3, h, w)`` of ``image`` ``(3, H, W)`` inside ``box`` (clipped to the image)."""
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    clipped = box.clip(image.shape[1], image.shape[2])
    if clipped.height <= 0 or clipped.width <= 0:
        raise ValueError(f"box {box.as_tuple()} does not overlap the {image.shape[1]}×{image.shape[2]} image")
    return image[:, clipped.top : clipped.bottom, clipped.left : clipped.right]


def _image_size(image: Tensor) -> tuple[int, int]:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    return int(image.shape[1]), int(image.shape[2])
