"""The fused CPU kernels of ``_native.c``, compiled on first use and loaded through ctypes.

An inversion step on the CPU spends most of its time in the network; what it does around it
(pyramid composition, clamping, pixel priors, Adam) costs a dozen torch operations, each a pass
over the image. The C file does each in one or two passes. It is compiled with the system's C
compiler into a per-user cache the first time it is needed; without a compiler (or with
``INVVIZ_NATIVE=0`` in the environment) ``library()`` is ``None`` and the engine uses torch
operations for the same arithmetic.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_native.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}

_float_p = ctypes.POINTER(ctypes.c_float)
_double_p = ctypes.POINTER(ctypes.c_double)
_SIGNATURES: dict[str, list[type]] = {
    "invviz_upsample_add": [_float_p, ctypes.c_int, ctypes.c_int, _float_p, _float_p, ctypes.c_int,
                            ctypes.c_int, ctypes.c_int, _float_p, ctypes.c_int],
    "invviz_clamp_into": [_float_p, _float_p, ctypes.c_size_t],
    "invviz_upsample_adjoint": [_float_p, ctypes.c_int, ctypes.c_int, _float_p, ctypes.c_int, ctypes.c_int,
                                ctypes.c_int, _float_p],
    "invviz_priors": [_float_p, _float_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                      _float_p, _float_p, _double_p, _double_p],
    "invviz_adam": [_float_p, _float_p, _float_p, _float_p, ctypes.c_size_t, ctypes.c_double, ctypes.c_double,
                    ctypes.c_double, ctypes.c_double, ctypes.c_int],
}


def enabled() -> bool:
    """False when the user switched the kernels off with ``INVVIZ_NATIVE=0``."""
    return os.environ.get("INVVIZ_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "invviz"


def _build(compiler: str) -> Path | None:
    """The compiled library's path, compiling it if this source, compiler and CPU have none yet."""
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, " ".join(FLAGS), platform.machine(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"invviz-{os.getuid()}"):
        target = directory / f"native-{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(handle)
        except OSError:
            continue
        for arch in (["-march=native"], []):
            command = [compiler, *FLAGS, *arch, "-o", partial, str(SOURCE), "-lm"]
            if subprocess.run(command, check=False, capture_output=True, timeout=120).returncode == 0:
                os.replace(partial, target)  # atomic: another process sees all of it or none
                return target
        os.unlink(partial)
        return None
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` where they are switched off or cannot be built."""
    if not enabled() or sys.platform == "win32":
        return None
    with _lock:
        if "lib" not in _loaded:
            compiler = _compiler()
            path = None
            try:
                path = _build(compiler) if compiler else None
            except (OSError, subprocess.SubprocessError):
                path = None
            lib = ctypes.CDLL(str(path)) if path else None
            if lib is not None:
                for name, arguments in _SIGNATURES.items():
                    getattr(lib, name).argtypes = arguments
                    getattr(lib, name).restype = None
            _loaded["lib"] = lib
        return _loaded["lib"]


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can work on these tensors: built, on the CPU, contiguous float32."""
    return library() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def _ptr(tensor: Tensor) -> ctypes._Pointer[ctypes.c_float]:
    return ctypes.cast(tensor.data_ptr(), _float_p)


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "native kernels are not available (check usable() first)"
    return lib


def upsample_add(coarse: Tensor, fine: Tensor, clamp: bool = False) -> Tensor:
    """``fine + up(coarse)`` for ``(B, C, h, w)`` and ``(B, C, H, W)`` (``H`` is ``2h`` or ``2h − 1``).

    With ``clamp`` the sum is clamped to [0, 1] and ``fine`` is corrected in place by what was cut
    off, so ``fine + up(coarse)`` equals the result exactly afterwards.
    """
    batch, channels, h, w = coarse.shape
    height, width = fine.shape[-2:]
    out = torch.empty_like(fine)
    row = torch.empty(w + width)
    _lib().invviz_upsample_add(_ptr(coarse), h, w, _ptr(fine), _ptr(out), height, width, batch * channels,
                               _ptr(row), int(clamp))
    return out


def clamp_into(fine: Tensor) -> Tensor:
    """``fine`` clamped to [0, 1] in place; returns a copy of the result."""
    out = torch.empty_like(fine)
    _lib().invviz_clamp_into(_ptr(fine), _ptr(out), fine.numel())
    return out


def upsample_adjoint(grad: Tensor, coarse_size: tuple[int, int]) -> Tensor:
    """The adjoint of ``up`` in ``upsample_add``: ``(B, C, H, W)`` → ``(B, C, h, w)``."""
    batch, channels, height, width = grad.shape
    h, w = coarse_size
    out = grad.new_empty(batch, channels, h, w)
    row = torch.empty(w)
    _lib().invviz_upsample_adjoint(_ptr(grad), height, width, _ptr(out), h, w, batch * channels, _ptr(row))
    return out


def priors(
    images: Tensor,
    grad: Tensor,
    tv_weight: float,
    beta: float,
    epsilon: float,
    alpha_weight: float,
    alpha: float,
    mean: tuple[float, ...],
) -> tuple[Tensor, Tensor]:
    """Per-image TV^β and α-norm values ``(B,)`` (float64, unweighted means) of ``(B, C, H, W)``
    images; adds ``tv_weight``·∇TV + ``alpha_weight``·∇α into ``grad`` in place."""
    batch, channels, height, width = images.shape
    tv_values = torch.zeros(batch, dtype=torch.float64)
    alpha_values = torch.zeros(batch, dtype=torch.float64)
    slope = torch.empty(height * width)
    centre = torch.tensor(mean, dtype=torch.float32)
    _lib().invviz_priors(
        _ptr(images), _ptr(grad), batch, channels, height, width, tv_weight, beta, epsilon, alpha_weight, alpha,
        _ptr(centre), _ptr(slope), ctypes.cast(tv_values.data_ptr(), _double_p),
        ctypes.cast(alpha_values.data_ptr(), _double_p),
    )
    return tv_values, alpha_values


def adam(param: Tensor, grad: Tensor, first: Tensor, second: Tensor, lr: float, betas: tuple[float, float],
         eps: float, step: int) -> None:
    """One ``torch.optim.Adam`` update of ``param`` in place (moments ``first``/``second`` too)."""
    _lib().invviz_adam(_ptr(param), _ptr(grad), _ptr(first), _ptr(second), param.numel(), lr, betas[0], betas[1],
                       eps, step)
