"""Loading, bundling and saving images; every image in invviz is a float tensor in [0, 1]."""

from __future__ import annotations

import io
import math
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

#: Bundled sample photos (see ``invviz/data/SOURCES.md``).
SAMPLES = ("chelsea", "coffee", "astronaut", "rocket")


class _TooLarge(Exception):
    """An image over ``max_side``, refused before decoding."""


def _open(source: str | Path | bytes, max_side: int | None = None) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later) and convert to RGB; ``max_side``:
    refuse larger images before decoding them."""
    if isinstance(source, str) and not source:
        raise ValueError("image path is empty")
    if isinstance(source, bytes):
        if not source:
            raise ValueError("image data is empty")
        stream: io.BytesIO | Path = io.BytesIO(source)
        label = "image data"
    else:
        stream = Path(source)
        label = str(source)
        if not stream.exists():
            raise ValueError(f"image file not found: {label}")
        if stream.is_dir():
            raise ValueError(f"{label} is a directory, not an image file")
        if stream.stat().st_size == 0:
            raise ValueError(f"image file is empty: {label}")
    try:
        with warnings.catch_warnings():
            # Large images are fine (they are resized); Pillow's bomb limit still raises below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                if max_side is not None and max(image.size) > max_side:
                    raise _TooLarge(f"{label} is {image.size[0]}×{image.size[1]} pixels; images are used as they are up to {max_side} pixels a side (resize it, e.g. with --size)")
                image.load()
                # Photos from phones and cameras store their pixels sideways with an EXIF tag
                # saying how to turn them; show them as any viewer does (a loaded copy).
                upright = ImageOps.exif_transpose(image)
    except _TooLarge as error:
        raise ValueError(str(error)) from None
    except UnidentifiedImageError:
        raise ValueError(f"{label} is not an image Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"{label} is too large to decode safely: {str(error).split(',')[0]}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode {label} (truncated or corrupt?): {error}") from None
    try:
        return _to_rgb(upright)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. One-channel 16-bit, 32-bit integer and float images are scaled, not clipped
    (Pillow's own conversion clips them at 255, turning a 16-bit PNG white): see ``_scaled``."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    scaled = _scaled(values, integer=image.mode != "F", sixteen_bit=image.mode.startswith("I;16"))
    return Image.fromarray(scaled).convert("RGB")


def _scaled(values: np.ndarray, *, integer: bool, sixteen_bit: bool) -> np.ndarray:
    """Pixel values as uint8, scaled rather than clipped: by their type's range when they fit it
    (16-bit: 0-65535, also for other integers above 255; else 0-255 for integers, [0, 1] for
    floats), otherwise from their minimum to their maximum. NaN or infinite values are refused."""
    _check_finite(values)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    unit = 255.0 if integer else 1.0
    if sixteen_bit or (integer and 255 < high <= 65535 and low >= 0):
        span = (0.0, 65535.0)
    elif low >= 0 and high <= unit:
        span = (0.0, unit)
    else:
        span = (low, high if high > low else low + 1.0)
    return np.rint(np.clip((values - span[0]) / (span[1] - span[0]), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_finite(values: np.ndarray) -> None:
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(f"the image has {bad} pixel value(s) that are NaN or infinite")


def _from_array(array: np.ndarray) -> Image.Image:
    """An ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as 8-bit RGB: uint8 as is,
    other types scaled as one-channel files are (``_scaled``); a fourth channel is dropped."""
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        channels = array.shape[2]
    elif array.ndim == 2:
        channels = 1
    else:
        raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"the image array is empty: {array.shape}")
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"an image array must hold integers or floats, got {array.dtype}")
    if array.dtype == np.uint8:
        pixels = array if channels != 1 else array[..., 0] if array.ndim == 3 else array
        return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    integer = bool(np.issubdtype(array.dtype, np.integer))
    scaled = _scaled(array.astype(np.float64)[..., :3], integer=integer, sixteen_bit=array.dtype == np.uint16)
    if scaled.ndim == 3 and scaled.shape[2] == 1:
        scaled = scaled[..., 0]
    return Image.fromarray(np.ascontiguousarray(scaled)).convert("RGB")


#: Widest aspect ratio resized whole; a longer image is first cut to this ratio around its centre
#: (the part the centre crop keeps, with margin), so a 1×100000 strip does not become 224×22400000.
_WIDEST_ASPECT = 8


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` then a centred ``size × size`` crop; an image of that size is kept."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    short = min(width, height)
    if max(width, height) > _WIDEST_ASPECT * short:
        keep = _WIDEST_ASPECT * short
        left, top = (width - min(width, keep)) // 2, (height - min(height, keep)) // 2
        image = image.crop((left, top, left + min(width, keep), top + min(height, keep)))
        width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """PIL image or ``(H, W, 3)`` uint8 array → ``(3, H, W)`` float in [0, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    # Contiguous (3, H, W), not a permuted view of the (H, W, 3) pixels: the layout callers expect.
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0).contiguous()


