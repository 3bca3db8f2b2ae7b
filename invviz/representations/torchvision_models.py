"""CNN representations from torchvision: AlexNet and VGG16 with the paper's caffe layer names, and
any torchvision classification model by module path (``"resnet18:layer3.1"``).

Weights (``weights=`` of every class here):

- ``None`` or ``"imagenet"``: torchvision's ImageNet weights, used only when the checkpoint is already
  in the torch hub cache (``torch.hub.get_dir()/checkpoints/``); it is downloaded only when the
  environment variable ``INVVIZ_ALLOW_DOWNLOAD=1`` is set, so nothing reaches the network unasked.
- ``"random"``: torchvision's own initialization (seed it with ``torch.manual_seed`` first).
- a path: a state dict, or a dict holding one under ``"state_dict"`` or ``"model"``, read with
  ``torch.load(..., weights_only=True)`` so that a file cannot run code when loaded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from . import register_representation
from ._base import (
    NOT_RUN,
    InputLayout,
    LayerMeasure,
    LayerNotRun,
    LayerWithoutCode,
    Representation,
    _cells,
    channels_last_on_cpu,
    load_state_dict_file,
)
from ._geometry import Box, Window

__all__ = [
    "VGG16",
    "AlexNet",
    "CaffeStyleNet",
    "TorchvisionModel",
    "build_network",
    "generic_torchvision_class",
    "load_state_dict_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALLOW_DOWNLOAD_VARIABLE = "INVVIZ_ALLOW_DOWNLOAD"
#: random images whose gradient supports are unioned when a receptive field is measured.
SUPPORT_TRIALS = 3

WeightsSpec = str | os.PathLike[str] | None


# --- weights ------------------------------------------------------------------------------------
def _ways_out(file_name: str) -> str:
    return (
        f"put the file {file_name} in {Path(torch.hub.get_dir()) / 'checkpoints'}/ "
        f"(or set {ALLOW_DOWNLOAD_VARIABLE}=1 to download it), pass weights=PATH (--weights FILE) "
        f"to a state dict, or pass weights='random'"
    )


def _pretrained_network(name: str) -> nn.Module:
    """torchvision model ``name`` with its default ImageNet weights, from the hub cache."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    file_name = Path(urlparse(weights.url).path).name
    cached = (Path(torch.hub.get_dir()) / "checkpoints" / file_name).is_file()
    if not cached and os.environ.get(ALLOW_DOWNLOAD_VARIABLE) != "1":
        raise ValueError(f"{name}: ImageNet weights are not in the torch hub cache; {_ways_out(file_name)}")
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as error:  # network, hash and unpickling failures all mean the same to the user
        action = "load the cached" if cached else "download the"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{name}: could not {action} ImageNet weights ({reason}); {_ways_out(file_name)}"
        ) from error


def _listing(items: Sequence[str], shown: int = 3) -> str:
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _load_into(
    network: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike[str], name: str
) -> None:
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ] + [
        f"{k} {state[k].dtype} instead of floating point"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    problems = [
        f"{label} {_listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shapes or types:", reshaped))
        if keys
    ]
    if problems:
        raise ValueError(f"weights file {path} does not fit torchvision's {name}: {'; '.join(problems)}")
    network.load_state_dict(state)


def build_network(name: str, weights: WeightsSpec = None) -> nn.Module:
    """torchvision classification model ``name`` with ``weights`` (see the module docstring)."""
    if weights == "random":
        return torchvision.models.get_model(name)
    if weights is None or weights == "imagenet":
        return _pretrained_network(name)
    state = load_state_dict_file(weights)  # before building: a bad file fails fast
    network = torchvision.models.get_model(name)
    _load_into(network, state, weights, name)
    return network


