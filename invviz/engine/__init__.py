"""Objectives and the optimization loop (no widget or display code here)."""

from ._device import resolve_device
from ._threads import release_idle_pool
from .loop import DivergenceError, InversionResult, Settings, Step, default_objective, invert, random_start
from .objectives import Context, Objective, alpha_norm, feature_error_squared, match, tv

__all__ = [
    "Context",
    "DivergenceError",
    "InversionResult",
    "Objective",
    "Settings",
    "Step",
    "alpha_norm",
    "default_objective",
    "feature_error_squared",
    "invert",
    "match",
    "random_start",
    "release_idle_pool",
    "resolve_device",
    "tv",
]
