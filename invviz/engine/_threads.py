"""Idle OpenMP thread pools, released so the thread that computes gets the cores.

torch's CPU ops run on OpenMP (libgomp in the PyPI wheels), which keeps one pool of threads per
thread that has run a parallel op. Once the notebook's main thread has used torch, its pool stays
alive while the engine's worker computes, and libgomp, seeing more of its threads than cores,
switches every pool to near-zero spinning: each of the hundreds of small ops in a forward+backward
then waits on a futex wake-up. Measured on the 2-core machine (Lite0 ``blocks.4``, 224²): 51-64 ms
per step from the worker against 26-36 ms from the main thread, and equal again once the main
thread's idle pool is released with OpenMP 5's ``omp_pause_resource_all``. The pool is recreated
on the thread's next parallel op, at the cost of starting its threads.

The worker also pays for glibc's allocator: a thread's arena serves the multi-megabyte
activations with fresh ``mmap``s, ~3,400 page faults per step of the same net (none on the main
thread, whose threshold adapts). ``keep_freed_memory`` fixes the thresholds so freed blocks are
reused: 0 faults per step, at the price of the process keeping what it freed for reuse. The
thresholds do not govern a thread arena's heaps (64 MiB each), which glibc unmaps whenever one falls
empty: in about half of the processes a job's worker still paid 400-3,400 page faults per step
(1.3-1.4x the main thread's step), depending on where its peak fell. So ``keep_freed_memory`` also
caps the arenas at one, glibc's main arena, which every thread created afterwards shares (the
threads compute one at a time here, so they hardly contend for it); ``invviz.engine`` calls it on
import, before torch has started threads of its own: 0 of 6 processes slow against 2 of 5 with
the thresholds alone.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

#: OpenMP runtimes torch may be linked against (GNU, LLVM, Intel).
_RUNTIMES = ("libgomp", "libomp", "libiomp5")
_OMP_PAUSE_SOFT = 1
#: glibc ``mallopt`` parameters and the largest mmap threshold it accepts on 64-bit (32 MiB).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MAX_MMAP_THRESHOLD = 32 * 2**20


def openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process now (empty off Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return {
                line.split(maxsplit=5)[-1].strip()
                for line in maps
                if any(line.rsplit("/", 1)[-1].startswith(name) for name in _RUNTIMES)
            }
    except OSError:
        return set()


@functools.cache
def _pause_functions() -> tuple[Callable[[int], int], ...]:
    """``omp_pause_resource_all`` of every OpenMP runtime loaded in this process (none off Linux)."""
    functions = []
    for path in sorted(openmp_runtimes()):
        try:
            function = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int
        functions.append(function)
    return tuple(functions)


def release_idle_pool() -> None:
    """Let the calling thread's idle OpenMP threads exit (a no-op inside a parallel region)."""
    for pause in _pause_functions():
        pause(_OMP_PAUSE_SOFT)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc reuse freed blocks up to 32 MiB instead of unmapping them, and give threads that
    have no arena yet its main one (once per process).

    Returns whether the allocator took the thresholds (False off glibc).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Trimming is limited too: otherwise the top of the heap goes back to the system at each free.
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2 * _MAX_MMAP_THRESHOLD)
    mapped = mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
    mallopt(_M_ARENA_MAX, 1)
    return bool(trimmed and mapped)
