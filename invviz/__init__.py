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
    Representation,
    available_models,
    model_layers,
    register_representation,
    representation,
)

__version__ = "0.1.0"

__all__ = [
    "SAMPLES",
    "Box",
    "Context",
    "DivergenceError",
    "GalleryResult",
    "InversionEngine",
    "Job",
    "Progress",
    "Snapshot",
    "channel_gallery",
    "channel_mask",
    "diversity",
    "parse_channels",
    "receptive_field_crop",
    "restarts",
    "window_mask",
    "InversionResult",
    "Objective",
    "Representation",
    "Settings",
    "Step",
    "alpha_norm",
    "available_models",
    "feature_error_squared",
    "image_grid",
    "invert",
    "load_image",
    "match",
    "model_layers",
    "png_bytes",
    "register_representation",
    "representation",
    "resolve_device",
    "roughness",
    "sample_image",
    "save_image",
    "tv",
]
