"""The fused CPU kernels of ``_native.c``, compiled on first use and loaded through ctypes.

An inversion step on the CPU spends most of its time in the network; what it does around it
(pyramid composition, clamping, pixel priors, Adam, the data term) costs dozens of torch
operations, each a pass over the image, and each slow right after the network has pushed torch's
and the interpreter's code out of the caches. Here a step is three calls: ``DataTerm.value`` and
``DataTerm.gradient`` around the network's backward, and ``Levels.update`` after it, which also
composes the next step's image (``Levels.compose`` hands it over). The C file is compiled with the system's C compiler into a per-user cache the first time
it is needed, with OpenMP where the compiler has it; its threads are used only where they are
torch's own (``threads()``). Without a compiler (or with ``INVVIZ_NATIVE=0`` in the environment)
``library()`` is ``None`` and the engine uses torch operations for the same arithmetic.
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

from ..representations import InputLayout
from ..representations._surrogates import Backward, smoothed_relu6_grad
from ._threads import openmp_runtimes

SOURCE = Path(__file__).with_name("_native.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno")
#: Tried in order: OpenMP threads (with SIMD), then SIMD only; each with ``-march=native``, then without.
VARIANTS = (("-fopenmp",), ("-fopenmp-simd",))
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_threaded = [False]

# Pointers travel as plain addresses (``Tensor.data_ptr()``): a fraction of a ctypes cast's cost.
_ptr_t, _int, _dbl, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_size_t
_SIGNATURES: dict[str, list[type]] = {
    "invviz_upsample_add": [_ptr_t, _int, _int, _ptr_t, _ptr_t, _int, _int, _int, _int, _int],
    "invviz_clamp_into": [_ptr_t, _ptr_t, _size, _int],
    "invviz_smoothed_relu6_backward": [_ptr_t, _ptr_t, _ptr_t, _size, _dbl, _int],
    "invviz_upsample_adjoint": [_ptr_t, _int, _int, _ptr_t, _int, _int, _int, _ptr_t, _int],
    "invviz_priors": [_ptr_t, _ptr_t, _int, _int, _int, _int, _dbl, _dbl, _dbl, _dbl, _dbl, _dbl, _ptr_t, _ptr_t,
                      _ptr_t, _ptr_t, _ptr_t, _ptr_t, _int],
    "invviz_adam": [_ptr_t, _ptr_t, _ptr_t, _ptr_t, _size, _dbl, _dbl, _dbl, _dbl, _int, _int],
    "invviz_compose": [_int, _int, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _int],
    "invviz_relative_error": [_ptr_t, _ptr_t, _int, _int, ctypes.c_long, _ptr_t, _int, _dbl, _dbl, _ptr_t, _ptr_t,
                              _ptr_t, _ptr_t, _int],
    "invviz_relative_error_grad": [_ptr_t, _ptr_t, _int, _int, ctypes.c_long, _ptr_t, _ptr_t, _ptr_t, _int],
    "invviz_update": [_ptr_t, _int, _int, _int, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _dbl, _dbl, _dbl,
                      _dbl, _dbl, _dbl, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _dbl, _dbl, _dbl,
                      _dbl, _int, _ptr_t, _ptr_t, _ptr_t, _ptr_t, _int],
    "invviz_prepare": [_ptr_t, _int, _int, _int, _int, _ptr_t, _int],
}


class _Rectifier(ctypes.Structure):
    """``struct rectifier`` of ``_native.c``: a code's final clamp and its reviving slope."""

    _fields_ = [("low", ctypes.c_float), ("high", ctypes.c_float), ("revive", ctypes.c_float)]