def _skeleton(name: str) -> nn.Module:
    """Model ``name`` without allocated weights, to read its structure cheaply."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name)
    except NotImplementedError:  # RegNet computes its widths from tensor values
        return torchvision.models.get_model(name)


# --- shared base --------------------------------------------------------------------------------
class _TorchvisionRepresentation(Representation):
    """A torchvision network fed ImageNet-normalized images."""

    native_size: ClassVar[int | None] = 224
    mean: torch.Tensor
    std: torch.Tensor

    torchvision_name: ClassVar[str]

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def build_network(cls, weights: WeightsSpec = None) -> nn.Module:
        """The whole torchvision network with ``weights``, to share between layers (``_network``)."""
        return build_network(cls.torchvision_name, weights)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] to the network's input: the statistics torchvision's ImageNet
        models were trained on, channels-last on the CPU (see ``channels_last_on_cpu``)."""
        return channels_last_on_cpu((images - self.mean) / self.std)

    def input_layout(self, height: int, width: int) -> InputLayout:
        """``normalize`` as an input layout (the networks' convolutions pad themselves)."""
        return InputLayout(
            scale=tuple(1.0 / s for s in IMAGENET_STD), shift=tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        )


# --- AlexNet and VGG16 with caffe names ---------------------------------------------------------
def _caffe_steps(network: nn.Module, per_block: bool) -> list[tuple[str | None, nn.Module]]:
    """Modules of an AlexNet/VGG in execution order with their caffe names (``None``: unnamed glue).

    AlexNet numbers convolutions through the network (conv1 … conv5, pool5 after conv5); VGG numbers
    them within blocks separated by pooling (conv3_2, pool3). Both call the classifier layers fc6 …
    fc8. Dropout is left out: it is the identity in eval mode and the code must not depend on the mode.
    """
    steps: list[tuple[str | None, nn.Module]] = []
    block, conv = 1, 0
    for module in network.get_submodule("features").children():
        if isinstance(module, nn.Conv2d):
            conv += 1
        suffix = f"{block}_{conv}" if per_block else str(conv)
        if isinstance(module, nn.Conv2d):
            steps.append((f"conv{suffix}", module))
        elif isinstance(module, nn.ReLU):
            steps.append((f"relu{suffix}", module))
        elif isinstance(module, nn.MaxPool2d):
            steps.append((f"pool{block if per_block else conv}", module))
            if per_block:
                block, conv = block + 1, 0
        else:
            raise TypeError(f"unexpected {type(module).__name__} in {type(network).__name__}.features")
    steps += [(None, network.get_submodule("avgpool")), (None, nn.Flatten(1))]
    fc = 5
    for module in network.get_submodule("classifier").children():
        if isinstance(module, nn.Linear):
            fc += 1
            steps.append((f"fc{fc}", module))
        elif isinstance(module, nn.ReLU):
            steps.append((f"relu{fc}", module))
        elif not isinstance(module, nn.Dropout):
            raise TypeError(f"unexpected {type(module).__name__} in {type(network).__name__}.classifier")
    return steps


def _window(module: nn.Module) -> Window | None:
    """The window of a convolution or max pooling; ``None`` for pointwise modules (ReLU)."""
    if isinstance(module, nn.Conv2d):
        return Window(
            kernel=module.kernel_size[0],
            stride=module.stride[0],
            padding=int(module.padding[0]),  # type: ignore[arg-type]  # torchvision uses int padding
            dilation=module.dilation[0],
        )
    if isinstance(module, nn.MaxPool2d):
        kernel, stride, padding, dilation = (
            v if isinstance(v, int) else v[0]
            for v in (module.kernel_size, module.stride, module.padding, module.dilation)
        )
        return Window(
            kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=module.ceil_mode
        )
    return None


