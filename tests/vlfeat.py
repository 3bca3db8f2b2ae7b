"""VLFeat (Debian's ``libvl.so``, 0.9.21) through ctypes: the reference for HOG and dense SIFT.

``LIBVL`` is ``None`` when the library is missing; tests then skip with ``requires_vlfeat``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest

VL_HOG_VARIANT_UOCTTI = 1
HOG_ORIENTATIONS = 9

_float_p = ctypes.POINTER(ctypes.c_float)


class _DsiftGeometry(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("numBinT", "numBinX", "numBinY", "binSizeX", "binSizeY")]


class _DsiftFilter(ctypes.Structure):
    """``VlDsiftFilter`` as laid out in ``/usr/include/vl/dsift.h`` (its getters are inline)."""

    _fields_ = [
        *[(name, ctypes.c_int) for name in ("imWidth", "imHeight", "stepX", "stepY")],
        *[(name, ctypes.c_int) for name in ("boundMinX", "boundMinY", "boundMaxX", "boundMaxY")],
        ("geom", _DsiftGeometry),
        ("useFlatWindow", ctypes.c_int),
        ("windowSize", ctypes.c_double),
        ("numFrames", ctypes.c_int),
        ("descrSize", ctypes.c_int),
        ("frames", ctypes.c_void_p),
        ("descrs", _float_p),
        ("numBinAlloc", ctypes.c_int),
        ("numFrameAlloc", ctypes.c_int),
        ("numGradAlloc", ctypes.c_int),
        ("grads", ctypes.c_void_p),
        ("convTmp1", _float_p),
        ("convTmp2", _float_p),
    ]


def _load() -> ctypes.CDLL | None:
    for name in ("libvl.so", "libvl.so.1", ctypes.util.find_library("vl")):
        if name is None:
            continue
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        size = ctypes.c_uint64
        library.vl_hog_new.restype = ctypes.c_void_p
        library.vl_hog_new.argtypes = [ctypes.c_int, size, ctypes.c_int]
        library.vl_hog_delete.argtypes = [ctypes.c_void_p]
        library.vl_hog_set_use_bilinear_orientation_assignments.argtypes = [ctypes.c_void_p, ctypes.c_int]
        library.vl_hog_put_image.argtypes = [ctypes.c_void_p, _float_p, size, size, size, size]
        library.vl_hog_extract.argtypes = [ctypes.c_void_p, _float_p]
        for getter in (
            "vl_hog_get_width",
            "vl_hog_get_height",
            "vl_hog_get_dimension",
            "vl_hog_get_glyph_size",
        ):
            getattr(library, getter).restype = size
            getattr(library, getter).argtypes = [ctypes.c_void_p]
        library.vl_hog_render.argtypes = [ctypes.c_void_p, _float_p, _float_p, size, size]
        library.vl_dsift_new_basic.restype = ctypes.POINTER(_DsiftFilter)
        library.vl_dsift_new_basic.argtypes = [ctypes.c_int] * 4
        library.vl_dsift_process.argtypes = [ctypes.POINTER(_DsiftFilter), _float_p]
        library.vl_dsift_delete.argtypes = [ctypes.POINTER(_DsiftFilter)]
        return library
    return None


LIBVL = _load()
requires_vlfeat = pytest.mark.skipif(
    LIBVL is None, reason="VLFeat's libvl.so not found (apt-get install libvlfeat1)"
)


def _pointer(array: np.ndarray) -> ctypes._Pointer:
    return array.ctypes.data_as(_float_p)


def _float_image(gray: np.ndarray) -> np.ndarray:
    if gray.ndim != 2:
        raise ValueError(f"expected a (H, W) gray image, got {gray.shape}")
    return np.ascontiguousarray(gray, dtype=np.float32)


def vl_hog(gray: np.ndarray, cell_size: int = 8, bilinear: bool = False) -> np.ndarray:
    """UoCTTI HOG of a ``(H, W)`` image: ``(31, rows, cols)`` float32."""
    assert LIBVL is not None
    image = _float_image(gray)
    hog = LIBVL.vl_hog_new(VL_HOG_VARIANT_UOCTTI, HOG_ORIENTATIONS, 0)
    try:
        LIBVL.vl_hog_set_use_bilinear_orientation_assignments(hog, int(bilinear))
        LIBVL.vl_hog_put_image(hog, _pointer(image), image.shape[1], image.shape[0], 1, cell_size)
        shape = (LIBVL.vl_hog_get_dimension(hog), LIBVL.vl_hog_get_height(hog), LIBVL.vl_hog_get_width(hog))
        features = np.zeros(shape, np.float32)
        LIBVL.vl_hog_extract(hog, _pointer(features))
    finally:
        LIBVL.vl_hog_delete(hog)
    return features


def vl_hog_render(features: np.ndarray) -> np.ndarray:
    """VLFeat's glyph picture of a ``(31, rows, cols)`` UoCTTI code: ``(rows * 21, cols * 21)``."""
    assert LIBVL is not None
    code = np.ascontiguousarray(features, dtype=np.float32)
    hog = LIBVL.vl_hog_new(VL_HOG_VARIANT_UOCTTI, HOG_ORIENTATIONS, 0)
    try:
        glyph = LIBVL.vl_hog_get_glyph_size(hog)
        image = np.zeros((code.shape[1] * glyph, code.shape[2] * glyph), np.float32)
        LIBVL.vl_hog_render(hog, _pointer(image), _pointer(code), code.shape[2], code.shape[1])
    finally:
        LIBVL.vl_hog_delete(hog)
    return image