class _PreparedInput(ctypes.Structure):
    """``struct prepared_input`` of ``_native.c``: where and how the network's input is written."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("stride", ctypes.c_long * 4),
        ("grad_stride", ctypes.c_long * 4),
        ("scale", ctypes.c_float * 4),
        ("shift", ctypes.c_float * 4),
    ]


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
        "\0".join([SOURCE.read_text(), version, repr((FLAGS, VARIANTS)), platform.machine(), _cpu_signature()]).encode()
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
        for variant in VARIANTS:
            for arch in (["-march=native"], []):
                command = [compiler, *FLAGS, *variant, *arch, "-o", partial, str(SOURCE), "-lm"]
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
            _threaded[0] = lib is not None and _shares_torch_openmp()
        return _loaded["lib"]


def _shares_torch_openmp() -> bool:
    """Whether the loaded kernels' OpenMP threads are torch's own: torch parallelizes with OpenMP
    and the process holds one OpenMP runtime (the dynamic linker gave the kernels torch's copy,
    whose soname they asked for). Two runtimes would each keep a pool spinning on the same cores."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info() and len(openmp_runtimes()) == 1


def threads() -> int:
    """Threads the kernels split their work over: torch's intra-op count where they share its OpenMP
    pool (``library()`` decides), else 1."""
    return torch.get_num_threads() if _threaded[0] else 1


