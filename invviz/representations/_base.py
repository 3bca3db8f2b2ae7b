"""What is inverted: one base class every representation (CNN layer, HOG, dense SIFT) derives from."""

from __future__ import annotations

import numbers
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._geometry import Box, Window, axis_geometry, clipped_window_box, window_box

#: Steps of an inversion when neither the settings nor the representation ask for another count.
DEFAULT_ITERS = 200
#: The TV weight's first-step multiple (``Settings.tv_start``) when none is given.
TV_START = 2.0
#: Adam's first-moment decay β1 (``Settings.momentum``) when neither the settings nor the
#: representation ask for another: Adam's own.
ADAM_MOMENTUM = 0.9
#: Runs shorter than this many steps start with more TV at stride 8 and up (``default_tv_start``).
SHORT_RUN = 200


def channels_last_on_cpu(x: Tensor) -> Tensor:
    """``x`` in channels-last layout when it is a batch of CPU images, else ``x`` unchanged.

    Torch's CPU convolutions (oneDNN) run channels-last inputs faster, forward and backward: on
    this 2-core machine Lite0 blocks.4 / head forward+backward took 36 / 54 ms NCHW and 25 / 39 ms
    channels-last, VGG16 conv3_3 254 / 195 ms, AlexNet conv5 30 / 28 ms (224², batch 1). The
    values are the same up to float summation order; the gradient comes back in ``x``'s layout.
    Callers return their code ``.contiguous()`` (the default layout), as every user of a code expects.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass(frozen=True)
class InputLayout:
    """How a representation turns images into its network's first input, for an engine that writes
    that input itself (``Representation.input_layout``).

    Channel ``c`` of a pixel becomes ``scale[c] · pixel + shift[c]``; the result is padded with
    zeros by ``pad`` = ``(top, bottom, left, right)`` pixels and stored channels-last when
    ``channels_last``. ``prepare`` is the reference; ``Representation.forward_prepared`` takes it.
    """

    scale: tuple[float, ...]
    shift: tuple[float, ...]
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    channels_last: bool = True

    def prepare(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` images → the network's input ``(B, C, H + top + bottom, W + left + right)``."""
        scale = images.new_tensor(self.scale).view(1, -1, 1, 1)
        shift = images.new_tensor(self.shift).view(1, -1, 1, 1)
        top, bottom, left, right = self.pad
        prepared = F.pad(images * scale + shift, (left, right, top, bottom))
        return prepared.contiguous(memory_format=torch.channels_last) if self.channels_last else prepared


#: The coordinates Adam steps in for colour images (``engine.Settings.colour_basis``).
ColourBasis = Literal["opponent", "rgb"]


