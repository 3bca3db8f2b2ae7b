"""EfficientNet-Lite0: agreement with the upstream implementation, classification, shapes, truncation,
weight files and receptive fields."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import gradient_support
from torch import Tensor, nn

from invviz import Settings, representation
from invviz.images import load_image
from invviz.representations._base import channels_last_on_cpu
from invviz.representations.efficientnet import ConvBN, EfficientNetLite0, SameConv2d, imagenet_weights_path


@pytest.fixture(scope="module")
def logits_rep() -> EfficientNetLite0:
    return EfficientNetLite0("logits")


def _upstream(image_size: int | None = 224) -> nn.Module:
    """The reference model of ``efficientnet_lite_pytorch`` with the bundled weights.

    ``image_size=224`` builds its default static padding; ``None`` its dynamic "same" padding.
    """
    upstream = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="upstream oracle: pip install --no-deps efficientnet-lite-pytorch"
    )
    model = upstream.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    model.load_state_dict(torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def _natural(name: str, size: int = 224) -> Tensor:
    """A scikit-image sample, shorter side to ``size`` (PIL bilinear), centre crop: ``(1, 3, size, size)``."""
    data = pytest.importorskip("skimage.data", reason="natural test images come from scikit-image")
    image = Image.fromarray(getattr(data, name)())
    scale = size / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def _assert_close_logits(ours: Tensor, theirs: Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_logits_match_upstream(logits_rep: EfficientNetLite0) -> None:
    upstream = _upstream()
    torch.manual_seed(0)
    images = torch.cat([torch.rand(2, 3, 224, 224), _natural("chelsea"), _natural("coffee")])
    with torch.no_grad():
        _assert_close_logits(logits_rep(images), upstream(images * 2 - 1))


def test_odd_sizes_match_upstream_dynamic_same_padding(logits_rep: EfficientNetLite0) -> None:
    # Upstream's default pads every conv for 224×224 inputs; its dynamic mode is TensorFlow's "same"
    # for any size, which is what invviz implements.
    upstream = _upstream(image_size=None)
    torch.manual_seed(1)
    images = torch.rand(1, 3, 101, 75)
    with torch.no_grad():
        _assert_close_logits(logits_rep(images), upstream(images * 2 - 1))


def test_classifies_natural_images(logits_rep: EfficientNetLite0) -> None:
    with torch.no_grad():
        cat = logits_rep(_natural("chelsea")).argmax().item()
        coffee = logits_rep(_natural("coffee")).argmax().item()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso


def test_factory_gives_the_classifier() -> None:
    registry = pytest.importorskip("invviz.representations", reason="registry imports sibling modules")
    try:
        rep = registry.representation("efficientnet_lite0:logits")
    except ImportError as error:  # the lazily imported sibling representations may be absent
        pytest.skip(f"registry not complete yet: {error}")
    assert isinstance(rep, EfficientNetLite0)
    assert rep.code_shape(224, 224) == (1000,)


EXPECTED_SHAPES = {
    "stem": (32, 112, 112),
    "blocks.0": (16, 112, 112),
    "blocks.2": (24, 56, 56),
    "blocks.4": (40, 28, 28),
    "blocks.7": (80, 14, 14),
    "blocks.10": (112, 14, 14),
    "blocks.14": (192, 7, 7),
    "blocks.15": (320, 7, 7),
    "head": (1280, 7, 7),
    "pool": (1280,),
    "logits": (1000,),
}


def test_layers_and_code_shapes() -> None:
    assert EfficientNetLite0.layers == ("stem", *(f"blocks.{i}" for i in range(16)), "head", "pool", "logits")
    assert EfficientNetLite0.native_size == 224
    for layer, shape in EXPECTED_SHAPES.items():
        rep = EfficientNetLite0(layer, weights="random")
        assert rep.code_shape(224, 224) == shape, layer
        assert rep.is_spatial == (len(shape) == 3)
    assert EfficientNetLite0("pool", weights="random").stride() == 32
    assert EfficientNetLite0("blocks.4", weights="random").stride() == 8


def test_truncated_network_runs_only_the_stages_it_needs(logits_rep: EfficientNetLite0) -> None:
    rep = EfficientNetLite0("blocks.0")
    assert len(rep.stages) == 2
    ran: list[str] = []
    handles = [
        module.register_forward_hook(lambda module, args, out, name=name: ran.append(name))
        for name, module in rep.named_modules()
        if name
    ]
    rep(torch.rand(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    assert {name.split(".")[1] for name in ran if name.count(".")} == {"0", "1"}
    assert sum(p.numel() for p in rep.parameters()) < 0.01 * sum(p.numel() for p in logits_rep.parameters())
    # The truncated network computes exactly the prefix of the full one.
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        prefix = logits_rep.stages[1](logits_rep.stages[0](channels_last_on_cpu(images * 2 - 1)))
        assert torch.equal(rep(images), prefix.contiguous())


def test_weights_file_round_trip(tmp_path: Path, logits_rep: EfficientNetLite0) -> None:
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    state["_fc.bias"] = state["_fc.bias"] + 1.5
    path = tmp_path / "shifted.pth"
    torch.save(state, path)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        difference = EfficientNetLite0("logits", weights=str(path))(images) - logits_rep(images)
    assert torch.allclose(difference, torch.full_like(difference, 1.5), atol=1e-5)


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_bad_weights_files_raise_one_line_value_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    malicious = tmp_path / "malicious.pth"
    torch.save({"_fc.bias": _RunsCode()}, malicious)
    text = tmp_path / "text.pth"
    text.write_text("not a state dict")
    partial = tmp_path / "partial.pth"
    torch.save({"_fc.bias": torch.zeros(1000)}, partial)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    for path in (malicious, text, partial, not_a_dict, tmp_path / "absent.pth"):
        with pytest.raises(ValueError) as info:
            EfficientNetLite0("stem", weights=str(path))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_random_weights_differ_from_imagenet() -> None:
    def stem_weight(weights: str | None) -> Tensor:
        stem = EfficientNetLite0("stem", weights=weights).stages[0]
        assert isinstance(stem, ConvBN)
        return stem.conv.weight

    torch.manual_seed(0)
    assert not torch.allclose(stem_weight("random"), stem_weight("imagenet"))
    assert torch.equal(stem_weight("imagenet"), stem_weight(None))


@pytest.mark.parametrize(
    ("layer", "height", "width", "cells", "weights"),
    [
        ("stem", 32, 32, [(8, 7), (0, 0), (15, 15)], "imagenet"),
        ("blocks.1", 64, 64, [(8, 7), (0, 0), (15, 15)], "imagenet"),
        ("blocks.4", 96, 96, [(6, 5), (0, 0), (11, 11)], "imagenet"),
        # Sizes that are not multiples of the stride: "same" padding changes with parity.
        ("blocks.4", 101, 75, [(6, 4), (0, 0), (12, 9)], "imagenet"),
        # 224 is the smallest multiple of 32 where a blocks.8 box (211 px) fits inside the image.
        ("blocks.8", 224, 224, [(6, 6), (0, 0)], "imagenet"),
        ("blocks.8", 224, 224, [(6, 6), (13, 13)], "random"),
    ],
)
def test_receptive_field_is_the_gradient_support(
    layer: str, height: int, width: int, cells: list[tuple[int, int]], weights: str
) -> None:
    torch.manual_seed(0)
    rep = EfficientNetLite0(layer, weights=weights)
    for row, col in cells:
        box = rep.receptive_field(row, col, height, width)
        assert box == gradient_support(rep, row, col, height, width), (row, col)
    interior = rep.receptive_field(*cells[0], height, width, clip=False)
    assert interior == interior.clip(height, width)


@pytest.mark.parametrize("layer", ["stem", "head", "blocks.3", "pool"])
def test_pre_rectifier_is_the_code_before_relu6(layer: str) -> None:
    rep = representation(f"efficientnet_lite0:{layer}")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pre = rep.pre_rectifier(x)
        if layer in ("stem", "head"):
            assert pre is not None and pre[1:] == (0.0, 6.0)
            assert (pre[0] < 0).any()
            assert torch.equal(pre[0].clamp(0, 6), rep(x))
        else:
            assert pre is None


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(16, 16), (15, 15), (16, 13), (11, 18)])
def test_depthwise_stride2_without_a_padded_copy_equals_the_copy(kernel: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(6, 6, kernel, stride=2, groups=6).double()
    x = torch.rand(2, 6, *size, dtype=torch.float64, requires_grad=True)
    (top, bottom), (left, right) = conv.same_padding(size[0]), conv.same_padding(size[1])
    reference = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, 2, groups=6)
    assert bottom - top in (0, 1) and right - left in (0, 1)
    torch.testing.assert_close(conv(x), reference)
    grad = torch.rand_like(reference)
    torch.testing.assert_close(torch.autograd.grad(conv(x), x, grad)[0], torch.autograd.grad(reference, x, grad)[0])


def test_cpu_codes_come_back_in_the_default_layout() -> None:
    # The convolutions run channels-last on the CPU; callers still get plain contiguous codes and
    # gradients in the layout of the images they passed.
    rep = EfficientNetLite0("blocks.1", weights="random").eval()
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    code = rep(images)
    assert code.is_contiguous() and code.shape == (2, 24, 16, 16)
    code.square().sum().backward()
    assert images.grad is not None and images.grad.is_contiguous()
    with torch.no_grad():
        reference = images * 2 - 1
        for stage in rep.stages:
            reference = stage(reference)  # the same network in torch's default layout
    torch.testing.assert_close(code, reference, rtol=1e-4, atol=1e-4)


def test_loaded_images_are_plain_contiguous_tensors() -> None:
    image = load_image(np.zeros((5, 7, 3), dtype=np.uint8))
    assert image.shape == (3, 5, 7) and image.is_contiguous()


@pytest.mark.parametrize("layer", ["stem", "blocks.4", "head", "logits"])
@pytest.mark.parametrize("size", [(224, 224), (101, 77), (32, 33)])
def test_the_prepared_input_gives_the_same_code_and_gradient(layer: str, size: tuple[int, int]) -> None:
    """``forward_prepared(input_layout(...).prepare(x))`` is ``forward(x)``, value and gradient,
    and so is ``pre_rectifier`` with ``prepared`` (what the CPU engine feeds the network)."""
    torch.manual_seed(0)
    rep = representation(f"efficientnet_lite0:{layer}")
    layout = rep.input_layout(*size)
    stem = rep.stages[0].conv
    assert layout.pad == (*stem.same_padding(size[0]), *stem.same_padding(size[1]))
    images = torch.rand(2, 3, *size, requires_grad=True)
    weights = torch.randn(rep.code_shape(*size))
    codes = [rep(images), rep.forward_prepared(layout.prepare(images))]
    grads = [torch.autograd.grad((code * weights).sum(), images)[0] for code in codes]
    assert torch.equal(codes[0], codes[1].contiguous())
    assert torch.allclose(grads[0], grads[1], atol=1e-6 * grads[0].abs().max().item())
    plain, prepared = rep.pre_rectifier(images), rep.pre_rectifier(layout.prepare(images), prepared=True)
    assert (plain is None) == (layer not in ("stem", "head"))
    if plain is not None and prepared is not None:
        assert torch.equal(plain[0], prepared[0].contiguous()) and plain[1:] == prepared[1:]


def test_the_deep_layers_resolve_to_slower_adam_rates() -> None:
    """0.015 at stride 16, 0.02 at stride 32, 0.015 at head, the engine's rate elsewhere and with
    the paper's optimizer or an explicit rate (EfficientNetLite0.default_adam_lr)."""
    from invviz.engine.loop import ADAM_LR, PAPER_LR
    from invviz.representations.efficientnet import DEEP_ADAM_LR, HEAD_ADAM_LR, MID_ADAM_LR

    rates = {layer: Settings().resolved(EfficientNetLite0(layer, weights="random")).lr for layer in EfficientNetLite0.layers}
    mid = {f"blocks.{i}" for i in range(5, 11)}
    deep = {f"blocks.{i}" for i in range(11, 16)}
    assert all(rates[layer] == MID_ADAM_LR for layer in mid) and rates["head"] == HEAD_ADAM_LR
    assert all(rates[layer] == DEEP_ADAM_LR for layer in deep)
    assert all(rate == ADAM_LR for layer, rate in rates.items() if layer not in {*mid, *deep, "head"})
    head = EfficientNetLite0("head", weights="random")
    assert Settings(optimizer="paper").resolved(head).lr == PAPER_LR
    assert Settings(lr=0.05).resolved(head).lr == 0.05
    assert [rep.ends_in_rectifier for rep in (head, EfficientNetLite0("stem", weights="random"))] == [True, True]
    assert not EfficientNetLite0("blocks.4", weights="random").ends_in_rectifier
