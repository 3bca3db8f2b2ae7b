"""Objectives and the optimization loop (no widget or display code here)."""

from ._device import resolve_device
from ._threads import keep_freed_memory, release_idle_pool
from .loop import DivergenceError, InversionResult, Settings, Step, default_objective, invert, random_start
from .objectives import Context, Objective, alpha_norm, feature_error_squared, match, tv

# Before torch starts threads of its own, so that the engine's worker shares glibc's main arena
# (see ``_threads``: a thread arena unmapped and refaulted its memory at every step).
keep_freed_memory()

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
