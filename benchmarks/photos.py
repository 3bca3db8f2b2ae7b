"""Natural photos for the benchmarks: invviz's four bundled samples and the other photos that ship
inside scikit-image's wheel (held out from the tuning of the defaults, which used the bundled four).
"""

from __future__ import annotations

import numpy as np
import torch

from invviz.images import SAMPLES, load_image, sample_image

#: scikit-image photos that are in its wheel (the others download, which fails offline).
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket",
    "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
)  # fmt: skip
#: Those the defaults were not tuned on.
HELD_OUT = tuple(name for name in SKIMAGE_PHOTOS if name not in SAMPLES)
#: scikit-image's grey photos (also in its wheel): smooth ones and textures.
GREY_PHOTOS = ("camera", "moon", "coins", "grass", "gravel", "brick", "clock")
#: Named sets for ``--images``.
PHOTO_SETS = {"colour": SKIMAGE_PHOTOS, "held-out": HELD_OUT, "grey": GREY_PHOTOS}


def photo_names(spec: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """``--images``: a named set (``colour``, ``held-out``, ``grey``), comma-separated photos, or ``default``."""
    if not spec:
        return default
    return PHOTO_SETS.get(spec) or tuple(spec.split(","))


def photo(name: str, size: int) -> torch.Tensor:
    """``(3, size, size)`` in [0, 1] (8-bit values): a bundled sample or a scikit-image photo,
    resized by the shorter side and centre-cropped."""
    if name in SAMPLES:
        return sample_image(name, size)
    if name not in SKIMAGE_PHOTOS + GREY_PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(SKIMAGE_PHOTOS + GREY_PHOTOS)}")
    from skimage import data

    pixels = getattr(data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return load_image(np.ascontiguousarray(pixels[..., :3], dtype=np.uint8), size)
