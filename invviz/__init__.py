"""invviz: understand deep image representations by inverting them (Mahendran & Vedaldi, CVPR 2015)."""

from .engine import (
    Context,
    DivergenceError,
    InversionResult,
    Objective,
    Settings,
    Step,
    alpha_norm,
    feature_error_squared,
    invert,
    match,
    resolve_device,
    tv,
)
from .engine.analyses import (
    GalleryResult,
    channel_gallery,
    channel_mask,
    diversity,
    parse_channels,
    receptive_field_crop,
    restarts,
    window_mask,
)
from .engine.jobs import InversionEngine, Job, Progress, Snapshot
from .images import SAMPLES, image_grid, load_image, png_bytes, roughness, sample_image, save_image
from .representations import (
    Box,
    LayerInfo,
    Representation,
    available_models,
    layer_table,
    model_layers,
    register_representation,
    representation,
)
from .representations._glyphs import render_hog

__version__ = "0.1.0"

__all__ = [
    "SAMPLES",
    "Box",
    "Context",
    "DivergenceError",
    "GalleryResult",
    "InversionEngine",
    "InversionResult",
    "Job",
    "LayerInfo",
    "Objective",
    "Progress",
    "Representation",
    "Settings",
    "Snapshot",
    "Step",
    "alpha_norm",
    "available_models",
    "channel_gallery",
    "channel_mask",
    "diversity",
    "feature_error_squared",
    "image_grid",
    "invert",
    "layer_table",
    "load_image",
    "match",
    "model_layers",
    "parse_channels",
    "png_bytes",
    "receptive_field_crop",
    "register_representation",
    "render_hog",
    "representation",
    "resolve_device",
    "restarts",
    "roughness",
    "sample_image",
    "save_image",
    "tv",
    "window_mask",
]