class CaffeStyleNet(_TorchvisionRepresentation):
    """A torchvision AlexNet/VGG run up to a layer named as in caffe (``conv3``, ``relu5_3``, ``fc6``).

    Only the modules up to ``layer`` are kept and run. ``pool5`` is the last max pooling itself;
    torchvision's adaptive average pooling and the flattening come just before ``fc6``.
    Subclasses pass ``torchvision_name`` and ``per_block`` (VGG's block-wise numbering).
    """

    per_block: ClassVar[bool]
    #: jitter stride for the vector layers fc6 … fc8: the stride of pool5.
    pooled_stride: ClassVar[int] = 32

    def __init_subclass__(cls, torchvision_name: str, per_block: bool, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.torchvision_name = torchvision_name
        cls.per_block = per_block
        steps = _caffe_steps(_skeleton(torchvision_name), per_block)
        cls.layers = tuple(name for name, _ in steps if name is not None)

    def __init__(self, layer: str, weights: WeightsSpec = None, *, _network: nn.Module | None = None) -> None:
        """``_network``: a network from ``build_network`` to run (shared, not copied) instead of
        building one with ``weights``."""
        super().__init__(layer)
        network = _network if _network is not None else build_network(self.torchvision_name, weights)
        steps = _caffe_steps(network, self.per_block)
        last = [n for n, _ in steps].index(layer)
        modules = [module for _, module in steps[: last + 1]]
        self.net = nn.Sequential(*modules)
        self._windows: tuple[Window, ...] | None = None
        # past the adaptive pooling every code entry may depend on every pixel
        if not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)) for m in modules):
            self._windows = tuple(w for w in map(_window, modules) if w is not None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B, C, H', W')``, or ``(B, D)`` from fc6 on."""
        return self.forward_prepared(self.normalize(images)).contiguous()

    def forward_prepared(self, prepared: torch.Tensor) -> torch.Tensor:
        code: torch.Tensor = self.net(prepared)
        return code

    @property
    def ends_in_rectifier(self) -> bool:
        """The ``relu*`` layers."""
        return isinstance(self.net[-1], nn.ReLU)

    def pre_rectifier(
        self, images: torch.Tensor, *, prepared: bool = False
    ) -> tuple[torch.Tensor, float, float] | None:
        """For the ``relu*`` layers: the code before that ReLU, with its bounds (0, ∞)."""
        if not self.ends_in_rectifier:
            return None
        if prepared:
            return self.net[:-1](images), 0.0, math.inf
        return self.net[:-1](self.normalize(images)).contiguous(), 0.0, math.inf

    def windows(self) -> Sequence[Window] | None:
        return self._windows


@register_representation("alexnet")
class AlexNet(CaffeStyleNet, torchvision_name="alexnet", per_block=False):
    """torchvision's AlexNet (the one-GPU variant, without LRN): conv1 … pool5, fc6 … fc8."""


@register_representation("vgg16")
class VGG16(CaffeStyleNet, torchvision_name="vgg16", per_block=True):
    """torchvision's VGG16 (without batch norm): conv1_1 … pool5, fc6 … fc8."""


# --- any torchvision classification model -------------------------------------------------------
class _StopForward(Exception):
    """Raised by the capture hook so that nothing after the chosen module runs."""