def usable(*tensors: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
    """Whether the kernels can work on these tensors: built, on the CPU, contiguous float32 (4-d
    ones contiguous in ``memory_format``; the data term's kernels work on channels-last codes
    too, element by element in memory order)."""
    return library() is not None and all(_dense_float32(t, memory_format) for t in tensors)


def _dense_float32(t: Tensor, memory_format: torch.memory_format) -> bool:
    """``usable``'s test of one tensor, the library aside."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and (t.is_contiguous(memory_format=memory_format) if t.dim() == 4 else t.is_contiguous())
    )


def memory_format(t: Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-d tensor dense in it (and not also in the default layout), else
    the default ``contiguous_format``."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "native kernels are not available (check usable() first)"
    return lib


# The single kernels, each as the fused calls below run it; tests/test_native.py checks each one
# against its torch formulation.


def upsample_add(coarse: Tensor, fine: Tensor, clamp: bool = False) -> Tensor:
    """``fine + up(coarse)`` for ``(B, C, h, w)`` and ``(B, C, H, W)`` (``H`` is ``2h`` or ``2h − 1``).

    With ``clamp`` the sum is clamped to [0, 1] and ``fine`` is corrected in place by what was cut
    off, so ``fine + up(coarse)`` equals the result exactly afterwards.
    """
    batch, channels, h, w = coarse.shape
    height, width = fine.shape[-2:]
    out = torch.empty_like(fine)
    _lib().invviz_upsample_add(coarse.data_ptr(), h, w, fine.data_ptr(), out.data_ptr(), height, width, batch * channels,
                               int(clamp), threads())
    return out


def clamp_into(fine: Tensor) -> Tensor:
    """``fine`` clamped to [0, 1] in place; returns a copy of the result."""
    out = torch.empty_like(fine)
    _lib().invviz_clamp_into(fine.data_ptr(), out.data_ptr(), fine.numel(), threads())
    return out


def smoothed_relu6_backward_for_run() -> Backward:
    """The smoothed ReLU6's gradient (``representations._surrogates.smoothed_relu6_grad``) in one
    pass, for float32 CPU tensors dense in one shared layout, written into ``grad`` when
    ``in_place``; torch's formulation for anything else, and when the kernels are off. The library
    is looked up once, for the many calls of one run: a step through Lite0 makes one per rectifier,
    where looking the kernels up again (and reading ``INVVIZ_NATIVE``) would cost a few µs each."""
    lib = library()
    if lib is None:
        return smoothed_relu6_grad

    def backward(grad: Tensor, pre: Tensor, width: float, in_place: bool = False) -> Tensor:
        layout = memory_format(pre)
        if not (grad.stride() == pre.stride() and _dense_float32(pre, layout) and _dense_float32(grad, layout)):
            return smoothed_relu6_grad(grad, pre, width, in_place)
        out = grad if in_place else torch.empty_like(pre)
        lib.invviz_smoothed_relu6_backward(grad.data_ptr(), pre.data_ptr(), out.data_ptr(), pre.numel(), width, threads())
        return out

    return backward


def upsample_adjoint(grad: Tensor, coarse_size: tuple[int, int]) -> Tensor:
    """The adjoint of ``up`` in ``upsample_add``: ``(B, C, H, W)`` → ``(B, C, h, w)``."""
    batch, channels, height, width = grad.shape
    h, w = coarse_size
    out = grad.new_empty(batch, channels, h, w)
    rows = torch.empty(batch * channels * height * w)
    _lib().invviz_upsample_adjoint(grad.data_ptr(), height, width, out.data_ptr(), h, w, batch * channels, rows.data_ptr(),
                                   threads())
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
    chroma: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-image TV^β and α-norm values ``(B,)`` (float64, unweighted means) of ``(B, C, H, W)``
    images; adds ``tv_weight``·∇TV + ``alpha_weight``·∇α into ``grad`` in place. ``chroma``: the
    TV prior's extra weight on colour differences (``objectives.tv``)."""
    batch, channels, height, width = images.shape
    tv_values = torch.zeros(batch, dtype=torch.float64)
    alpha_values = torch.zeros(batch, dtype=torch.float64)
    slope = torch.empty(height * width)
    mixed = torch.empty(channels * height * width)
    sums = torch.empty(2 * height, dtype=torch.float64)
    centre = torch.tensor(mean, dtype=torch.float32)
    _lib().invviz_priors(
        images.data_ptr(), grad.data_ptr(), batch, channels, height, width, tv_weight, beta, chroma, epsilon,
        alpha_weight, alpha, centre.data_ptr(), slope.data_ptr(), mixed.data_ptr(), sums.data_ptr(),
        tv_values.data_ptr(), alpha_values.data_ptr(), threads(),
    )
    return tv_values, alpha_values


def adam(param: Tensor, grad: Tensor, first: Tensor, second: Tensor, lr: float, betas: tuple[float, float],
         eps: float, step: int) -> None:
    """One ``torch.optim.Adam`` update of ``param`` in place (moments ``first``/``second`` too)."""
    _lib().invviz_adam(param.data_ptr(), grad.data_ptr(), first.data_ptr(), second.data_ptr(), param.numel(), lr, betas[0], betas[1],
                       eps, step, threads())


class DataTerm:
    """The data term ``(‖Φ − Φ0‖² / n)^(p/2)`` for codes ``(B, ...)`` of one shape against a fixed
    ``target`` (one code ``(1, ...)`` or ``(B, ...)``) and ``norm`` (``(1,)`` or ``(B,)``), all
    contiguous float32 on the CPU, with the kernels bound and the scratch allocated once: right
    after the network every Python line and torch call is slow (its code is out of the caches), so
    a step's data term is one call each way.

    ``rectifier`` ``(low, high, slope)``: the codes given are the codes before a final clamp to
    ``[low, high]`` (``high`` may be infinite), and the gradient is the reviving one of
    ``representations._surrogates.RevivingClamp`` with ``slope``: the clamp and its backward fused in as well."""

    def __init__(self, batch: int, count: int, target: Tensor, norm: Tensor, power: float, floor: float,
                 rectifier: tuple[float, float, float] | None = None) -> None:
        lib = _lib()
        self._value, self._grad = lib.invviz_relative_error, lib.invviz_relative_error_grad
        self.batch, self.count, self.power, self.floor = batch, count, float(power), float(floor)
        self.target, self.norm = target, norm  # kept alive: the kernels read them by address
        self._shared = int(target.shape[0] == 1)
        self._partial = torch.empty(batch * -(-count // 32768), dtype=torch.float64)
        self._rectifier = _Rectifier(*rectifier) if rectifier is not None else None
        self._rect = ctypes.addressof(self._rectifier) if self._rectifier is not None else None

    def value(self, code: Tensor) -> tuple[Tensor, Tensor]:
        """Per image ``(value, slope)``, ``(B,)`` each: the term and the factor of ``Φ − Φ0`` in its
        gradient (0 where the relative square is under ``floor`` and ``power`` ≠ 2)."""
        value, slope = code.new_empty(2, self.batch).unbind(0)
        self._value(code.data_ptr(), self.target.data_ptr(), self._shared, self.batch, self.count,
                    self.norm.data_ptr(), self.norm.numel(), self.power, self.floor, self._rect, value.data_ptr(),
                    slope.data_ptr(), self._partial.data_ptr(), threads())
        return value, slope

    def gradient(self, code: Tensor, scale: Tensor) -> Tensor:
        """``scale[b] · (Φ − Φ0)``, the gradient given the incoming gradient times the slope (with
        a rectifier: with respect to the code before it)."""
        out = torch.empty_like(code)
        scale = scale.contiguous()
        self._grad(code.data_ptr(), self.target.data_ptr(), self._shared, self.batch, self.count, scale.data_ptr(),
                   self._rect, out.data_ptr(), threads())
        return out


def _table(tensors: list[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class Levels:
    """A pyramid's levels ``(B, C, H_l, W_l)`` (``H_{l+1} = ⌈H_l / 2⌉``) with their Adam moments and
    every buffer the per-step kernel needs, allocated once: ``update(...)`` after the network
    (priors, each level's gradient, Adam: one call instead of a dozen) also composes the next
    image while the levels are in cache, and ``compose()`` before the network hands that over
    (composing only when no update came before, as at the first step)."""

    def __init__(self, levels: list[Tensor], mean: tuple[float, ...], basis: Tensor | None = None) -> None:
        """``basis``: a 3 × 3 colour basis Adam runs in (``basis[r, k]``: colour r of axis k; the
        levels of 3-channel images then take steps ``basis @ d`` for Adam's steps ``d`` on the
        gradient ``basis.T @ g``, see ``loop.colour_basis``); ``None``: each channel on its own."""
        self.levels = levels
        batch, channels, height, width = levels[0].shape
        if basis is not None and (channels != 3 or basis.shape != (3, 3)):
            raise ValueError(f"a colour basis of shape {tuple(basis.shape)} for {channels}-channel images")
        self.basis = None if basis is None else basis.to(torch.float32).contiguous()  # kept alive for its address
        self._basis = None if self.basis is None else self.basis.data_ptr()
        self.batch, self.channels = batch, channels
        self.steps = 0
        self.first = [torch.zeros_like(level) for level in levels]
        self.second = [torch.zeros_like(level) for level in levels]
        # grads[0] is the image's gradient, set at each update; the coarser ones are computed into these.
        self.grads = [levels[0], *[torch.empty_like(level) for level in levels[1:]]]
        self.partial = [levels[0], *[torch.empty_like(level) for level in levels[1:]]]
        self.slope = torch.empty(height * width)
        self.mixed = torch.empty(channels * height * width)  # TV's colour-stretched image, one at a time
        self.sums = torch.empty(2 * height, dtype=torch.float64)
        self.rows = torch.empty(batch * channels * height * ((width + 1) // 2))
        self.tv_values = torch.zeros(batch, dtype=torch.float64)
        self.alpha_values = torch.zeros(batch, dtype=torch.float64)
        self.heights = (ctypes.c_int * len(levels))(*[level.shape[-2] for level in levels])
        self.widths = (ctypes.c_int * len(levels))(*[level.shape[-1] for level in levels])
        self.params_table, self.grads_table = _table(levels), _table(self.grads)
        self.first_table, self.second_table = _table(self.first), _table(self.second)
        self.partial_table = _table(self.partial)
        # The α-norm's centre (fused priors are for RGB images; others pass zero prior weights).
        self.centre = torch.tensor(mean, dtype=torch.float32) if len(mean) == channels else torch.zeros(channels)
        lib = _lib()
        self._compose, self._update = lib.invviz_compose, lib.invviz_update
        self._next: Tensor | None = None  # the image composed by the last update, not yet handed out
        self._prepare = lib.invviz_prepare
        self.input: Tensor | None = None  # the network's input, once attach_input is called
        self._input: _PreparedInput | None = None
        self._input_ref: int | None = None  # its address for the kernels
        self._image_grad: Tensor | None = None
        self._pad = (0, 0, 0, 0)
        # Scratch addresses, fixed for the life of the pyramid.
        self._scratch = (
            self.centre.data_ptr(), self.slope.data_ptr(), self.mixed.data_ptr(), self.sums.data_ptr(),
            self.tv_values.data_ptr(), self.alpha_values.data_ptr(), self.rows.data_ptr(),
        )

    def attach_input(self, layout: InputLayout) -> Tensor:
        """From now on every composed image is also written, as ``layout`` prepares it, into the
        returned tensor (zero padding included), which requires grad: feed it to the network
        (``Representation.forward_prepared``) and give ``update`` the network's gradient of it
        instead of the image's. Saves the network's own preparation (scaling, layout change and
        padding, forward and back), about 1 ms a step on Lite0 at 224² on this 2-core CPU."""
        if len(layout.scale) != self.channels or len(layout.shift) != self.channels or self.channels > 4:
            raise ValueError(f"an input layout of {len(layout.scale)} channels for {self.channels}-channel images")
        top, bottom, left, right = layout.pad
        height, width = self.levels[0].shape[-2:]
        prepared = torch.empty(
            self.batch, self.channels, height + top + bottom, width + left + right,
            memory_format=torch.channels_last if layout.channels_last else torch.contiguous_format,
        ).zero_()
        strides = prepared.stride()
        self._input = _PreparedInput(
            data=prepared.data_ptr() + prepared.element_size() * (top * strides[2] + left * strides[3]),
            stride=(ctypes.c_long * 4)(*strides),
            scale=(ctypes.c_float * 4)(*layout.scale),
            shift=(ctypes.c_float * 4)(*layout.shift),
        )
        self._input_ref = ctypes.addressof(self._input)
        self._pad = layout.pad
        self._image_grad = torch.empty_like(self.levels[0])
        self.input = prepared.requires_grad_(True)
        return self.input

    def compose(self) -> Tensor:
        """The composed image, clamped to [0, 1], the excess moved into the finest level (and
        written into the attached input, if any)."""
        if self._next is not None:
            out, self._next = self._next, None
            return out
        out = torch.empty_like(self.levels[0])
        self._compose(self.batch * self.channels, len(self.levels), self.params_table, self.heights, self.widths,
                      self.partial_table, out.data_ptr(), threads())
        if self._input_ref is not None:
            height, width = out.shape[-2:]
            self._prepare(out.data_ptr(), self.batch, self.channels, height, width, self._input_ref, threads())
        return out

    def update(self, image: Tensor, grad: Tensor, lr: float, priors: tuple[float, float, float, float, float, float],
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> tuple[list[float], list[float]]:
        """Add the priors' weighted gradients into ``grad`` (the image's, contiguous; with an
        attached input the network's gradient of that input instead, any strides), take one Adam
        step of every level, and return the priors' per-image values (unweighted).

        ``priors`` is ``(tv_weight, beta, chroma, epsilon, alpha_weight, alpha)`` (see ``priors``);
        a zero weight skips a prior. It also composes the next image, which the next ``compose()``
        returns; so the levels come back as ``compose()`` leaves them (the excess over [0, 1]
        moved into the finest level)."""
        self.steps += 1
        if self._input is not None and self._image_grad is not None:
            assert self.input is not None and grad.shape == self.input.shape, "the gradient of the attached input"
            strides = grad.stride()
            top, _, left, _ = self._pad
            self._input.grad = grad.data_ptr() + grad.element_size() * (top * strides[2] + left * strides[3])
            self._input.grad_stride = (ctypes.c_long * 4)(*strides)
            self.grads_table[0] = self._image_grad.data_ptr()
        else:
            self.grads_table[0] = grad.data_ptr()
        self._next = torch.empty_like(self.levels[0])
        tv_weight, beta, chroma, epsilon, alpha_weight, alpha = priors
        self._update(
            image.data_ptr(), self.batch, self.channels, len(self.levels), self.params_table, self.grads_table,
            self.first_table, self.second_table, self.heights, self.widths, tv_weight, beta, chroma, epsilon,
            alpha_weight, alpha, *self._scratch, lr, betas[0], betas[1], eps, self.steps, self.partial_table,
            self._next.data_ptr(), self._input_ref, self._basis, threads(),
        )
        return self.tv_values.tolist(), self.alpha_values.tolist()
