"""AlexNet, VGG16 and generic torchvision representations: names, shapes, truncation, geometry, weights.

Nothing here downloads: every network has random weights or weights from a temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from support import gradient_support
from torch import nn

from invviz.engine.objectives import Context, match
from invviz.representations._base import channels_last_on_cpu
from invviz.representations.torchvision_models import (
    VGG16,
    AlexNet,
    CaffeStyleNet,
    TorchvisionModel,
    generic_torchvision_class,
    load_state_dict_file,
)

ALEXNET_LAYERS = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6", "fc7", "relu7", "fc8"]
VGG16_LAYERS = ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2", "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "pool3", "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "pool4", "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "pool5", "fc6", "relu6", "fc7", "relu7", "fc8"]


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub, and downloads not allowed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("INVVIZ_ALLOW_DOWNLOAD", raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def resnet18_class() -> type[TorchvisionModel]:
    cls = generic_torchvision_class("resnet18")
    assert cls is not None
    return cls


def test_caffe_layer_names() -> None:
    assert AlexNet.layers == tuple(ALEXNET_LAYERS)
    assert VGG16.layers == tuple(VGG16_LAYERS)
    assert (AlexNet.model, VGG16.model, AlexNet.native_size) == ("alexnet", "vgg16", 224)


@pytest.mark.parametrize(
    ("cls", "layer", "shape"),
    [
        (AlexNet, "conv1", (64, 55, 55)),
        (AlexNet, "pool5", (256, 6, 6)),
        (AlexNet, "fc8", (1000,)),
        (VGG16, "relu5_3", (512, 14, 14)),
    ],
)
def test_code_shapes_at_224(cls: type[CaffeStyleNet], layer: str, shape: tuple[int, ...]) -> None:
    rep = cls(layer, weights="random").to("meta")  # shapes without the arithmetic
    assert rep.code_shape(224, 224) == shape
    assert rep.is_spatial == (len(shape) == 3)


def intermediate_outputs(network: nn.Module, paths: list[str], images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the modules at ``paths`` during one full forward pass of ``network``."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        # clone: a following in-place ReLU would overwrite the stored tensor
        network.get_submodule(path).register_forward_hook(
            lambda module, inputs, output, path=path: outputs.__setitem__(path, output.clone())
        )
        for path in paths
    ]
    try:
        with torch.no_grad():
            network(images)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[path] for path in paths]


def normalized(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.mark.parametrize(
    ("cls", "layers", "paths"),
    [
        (
            AlexNet,
            ["conv2", "pool5", "relu7", "fc8"],
            ["features.3", "features.12", "classifier.5", "classifier.6"],
        ),
        (VGG16, ["fc7"], ["classifier.3"]),
    ],
)
def test_truncated_forward_equals_full_model(
    cls: type[CaffeStyleNet], layers: list[str], paths: list[str]
) -> None:
    images = torch.rand(2, 3, 96, 96)
    name = cls.model
    torch.manual_seed(1)
    full = torchvision.models.get_model(name).eval()
    expected = intermediate_outputs(full, paths, normalized(images))
    for layer, want in zip(layers, expected):
        torch.manual_seed(1)  # the same random weights as `full`
        rep = cls(layer, weights="random").eval()
        with torch.no_grad():
            torch.testing.assert_close(rep(images), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("cls", "layer", "size"),
    [
        # small inputs whose middle cell still sees only pixels inside the image
        (AlexNet, "conv1", 35),
        (AlexNet, "pool1", 67),
        (AlexNet, "conv3", 131),
        (AlexNet, "pool5", 227),  # 195 px receptive field
        (VGG16, "conv1_2", 16),
        (VGG16, "pool2", 32),
        (VGG16, "conv3_3", 48),
    ],
)
def test_receptive_field_equals_gradient_support(cls: type[CaffeStyleNet], layer: str, size: int) -> None:
    rep = cls(layer, weights="random")
    _, rows, cols = rep.code_shape(size, size)
    middle = (rows // 2, cols // 2)
    box = rep.receptive_field(*middle, size, size, clip=False)
    assert box == box.clip(size, size), "the middle cell should see only pixels inside the image"
    assert gradient_support(rep, *middle, size, size) == box
    for corner in [(0, 0), (rows - 1, cols - 1)]:
        clipped = rep.receptive_field(*corner, size, size)
        support = gradient_support(rep, *corner, size, size, trials=1)  # containment holds per trial
        assert clipped.top <= support.top and clipped.left <= support.left
        assert support.bottom <= clipped.bottom and support.right <= clipped.right


def test_vector_layers_see_the_whole_image() -> None:
    rep = AlexNet("fc6", weights="random")
    assert rep.windows() is None and rep.stride() == 32
    assert rep.receptive_field(0, 0, 224, 224).as_tuple() == (0, 0, 224, 224)


@pytest.mark.parametrize("layer", ["relu2", "relu5", "relu6"])
def test_relu_layers_expose_the_code_before_the_rectifier(layer: str) -> None:
    rep = AlexNet(layer, weights="random").eval()
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        found = rep.pre_rectifier(images)
        assert found is not None
        pre, low, high = found
        assert (low, high) == (0.0, float("inf")) and bool((pre < 0).any())
        torch.testing.assert_close(pre.clamp(low, high), rep(images))
    # With a rectifier slope the data term's gradient also reaches units the ReLU switched off.
    target = rep(torch.rand(1, 3, 96, 96)).detach()
    x = images[:1].clone().requires_grad_(True)
    exact = torch.autograd.grad(match(rep, target)(Context(x)).sum(), x)[0]
    reviving = torch.autograd.grad(match(rep, target, rectifier_slope=0.7)(Context(x)).sum(), x)[0]
    assert not torch.allclose(exact, reviving)


def test_layers_without_a_final_rectifier_have_no_pre_rectifier() -> None:
    for layer in ("conv5", "pool5", "fc8"):
        assert AlexNet(layer, weights="random").pre_rectifier(torch.rand(1, 3, 64, 64)) is None


def test_weights_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    full = torchvision.models.alexnet().eval()
    path = tmp_path / "alexnet.pt"
    torch.save(full.state_dict(), path)
    images = torch.rand(1, 3, 224, 224)
    torch.manual_seed(3)  # different random init: the file must override it
    rep = AlexNet("fc8", weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(rep(images), full(normalized(images)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_state_dict_inside_a_training_checkpoint(tmp_path: Path, wrapper: str) -> None:
    state = {"weight": torch.rand(3, 3)}
    path = tmp_path / "checkpoint.pt"
    torch.save({wrapper: state, "epoch": 3}, path)
    assert load_state_dict_file(path).keys() == state.keys()
    torch.testing.assert_close(load_state_dict_file(path)["weight"], state["weight"])


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="could run code"):
        AlexNet("conv1", weights=str(path))
    assert not marker.exists()


def test_damaged_or_foreign_files_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.zeros(100, 100)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensors)
    cases = [
        (tmp_path / "missing.pt", "does not exist"),
        (truncated, "truncated"),
        (text, "not a PyTorch checkpoint"),
        (not_tensors, "does not hold a state dict"),
        (good, "does not fit torchvision's alexnet: missing features.0.weight"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            AlexNet("conv1", weights=str(path))
        assert "\n" not in str(raised.value)


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "resnet18_10_classes.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong shapes or types: fc.weight \(10, 512\) instead of \(1000, 512\)"):
        resnet18_class()("layer2", weights=str(path))


@pytest.mark.parametrize("weights", [None, "imagenet"])
def test_missing_hub_weights_name_both_ways_out(weights: str | None, no_downloads: Path) -> None:
    makers = [lambda: AlexNet("conv1", weights=weights), lambda: resnet18_class()("layer2", weights=weights)]
    for make in makers:
        with pytest.raises(ValueError) as raised:
            make()
        message = str(raised.value)
        assert str(no_downloads) in message and "INVVIZ_ALLOW_DOWNLOAD=1" in message
        assert "weights=PATH" in message and "--weights FILE" in message and "weights='random'" in message
        assert "\n" not in message
    assert not no_downloads.exists() or not any(no_downloads.iterdir())


def test_cached_hub_weights_are_used(no_downloads: Path) -> None:
    torch.manual_seed(4)
    full = torchvision.models.resnet18().eval()
    no_downloads.mkdir(parents=True)
    torch.save(full.state_dict(), no_downloads / "resnet18-f37072fd.pth")
    images = torch.rand(1, 3, 64, 64)
    rep = resnet18_class()("fc").eval()
    with torch.no_grad():
        torch.testing.assert_close(rep(images), full(normalized(images)), rtol=1e-5, atol=1e-5)
    (no_downloads / "resnet18-f37072fd.pth").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="could not load the cached ImageNet weights"):
        resnet18_class()("fc")


def test_generic_model_runs_only_up_to_its_layer() -> None:
    cls = resnet18_class()
    assert generic_torchvision_class("resnet18") is cls and generic_torchvision_class("no_such_net") is None
    assert cls.layers[:5] == ("conv1", "bn1", "relu", "maxpool", "layer1") and "layer3.1" in cls.layers
    rep = cls("layer2", weights="random").eval()
    assert rep.spec == "resnet18:layer2" and rep.code_shape(224, 224) == (128, 28, 28)
    later_calls: list[str] = []
    rep.network.get_submodule("layer3").register_forward_hook(lambda *args: later_calls.append("layer3"))
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        code = rep(images)
    assert later_calls == []
    assert not rep.network.get_submodule("layer2")._forward_hooks, "the capture hook must be removed"
    # The representation runs CPU convolutions channels-last; the same layout gives the same sums.
    (expected,) = intermediate_outputs(rep.network, ["layer2"], channels_last_on_cpu(normalized(images)))
    torch.testing.assert_close(code, expected)


def test_generic_receptive_field_is_measured() -> None:
    rep = resnet18_class()("layer2", weights="random").eval()
    assert rep.is_spatial and rep.stride(128, 128) == 8
    # conv1 7 px, maxpool +4, layer1's four 3x3 convs at jump 4 +32, layer2's first conv +8 and three
    # more at jump 8 +48: 99 px; cell i sees rows -49 + 8 i to 50 + 8 i
    assert rep.receptive_field(8, 9, 128, 128).as_tuple() == (15, 23, 114, 122)
    assert rep.receptive_field((0, 2), 0, 128, 128).as_tuple() == (0, 0, 58, 50)
    with pytest.raises(ValueError, match="outside the code"):
        rep.receptive_field(16, 0, 128, 128)
    vector = resnet18_class()("fc", weights="random")
    assert not vector.is_spatial and vector.receptive_field(0, 0, 64, 64).as_tuple() == (0, 0, 64, 64)


@pytest.mark.parametrize("spec", ["alexnet:relu2", "alexnet:fc6", "vgg16:conv2_1", "resnet18:layer2"])
def test_the_prepared_input_gives_the_same_code(spec: str) -> None:
    """``forward_prepared`` of the normalized input (``input_layout``) is ``forward``."""
    from invviz import representation

    rep = representation(spec, weights="random")
    images = torch.rand(2, 3, 67, 67)
    prepared = rep.input_layout(67, 67).prepare(images)
    with torch.no_grad():
        assert torch.allclose(rep(images), rep.forward_prepared(prepared), rtol=1e-4, atol=1e-5)
        pre = rep.pre_rectifier(prepared, prepared=True)
        plain = rep.pre_rectifier(images)
    assert (pre is None) == (plain is None) == (not spec.split(":")[1].startswith("relu"))
    if pre is not None and plain is not None:
        assert torch.allclose(pre[0], plain[0], rtol=1e-4, atol=1e-5)


def test_every_layer_shares_one_frozen_network() -> None:
    """What `invviz layers` uses: one network built for all layers (VGG16: 53 s → 8 s), each
    representation in eval mode with frozen parameters, as the factory makes them."""
    from invviz.representations import every_layer, model_layers

    reps = list(every_layer("alexnet", weights="random"))
    assert [rep.layer for rep in reps] == list(model_layers("alexnet"))
    assert all(not rep.training and not any(p.requires_grad for p in rep.parameters()) for rep in reps)
    first_conv = [next(rep.parameters()).data_ptr() for rep in reps]
    assert len(set(first_conv)) == 1, "conv1's weights are shared, not rebuilt per layer"
    image = torch.rand(1, 3, 67, 67)
    assert torch.equal(reps[model_layers("alexnet").index("relu2")](image), reps[model_layers("alexnet").index("conv2")](image).relu())
    generic = list(every_layer("resnet18", weights="random"))
    assert not generic[0].network.training and generic[0].network is generic[-1].network
    with pytest.raises(ValueError, match="does not take"):
        list(every_layer("alexnet", cell_size=3))


def test_shared_measurement_equals_each_layer_alone() -> None:
    """``layer_table`` measures a torchvision network's layers in one pass per image; every shape,
    centre field and stride must be what each representation gives alone. resnet18's ``bn1`` is
    changed in place by the ReLU after it, and googlenet's auxiliary heads do not run."""
    from invviz.representations import LayerInfo, every_layer, layer_table

    size = 72
    for model, every in (("resnet18", 1), ("googlenet", 6)):  # googlenet: a sample of its 237 layers
        table = layer_table(model, size, weights="random")
        reps = list(every_layer(model, weights="random"))
        assert [row.layer for row in table] == [rep.layer for rep in reps]
        for index, (row, rep) in enumerate(zip(table, reps)):
            if index % every and not rep.layer.startswith("aux"):
                continue
            if row.code_shape is None:
                assert row == LayerInfo(rep.layer, None, None, None, "does not run in inference")
                with pytest.raises(ValueError, match="does not run"):
                    rep.code_shape(size, size)
                continue
            shape = rep.code_shape(size, size)
            assert row.code_shape == shape, rep.layer
            if not rep.is_spatial:
                assert row.receptive_field is None and row.stride is None
                continue
            expected = rep.receptive_field(shape[1] // 2, shape[2] // 2, size, size)
            assert (row.receptive_field, row.stride) == (expected, rep.stride(size, size)), rep.layer
    assert any(row.code_shape is None for row in table), "googlenet's aux heads do not run"


def test_layer_table_of_derived_fields() -> None:
    """Where fields come from the layer graph (AlexNet, Lite0) the table is each layer's own answer,
    unclipped; HOG has no weights."""
    from invviz.representations import every_layer, layer_table

    for model, options in (("alexnet", {"weights": "random"}), ("hog", {})):
        table = layer_table(model, 67, **options)
        for row, rep in zip(table, every_layer(model, **options)):
            shape = rep.code_shape(67, 67)
            assert row.code_shape == shape
            if rep.is_spatial:
                box = rep.receptive_field(shape[1] // 2, shape[2] // 2, 67, 67, clip=False)
                assert (row.receptive_field, row.stride) == (box, rep.stride(67, 67))
            else:
                assert row.receptive_field is None


def test_models_that_need_no_torchvision_do_not_import_it() -> None:
    """The registry imports a built-in model's module when the model is first asked for: importing
    torchvision costs ~1.2 s of every Lite0, HOG or SIFT command."""
    import subprocess
    import sys

    script = (
        "import sys, invviz\n"
        "for spec in ('efficientnet_lite0:blocks.4', 'hog', 'hogb', 'dsift'):\n"
        "    invviz.representation(spec)\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
        "invviz.representation('resnet18:layer1', weights='random')\n"
        "assert 'torchvision' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_builtin_table_names_every_registered_model() -> None:
    from invviz.representations import _BUILTIN, _REGISTRY, available_models

    models = available_models()  # imports every built-in module
    builtin = {name: cls.__module__.rsplit(".", 1)[1] for name, cls in _REGISTRY.items() if cls.__module__.startswith("invviz.")}
    assert builtin == _BUILTIN and set(_BUILTIN) <= set(models)


def test_layers_without_a_code_are_named_in_the_table() -> None:
    """A ViT's attention module returns a tuple, and MultiheadAttention's out_proj is used without
    being called: their rows say so, and the rest of the table is still measured."""
    from invviz.representations import layer_table, representation

    rows = {row.layer: row for row in layer_table("vit_b_16", 224, weights="random")}
    attention = "encoder.layers.encoder_layer_0.self_attention"
    assert (rows[attention].code_shape, rows[attention].note) == (None, "returns a tuple, not a tensor")
    assert rows[attention + ".out_proj"].note == "does not run in inference"
    assert rows["conv_proj"].code_shape == (768, 14, 14) and rows["conv_proj"].stride == 16
    assert rows["encoder.layers.encoder_layer_0.mlp"].code_shape == (197, 768)
    with pytest.raises(ValueError, match="returns a tuple, not a tensor; pick a layer"):
        representation(f"vit_b_16:{attention}", weights="random").code_shape(224, 224)