def load_image(
    source: str | Path | bytes | Image.Image | np.ndarray, size: int | None = None, max_side: int | None = None
) -> Tensor:
    """Load an image as ``(3, H, W)`` in [0, 1], optionally resized and centre-cropped to ``size``.

    ``max_side``: without ``size``, files and bytes larger than this are refused before they are
    decoded (the image would be used as it is).

    ``source``: a path, encoded bytes, a PIL image or an ``(H, W[, C])`` array (uint8 as is; 16-bit,
    other integer and float arrays scaled as one-channel image files are). Bad input raises one
    ``ValueError`` line (missing, empty, truncated or non-image files, NaN or infinite pixels).
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = None if size is None else int(size)
    if isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, Image.Image):
        image = _to_rgb(source)
    else:
        image = _open(source, max_side if size is None else None)
    if size is not None:
        image = _resize_crop(image, size)
    return to_tensor(image)


def sample_path(name: str) -> Path:
    """Path of a bundled sample photo (one of ``SAMPLES``)."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; samples: {', '.join(SAMPLES)}")
    return Path(str(resources.files("invviz") / "data" / f"{name}.jpg"))


def sample_image(name: str = "chelsea", size: int | None = 224) -> Tensor:
    """A bundled sample photo as ``(3, size, size)`` in [0, 1] (``size=None``: as stored)."""
    return load_image(sample_path(name), size)


def to_uint8(image: Tensor) -> np.ndarray:
    """``(3, H, W)`` or ``(1, H, W)`` in [0, 1] → ``(H, W, 3)`` uint8."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image))


def save_image(image: Tensor, path: str | Path) -> None:
    """Write ``(3, H, W)`` (or ``(1, H, W)``) in [0, 1] as an 8-bit RGB image (format from the file
    extension); values outside [0, 1] are clipped, NaN or infinite ones refused."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"save_image takes a (3, H, W) or (1, H, W) tensor, got {shape}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("the image to save has NaN or infinite values")
    to_pil(image).save(path)


def png_bytes(image: Tensor) -> bytes:
    """``(3, H, W)`` in [0, 1] → PNG bytes (what widgets send to the browser).

    zlib level 1: a 224² photo encodes in 5 ms instead of Pillow's default 17 ms, 0.5 % larger;
    live snapshots are encoded in the engine's thread, so this is time taken from the inversion.
    """
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_grid(images: list[Tensor] | Tensor, columns: int | None = None, pad: int = 2) -> Tensor:
    """Tile images ``(N, 3, H, W)`` (equal sizes) into one ``(3, H', W')`` grid on white."""
    batch = torch.stack(list(images)) if isinstance(images, list) else images
    count = batch.shape[0]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    _, channels, height, width = batch.shape
    grid = torch.ones(channels, rows * (height + pad) + pad, columns * (width + pad) + pad)
    for index in range(count):
        r, c = divmod(index, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[:, top : top + height, left : left + width] = batch[index].detach().cpu()
    return grid


def roughness(image: Tensor) -> float:
    """Mean absolute difference between neighbouring pixels of ``(3, H, W)`` (in [0, 1] units)."""
    image = image.detach().float()
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean()
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean()
    return float((dx + dy) / 2)