def vl_dsift(gray: np.ndarray, bin_size: int = 5, step: int = 5) -> np.ndarray:
    """Dense SIFT of a ``(H, W)`` image as ``vl_dsift_new_basic`` computes it: ``(128, rows, cols)``.

    Frames are row-major (rows along y), each descriptor in VLFeat's order.
    """
    assert LIBVL is not None
    image = _float_image(gray)
    height, width = image.shape
    dsift = LIBVL.vl_dsift_new_basic(width, height, step, bin_size)
    try:
        LIBVL.vl_dsift_process(dsift, _pointer(image))
        state = dsift.contents
        count, size = state.numFrames, state.descrSize
        descriptors = np.ctypeslib.as_array(state.descrs, shape=(count * size,)).copy()
    finally:
        LIBVL.vl_dsift_delete(dsift)
    span = (height - 1 - 3 * bin_size, width - 1 - 3 * bin_size)
    rows, cols = (s // step + 1 for s in span)
    assert rows * cols == count, (rows, cols, count)
    return descriptors.reshape(rows, cols, size).transpose(2, 0, 1)


def gray_255(images: np.ndarray) -> np.ndarray:
    """The representations' input conversion in numpy float32: ``(3, H, W)`` in [0, 1] -> ``(H, W)``."""
    rgb = images.astype(np.float32)
    return (
        np.float32(0.299) * rgb[0] + np.float32(0.587) * rgb[1] + np.float32(0.114) * rgb[2]
    ) * np.float32(255) - np.float32(128)


def sample_images() -> dict[str, np.ndarray]:
    """Seeded random images and crops of scikit-image's photos, ``(3, H, W)`` float32 in [0, 1].

    Sizes that are and are not multiples of HOG cells / SIFT steps.
    """
    from skimage import data

    rng = np.random.default_rng(0)
    images = {
        "random_64x64": rng.random((3, 64, 64), dtype=np.float32),
        "random_67x93": rng.random((3, 67, 93), dtype=np.float32),
    }
    crops = {"chelsea": (40, 120, 256, 256), "coffee": (60, 150, 256, 256), "astronaut": (30, 170, 131, 150)}
    for name, (top, left, height, width) in crops.items():
        photo = getattr(data, name)()[top : top + height, left : left + width]
        images[f"{name}_{height}x{width}"] = photo.transpose(2, 0, 1).astype(np.float32) / 255
    return images


def assert_matches(code: np.ndarray, reference: np.ndarray, tolerance: float = 1e-4) -> float:
    """Check ``max |code - reference| <= tolerance * (reference range)``; returns that relative error."""
    assert code.shape == reference.shape, (code.shape, reference.shape)
    error = float(np.abs(code - reference).max() / (reference.max() - reference.min()))
    assert error <= tolerance, f"max difference is {error:.2e} of the feature range"
    return error