class LayerWithoutCode(ValueError):
    """The chosen layer gives no code tensor; ``short`` says why in a few words, for tables."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


class LayerNotRun(LayerWithoutCode):
    """The chosen module is not run in inference (e.g. GoogLeNet's auxiliary heads)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, NOT_RUN)


NOT_RUN = "does not run in inference"

#: What ``Representation.measure_layers`` gives per layer: (code shape, receptive field of the
#: centre cell and stride, both None for a vector code), or why the layer has no code
#: (``LayerWithoutCode.short``).
LayerMeasure = tuple[tuple[int, ...], Box | None, int | None] | str


class Representation(nn.Module):
    """An image representation Φ: images ``(B, 3, H, W)`` with values in [0, 1] to a code.

    The code is ``(B, C, H', W')`` for spatial representations and ``(B, D)`` for vectors.
    Each representation applies its own preprocessing (normalization, grayscale conversion) inside
    ``forward``, so the engine always optimizes plain [0, 1] RGB pixels.

    Subclasses set ``model`` (the registry name) and ``layers`` (every layer name, shallow to deep),
    and implement ``forward`` and ``windows`` (the chain of windowed operations up to ``layer``, from
    which receptive fields are derived; ``None`` once the code is no longer spatial).
    """

    model: ClassVar[str] = ""
    layers: ClassVar[tuple[str, ...]] = ()
    #: side length the model was trained at; ``None`` means "use the image at its own size".
    native_size: ClassVar[int | None] = None
    #: whether only the luminance of the image reaches the code (HOG, SIFT).
    grayscale: ClassVar[bool] = False
    #: whether a code cell is all zero exactly when the image is flat over its receptive field
    #: (contrast-normalized gradient codes: HOG, SIFT), so that the engine may tie those pixels.
    zero_means_flat: ClassVar[bool] = False

    def __init__(self, layer: str) -> None:
        super().__init__()
        if layer not in self.layers:
            raise ValueError(
                f"unknown layer {layer!r} for {self.model}; valid layers: {', '.join(self.layers)}"
            )
        self.layer = layer

    # --- to implement -------------------------------------------------------------------------
    def windows(self) -> Sequence[Window] | None:
        """Windowed operations from the input to ``layer``; ``None`` for non-spatial codes."""
        raise NotImplementedError

    def pre_rectifier(self, images: Tensor, *, prepared: bool = False) -> tuple[Tensor, float, float] | None:
        """The code before a final elementwise clamp, with the clamp's bounds: ``(pre, low, high)``
        such that ``self(images)`` equals ``pre.clamp(low, high)``; ``None`` (the default) when the
        code does not end in one. The engine uses it to let a surrogate gradient reach code entries
        the clamp has switched off (see ``invviz.engine.match``). With ``prepared``, ``images`` is
        the network's input as ``input_layout`` prepares it.
        """
        return None

    @property
    def ends_in_rectifier(self) -> bool:
        """Whether the code ends in an elementwise clamp that ``pre_rectifier`` undoes (so that
        ``Settings.rectifier_slope`` applies to it); ``False`` by default."""
        return False

    @property
    def smooths_rectifiers(self) -> bool:
        """Whether the network has inner rectifiers that ``Settings.rectifier_smoothing`` smooths
        for the gradient (Lite0's ReLU6s, from ``blocks.0`` on); ``False`` by default."""
        return False

    def input_layout(self, height: int, width: int) -> InputLayout | None:
        """How ``forward`` prepares ``height × width`` images for the network, for an engine that
        writes that input itself (the CPU engine does it in the same pass that composes the image,
        and takes the network's gradient of it back in the same pass as the priors): ``None``, the
        default, when the representation offers no such entry. Where it is not ``None``,
        ``forward_prepared(layout.prepare(images))`` equals ``forward(images)`` and
        ``pre_rectifier(layout.prepare(images), prepared=True)`` equals ``pre_rectifier(images)``.
        """
        return None

    def forward_prepared(self, prepared: Tensor) -> Tensor:
        """The code of an input already prepared as ``input_layout`` says (see there), in the
        memory layout the network leaves it (channels-last on the CPU; ``forward`` returns the
        default layout); so is ``pre_rectifier``'s with ``prepared``."""
        raise NotImplementedError(f"{type(self).__name__} has no prepared-input entry")

    # --- derived ------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """``"model:layer"``, the name the factory and the CLI accept."""
        return f"{self.model}:{self.layer}"

    @property
    def depth(self) -> float:
        """Position of ``layer`` among the model's layers, 0 (first) to 1 (last)."""
        return self.layers.index(self.layer) / max(len(self.layers) - 1, 1)

    @property
    def is_spatial(self) -> bool:
        return self.windows() is not None

    def stride(self, height: int = 224, width: int = 224) -> int:
        """Distance in input pixels between neighbouring code cells (1 for vector codes' jitter)."""
        windows = self.windows()
        if windows is None:
            # A vector code pools everything: use the stride of the last spatial stage if known.
            return int(getattr(self, "pooled_stride", 32))
        return axis_geometry(windows, height).jump

    def default_tv_weight(self) -> float:
        """Weight of the TV prior that reconstructs this layer well without tuning.

        Deeper layers keep less of the fine detail, so they need more smoothing (the paper's
        λ_TV = 1, 10, 100 by depth). Here the weight steps up with the layer's stride; the values
        were chosen by sweeping EfficientNet-Lite0 layers on the bundled photos
        (``benchmarks/bench_layers.py``). At stride 32 (Lite0 ``blocks.11`` to ``blocks.15``),
        0.06 rather than stride 16's 0.03: over the 8 scikit-image photos at 200 steps the roughest
        reconstruction of blocks.11 / 12 / 13 went from 1.65 / 1.71 / 1.71 to 1.19 / 1.25 / 1.25 times
        its photo's roughness (rocket's sky, retina's black surround) at the same mean error (0.092 /
        0.096 / 0.096 → 0.095 / 0.096 / 0.098), and blocks.15's from 2.0 to 1.44-1.51 (two seeds;
        its mean error 0.121-0.126 → 0.129, within the spread between seeds).
        """
        stride = self.stride()
        if stride <= 2:
            return 0.003
        if stride <= 8:
            return 0.01
        return 0.03 if stride <= 16 else 0.06

    def default_tv_chroma(self) -> float:
        """The TV prior's extra weight on colour variation (``Settings.tv_chroma``) when none is
        given: 3 from stride 8 on, where codes keep little fine colour, else 0 (plain TV).
        One-channel representations are unaffected either way."""
        return 3.0 if not self.grayscale and self.stride() >= 8 else 0.0

    def default_tv_start(self, iters: int) -> float:
        """The first step's TV weight as a multiple of the last's (``Settings.tv_start``) when none
        is given, for a run of ``iters`` steps: 2 (``TV_START``), and for colour codes of stride 8
        or more, where the TV weighs colour (``default_tv_chroma``), 2 × 200 / ``iters`` in runs
        shorter than 200 steps, up to 8 (50 steps). A short run leaves less time to smooth away
        its first steps' noise: at 100 steps, on the 8 scikit-image photos, 4 instead of 2 took
        the roughest result of Lite0's blocks.4 / 8 / 10 / 12 / 15 / ``head`` from 1.43 / 1.49 /
        1.57 / 1.29 / 1.59 / 1.68 to 1.27 / 1.33 / 1.40 / 1.17 / 1.41 / 1.43 times its photo's
        roughness, the mean error within ±0.006; at 50 steps 8 took blocks.4 from 0.251 / 2.25×
        to 0.226 / 1.49×. At 200 steps 3 cost blocks.4 0.110 → 0.115, and at blocks.1 (stride
        4) 4 cost 0.094 → 0.102 at 100 steps."""
        if iters >= SHORT_RUN or self.default_tv_chroma() == 0:
            return TV_START
        return TV_START * min(SHORT_RUN / iters, 4.0)

    def default_iters(self) -> int:
        """Optimization steps that reach a good reconstruction of this representation.

        Used by ``Settings.resolved`` when no ``iters`` is given.
        """
        return DEFAULT_ITERS

    def default_pyramid_levels(self) -> int:
        """Resolutions the image is optimized as (``Settings.pyramid_levels``) when none is given.

        Five for CNN layers: on Lite0 (6 photos, 200 steps, CPU) five levels beat four at blocks.4,
        blocks.8 and blocks.15 (mean error 0.134 / 0.134 / 0.128 → 0.125 / 0.129 / 0.121) and
        matched it at stem and head; at 100 steps blocks.4 / blocks.10 went 0.153 / 0.144 → 0.145 /
        0.140 (4 photos).
        """
        return 5

    def default_start_noise(self) -> float:
        """Deviation of the start image's noise (``Settings.start_noise``) when none is given: 0, a
        flat start, for CNN layers (see ``Settings``)."""
        return 0.0

    def default_polish(self, iters: int) -> int:
        """Rounds of 8-bit polishing (``Settings.polish``) after ``iters`` steps when none is given:
        none for CNN codes, which 8-bit rounding barely moves."""
        return 0

    def default_colour_basis(self) -> ColourBasis:
        """The coordinates Adam steps in when the settings name none (``Settings.colour_basis``):
        the opponent colour basis; one-channel representations ignore it."""
        return "opponent"

    def default_rectifier_smoothing(self) -> float:
        """How far the network's inner rectifiers are smoothed for the gradient at the first step
        (``Settings.rectifier_smoothing``) when none is given: 0, the true gradient, for
        representations without smoothable rectifiers."""
        return 0.0

    def default_branch_gradient(self) -> float:
        """The share of the gradient passed back through the network's residual branches at the
        first step (``Settings.branch_gradient``) when none is given: 1, the true gradient."""
        return 1.0

    def default_adam_lr(self) -> float | None:
        """Adam learning rate that suits this representation; ``None`` keeps the engine's default.

        Used by ``Settings.resolved`` when no ``lr`` is given and the optimizer is Adam.
        """
        return None

    def default_adam_momentum(self) -> float:
        """Adam's first-moment decay β1 (``Settings.momentum``) when none is given: Adam's own 0.9
        (``ADAM_MOMENTUM``)."""
        return ADAM_MOMENTUM

    @classmethod
    def measure_layers(cls, reps: Sequence[Representation], height: int, width: int) -> dict[str, LayerMeasure]:
        """Shapes and centre fields of several layers of one network measured together, for
        ``layer_table``; layers left out of the result are asked one by one (the default: all)."""
        return {}

    def code_of(self, images: Tensor) -> Tensor:
        """``self(images)`` without a graph, and a one-line ``ValueError`` instead of torch's error
        where the layer cannot take images of this size."""
        try:
            with torch.no_grad():
                code: Tensor = self(images)
                return code
        except (RuntimeError, AssertionError) as error:  # e.g. a kernel larger than the shrunk input
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            height, width = images.shape[-2:]
            raise ValueError(f"{self.spec} cannot take a {height}×{width} image: {reason}") from None

    def code_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of the code (without batch) for an input of ``height × width`` pixels."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return tuple(self.code_of(torch.zeros(1, 3, height, width, device=device)).shape[1:])

    def receptive_field(
        self,
        row: int | tuple[int, int],
        col: int | tuple[int, int],
        height: int,
        width: int,
        clip: bool = True,
    ) -> Box:
        """Box of input pixels that code cell ``(row, col)`` (or a window of cells) depends on.

        ``row``/``col`` are a cell index or a half-open range ``(start, stop)`` of cells.
        """
        windows = self.windows()
        if windows is None:
            box = Box(0, 0, height, width)
        else:
            rows, cols = _cells("row", row), _cells("col", col)
            if clip:
                return clipped_window_box(windows, height, width, rows, cols)
            box = window_box(windows, height, width, rows, cols)
        return box.clip(height, width) if clip else box

    def flat_support(self, row: int, col: int, height: int, width: int) -> Box:
        """For ``zero_means_flat`` codes: the pixels that are flat wherever code cell ``(row, col)``
        is all zero. Its receptive field, unless a subclass knows a tighter box."""
        return self.receptive_field(row, col, height, width)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def _cells(name: str, cells: object) -> tuple[int, int]:
    """A cell index or a half-open range ``(start, stop)`` of cells as a range, else a ``ValueError``."""
    if isinstance(cells, numbers.Integral) and not isinstance(cells, bool):
        return int(cells), int(cells) + 1
    if (
        isinstance(cells, (tuple, list))
        and len(cells) == 2
        and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in cells)
    ):
        return int(cells[0]), int(cells[1])
    raise ValueError(f"{name} must be a cell index or a range (start, stop) of cells, got {cells!r}")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: a state dict, or a dict holding one under "state_dict"/"model"."""
    if not str(path).strip():
        raise ValueError("weights are 'imagenet', 'random' or a file's path, got an empty name")
    if Path(path).is_dir():
        raise ValueError(f"weights file {path} is a directory, not a checkpoint file")
    if not Path(path).is_file():
        raise ValueError(
            f"weights file {path} does not exist (weights are 'imagenet', 'random' or a file's path)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only names the import it refused ("GLOBAL posix.system"); other errors mean garbage
        if "GLOBAL" in str(error):
            raise ValueError(
                f"weights file {path} holds pickled objects other than tensors, which could run code "
                f"when loaded; save a plain state dict instead (torch.save(model.state_dict(), path))"
            ) from error
        raise ValueError(f"weights file {path} is not a PyTorch checkpoint") from error
    except Exception as error:  # torch reports damaged files as RuntimeError, EOFError, KeyError...
        raise ValueError(f"weights file {path} is not a PyTorch checkpoint, or it is truncated") from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise ValueError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    broken = [k for k, v in loaded.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ValueError(f"weights file {path} holds NaN or infinite values (in {broken[0]})")
    return dict(loaded)