class TorchvisionModel(_TorchvisionRepresentation):
    """Any torchvision classification model, run up to the module at path ``layer`` (``layer3.1``).

    ``layers`` are all named module paths except the root, in definition order, which torchvision
    keeps close to execution order. The code is the module's output the first time it runs (a
    module reused within a block, like ResNet's ``relu``, is captured at its first call).
    Receptive fields are measured, not derived: the bounding box of the pixels with a non-zero
    gradient, exact for the given input size.
    """

    def __init_subclass__(cls, torchvision_name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.torchvision_name = cls.model = torchvision_name
        cls.layers = tuple(n for n, _ in _skeleton(torchvision_name).named_modules() if n)
        transforms = torchvision.models.get_model_weights(torchvision_name).DEFAULT.transforms()
        cls.native_size = int(getattr(transforms, "crop_size", [224])[0])

    def __init__(self, layer: str, weights: WeightsSpec = None, *, _network: nn.Module | None = None) -> None:
        """``_network``: as ``CaffeStyleNet``'s."""
        super().__init__(layer)
        self.network: nn.Module = _network if _network is not None else build_network(self.torchvision_name, weights)
        self._native_code_shape: tuple[int, ...] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → the module's output, e.g. ``(B, C, H', W')``."""
        return self.forward_prepared(self.normalize(images)).contiguous()

    def forward_prepared(self, prepared: torch.Tensor) -> torch.Tensor:
        captured: list[Any] = []

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            captured.append(output)
            raise _StopForward

        handle = self.network.get_submodule(self.layer).register_forward_hook(capture)
        try:
            self.network(prepared)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise LayerNotRun(f"{self.spec} does not run when {self.model} classifies an image")
        if not isinstance(captured[0], torch.Tensor):
            short = _not_a_tensor(captured[0])
            raise LayerWithoutCode(f"{self.spec} {short}; pick a layer with a tensor output", short)
        return captured[0]

    def windows(self) -> Sequence[Window] | None:
        # General graphs (residual branches, attention) are not a chain of windows; see receptive_field.
        return None

    @property
    def is_spatial(self) -> bool:
        if self._native_code_shape is None:
            size = self.native_size or 224
            self._native_code_shape = self.code_shape(size, size)
        return len(self._native_code_shape) == 3

    def stride(self, height: int = 224, width: int = 224) -> int:
        """Input pixels per code cell (input height over code height); ``pooled_stride`` for vectors."""
        if not self.is_spatial:
            return super().stride(height, width)
        return self.stride_of(height, self.code_shape(height, width))

    @classmethod
    def measure_layers(cls, reps: Sequence[Representation], height: int, width: int) -> dict[str, LayerMeasure]:
        """All layers at once (see the module function ``measure_layers``)."""
        return measure_layers([rep for rep in reps if isinstance(rep, TorchvisionModel)], height, width)

    @staticmethod
    def stride_of(height: int, code_shape: tuple[int, ...]) -> int:
        """``stride`` for an input ``height`` pixels high whose spatial code has ``code_shape``."""
        return max(height // code_shape[-2], 1)

    def receptive_field(
        self,
        row: int | tuple[int, int],
        col: int | tuple[int, int],
        height: int,
        width: int,
        clip: bool = True,
    ) -> Box:
        """Box of input pixels with a non-zero gradient of code cell ``(row, col)`` (or a range of cells).

        The union over a few seeded random images, in eval mode. Only pixels inside the image can be
        measured, so the box is always clipped (``clip`` is accepted for the common signature).
        """
        if not self.is_spatial:
            return Box(0, 0, height, width)
        rows, cols = _cells("row", row), _cells("col", col)
        support = torch.zeros(height, width, dtype=torch.bool)
        with _support_images(self, height, width) as trials:
            for images in trials:
                code = self(images)
                cells_y, cells_x = code.shape[-2:]
                if not (0 <= rows[0] < rows[1] <= cells_y and 0 <= cols[0] < cols[1] <= cells_x):
                    raise ValueError(
                        f"code window rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]} is outside "
                        f"the code of {cells_y}×{cells_x} cells"
                    )
                cells = code[0, :, rows[0] : rows[1], cols[0] : cols[1]]
                (gradient,) = torch.autograd.grad(cells.sum(), images)
                support |= gradient[0].abs().sum(0).cpu() > 0
        return _support_box(support, height, width)


def measure_layers(reps: Sequence[TorchvisionModel], height: int, width: int) -> dict[str, LayerMeasure]:
    """Code shapes, centre receptive fields and strides of layers that share one network.

    Per layer: ``(code shape at height × width, receptive field of the centre cell, stride)``, the
    last two None for a vector code, or why the layer has no code (it does not run in inference, its
    output is not a tensor). These are the values of each layer's ``code_shape``,
    ``receptive_field`` (from the same seeded images) and ``stride``, but every layer's
    output is captured in one forward pass per image instead of one pass per layer and question:
    ``invviz layers`` took 46 s for googlenet and 50 s for resnet50 that way.
    """
    if not reps:
        return {}
    network = reps[0].network
    if any(rep.network is not network for rep in reps):
        raise ValueError("measure_layers takes layers of one shared network (invviz.every_layer)")
    normalize = reps[0].normalize
    names = [rep.layer for rep in reps]

    def outputs(images: torch.Tensor) -> dict[str, tuple[tuple[int, ...] | str, torch.Tensor | None]]:
        """Per layer, at its first call: the code's shape (or why it is not a tensor) and, for a
        ``(B, C, H, W)`` output, the sum over channels of its centre cell. Only that sum is kept,
        copied before any later in-place operation can change it: keeping whole outputs doubled
        the memory of the graph (2.8 GB for resnet50 at 512²)."""
        captured: dict[str, tuple[tuple[int, ...] | str, torch.Tensor | None]] = {}

        def hook(name: str) -> Any:
            def record(module: nn.Module, inputs: Any, output: Any) -> None:
                if name in captured:
                    return
                if not isinstance(output, torch.Tensor):
                    captured[name] = (_not_a_tensor(output), None)
                    return
                cell = output[0, :, output.shape[-2] // 2, output.shape[-1] // 2].clone().sum() if output.dim() == 4 else None
                captured[name] = (tuple(output.shape[1:]), cell)

            return record

        handles = [network.get_submodule(name).register_forward_hook(hook(name)) for name in names]
        try:
            network(normalize(images))
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def shapes_at(size: tuple[int, int]) -> dict[str, tuple[int, ...] | str]:
        with torch.no_grad():
            return {name: shape for name, (shape, _) in outputs(torch.zeros(1, 3, *size).to(reference)).items()}

    reference = next(network.parameters())
    native = reps[0].native_size or 224
    try:
        shapes = shapes_at((height, width))
        native_shapes = shapes if (height, width) == (native, native) else shapes_at((native, native))
    except (RuntimeError, AssertionError):  # too small for some layer: each layer alone says which
        return {}
    spatial = [
        name
        for name, shape in shapes.items()
        if isinstance(shape, tuple) and len(shape) == 3 and len(native_shapes.get(name, ())) == 3
    ]
    support = {name: torch.zeros(height, width, dtype=torch.bool) for name in spatial}
    with _support_images(network, height, width) as trials:  # the images receptive_field draws
        for images in trials:
            captured = outputs(images)
            for name in spatial:
                cell = captured[name][1]
                if cell is not None and cell.requires_grad:
                    (gradient,) = torch.autograd.grad(cell, images, retain_graph=True, allow_unused=True)
                    if gradient is not None:
                        support[name] |= gradient[0].abs().sum(0).cpu() > 0
            del captured
    table: dict[str, LayerMeasure] = {}
    for name in names:
        shape = shapes.get(name, NOT_RUN)
        if isinstance(shape, str):
            table[name] = shape
        elif name in support:
            table[name] = (shape, _support_box(support[name], height, width), TorchvisionModel.stride_of(height, shape))
        else:
            table[name] = (shape, None, None)
    return table


@contextlib.contextmanager
def _support_images(module: nn.Module, height: int, width: int) -> Iterator[Iterator[torch.Tensor]]:
    """The seeded random images ``(1, 3, H, W)`` (requiring grad) that receptive fields are measured
    on, SUPPORT_TRIALS of them, with ``module`` in eval mode and gradients on; its mode is restored
    after. One generator for ``receptive_field`` and ``measure_layers``, which must agree."""
    reference = next(module.parameters())
    generator = torch.Generator().manual_seed(0)
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            yield (
                torch.rand(1, 3, height, width, generator=generator).to(reference).requires_grad_()
                for _ in range(SUPPORT_TRIALS)
            )
    finally:
        module.train(was_training)


def _not_a_tensor(output: object) -> str:
    return f"returns a {type(output).__name__}, not a tensor"


def _support_box(support: torch.Tensor, height: int, width: int) -> Box:
    """Bounding box of a ``(H, W)`` boolean support; the whole image where it is empty."""
    if not support.any():  # every path to the cell is gated off: no evidence to narrow the box
        return Box(0, 0, height, width)
    ys = torch.nonzero(support.any(1)).flatten()
    xs = torch.nonzero(support.any(0)).flatten()
    return Box(int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)


@functools.cache
def generic_torchvision_class(name: str) -> type[TorchvisionModel] | None:
    """Representation class for torchvision classification model ``name``; ``None`` if there is none."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    return type(f"Torchvision_{name}", (TorchvisionModel,), {"__module__": __name__}, torchvision_name=name)
