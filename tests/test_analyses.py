"""Restarts and diversity, channel and window masks, channel galleries, receptive-field crops, the CLI
flags that expose them, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import gradient_support, tiny_net
from tiny import TinyNet
from torch import Tensor

from invviz.cli import main
from invviz.engine import Settings, invert, match
from invviz.engine.analyses import (
    channel_gallery,
    channel_mask,
    check_mask,
    diversity,
    parse_channels,
    receptive_field_crop,
    restarts,
    window_mask,
)
from invviz.engine.objectives import Context
from invviz.representations import Box, representation

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("one_thread")]

from conftest import TINY_SIZE as SIZE

CODE = (6, 7, 7)  # the "tiny" test net's code at SIZE × SIZE


# --- masks --------------------------------------------------------------------------------------
def test_parse_channels() -> None:
    assert parse_channels("0-3, 7,10-11", 16) == [0, 1, 2, 3, 7, 10, 11]
    assert parse_channels("first-half", 5) == [0, 1]
    assert parse_channels("second-half", 5) == [2, 3, 4]
    assert parse_channels(" ALL ", 3) == [0, 1, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no channels"),
        ("16", "out of range"),
        ("3-1", "end is before the start"),
        ("1,1", "more than once"),
        ("0-2,2", "more than once"),
        ("a", "not N or N-M"),
        ("-1", "not N or N-M"),
        ("1-", "not N or N-M"),
        ("third-half", "not N or N-M"),
    ],
)
def test_parse_channels_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_channels(text, 16)


def test_channel_and_window_masks() -> None:
    mask = channel_mask(CODE, [1, 4])
    assert mask.shape == CODE and mask[[1, 4]].all() and mask.sum() == 2 * 49
    window = window_mask(CODE, (2, 2, 4, 5))
    assert window.shape == CODE and window.sum() == 6 * 20 and window[:, 2:6, 2:7].all()
    assert channel_mask((10,), [9]).tolist() == [False] * 9 + [True]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: channel_mask(CODE, []), "no channels"),
        (lambda: channel_mask(CODE, [6]), "out of range"),
        (lambda: channel_mask(CODE, [-1]), "out of range"),
        (lambda: window_mask(CODE, (0, 0, 8, 1)), "outside the code"),
        (lambda: window_mask(CODE, (-1, 0, 1, 1)), "outside the code"),
        (lambda: window_mask(CODE, (6, 6, 2, 1)), "outside the code"),
        (lambda: window_mask(CODE, (0, 0, 0, 1)), "at least 1"),
        (lambda: window_mask((10,), (0, 0, 1, 1)), "spatial code"),
        (lambda: check_mask(torch.ones(CODE), CODE), "boolean"),
        (lambda: check_mask(torch.ones(6, 7, dtype=torch.bool), CODE), "does not fit"),
        (lambda: check_mask(torch.ones(1, 6, 7, 7, dtype=torch.bool), CODE), "does not fit"),
        (lambda: check_mask(torch.zeros(CODE, dtype=torch.bool), CODE), "no code entry"),
        (lambda: check_mask(torch.ones(10, dtype=torch.bool), (10, 1, 1)), "does not fit"),
    ],
)
def test_bad_masks(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_check_mask_accepts_spatial_masks() -> None:
    spatial = torch.zeros(7, 7, dtype=torch.bool)
    spatial[2, 3] = True
    assert check_mask(spatial, CODE).shape == CODE and check_mask(spatial, CODE).sum() == 6


def test_masked_loss_uses_only_the_selected_entries(image: Tensor) -> None:
    """Exact value: ‖m⊙(Φ(x) − Φ0)‖² / ‖m⊙Φ0‖², blind to the target outside the mask."""
    rep = tiny_net().double()
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = rep(image.double()[None])
        code = rep(x)
    mask = window_mask(CODE, (1, 2, 3, 2)) & channel_mask(CODE, [0, 5])
    expected = torch.stack([(c[mask] - target[0][mask]).pow(2).sum() / target[0][mask].pow(2).sum() for c in code])
    loss = match(rep, target, mask).evaluate(Context(x))["feature"]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    scrambled = torch.where(mask, target, torch.randn_like(target) * 100)
    torch.testing.assert_close(match(rep, scrambled, mask).evaluate(Context(x))["feature"], loss, rtol=1e-12, atol=0)


def test_masked_inversion_reports_the_masked_error(image: Tensor) -> None:
    rep = tiny_net()
    mask = window_mask(CODE, (2, 2, 3, 3))
    result = invert(rep, image, mask=mask, settings=Settings(iters=40), device="cpu")
    with torch.no_grad():
        target, code = rep(image[None])[0], rep(result.images)[0]
    expected = ((code[mask] - target[mask]).norm() / target[mask].norm()).item()
    assert result.feature_error[0] == pytest.approx(expected, rel=1e-5)
    assert result.feature_error[0] < 0.5  # it matched the window


# --- receptive fields ---------------------------------------------------------------------------
@pytest.mark.parametrize("window", [(0, 0, 1, 1), (1, 2, 3, 4), (4, 4, 3, 3), (0, 0, 7, 7)])
def test_window_receptive_field_is_the_gradient_support(window: tuple[int, int, int, int]) -> None:
    y, x, h, w = window
    rows, cols = (y, y + h), (x, x + w)
    assert tiny_net().receptive_field(rows, cols, SIZE, SIZE) == gradient_support(tiny_net(), rows, cols, SIZE, SIZE)


def test_lite0_window_receptive_field_is_the_gradient_support() -> None:
    rep = representation("efficientnet_lite0:blocks.4", weights="random")
    rows, cols = (1, 3), (2, 3)
    assert rep.receptive_field(rows, cols, 64, 64) == gradient_support(rep, rows, cols, 64, 64)


def test_receptive_field_crop(image: Tensor) -> None:
    box = tiny_net().receptive_field((1, 3), (2, 4), SIZE, SIZE)
    crop = receptive_field_crop(image, box)
    assert crop.shape == (3, box.height, box.width)
    assert torch.equal(crop, image[:, box.top : box.bottom, box.left : box.right])
    assert receptive_field_crop(image, Box(-5, -5, 4, 3)).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="does not overlap"):
        receptive_field_crop(image, Box(SIZE, 0, SIZE + 4, 4))
    with pytest.raises(ValueError, match="image must be"):
        receptive_field_crop(image[0], box)


# --- restarts -----------------------------------------------------------------------------------
def test_restarts_differ_and_diversity_is_positive(image: Tensor) -> None:
    result = restarts(tiny_net(), image, 3, settings=Settings(iters=20), device="cpu")
    assert result.images.shape == (3, 3, SIZE, SIZE) and len(result.feature_error) == 3
    for a in range(3):
        for b in range(a + 1, 3):
            assert (result.images[a] - result.images[b]).abs().max() > 1e-3
    assert diversity(result.images) > 0


def test_diversity_value() -> None:
    images = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.full((3, 2, 2), 0.5)])
    # pairwise RMS distances 1, 0.5, 0.5 → mean 2/3
    assert diversity(images) == pytest.approx(2 / 3)
    assert diversity(images[:1]) == 0.0
    with pytest.raises(ValueError, match="batch of images"):
        diversity(images[0])


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_restarts_rejects_bad_k(image: Tensor, k: object) -> None:
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        restarts(tiny_net(), image, k, device="cpu")  # type: ignore[arg-type]


def test_restarts_checks_its_mask(image: Tensor) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        restarts(tiny_net(), image, 2, mask=torch.ones(3, 3, dtype=torch.bool), device="cpu")


# --- galleries ----------------------------------------------------------------------------------
def test_gallery_chunking_gives_the_same_images(image: Tensor) -> None:
    settings = Settings(iters=15)
    channels = [0, 2, 3, 5, 1]
    whole = channel_gallery(tiny_net(), image, channels, settings=settings, device="cpu", chunk=5)
    tiles: list[tuple[int, float]] = []
    steps: list[tuple[int, list[int]]] = []
    chunked = channel_gallery(
        tiny_net(),
        image,
        channels,
        settings=settings,
        device="cpu",
        chunk=2,
        on_tile=lambda index, tile, error: tiles.append((index, error)),
        on_step=lambda step, indices: steps.append((step.step, indices)),
    )
    one_by_one = channel_gallery(tiny_net(), image, channels, settings=settings, device="cpu")
    for other in (chunked, one_by_one):
        torch.testing.assert_close(other.images, whole.images, rtol=0, atol=1e-4)
        assert other.feature_error == pytest.approx(whole.feature_error, rel=1e-3)
        assert other.channels == channels and not other.stopped
    assert [index for index, _ in tiles] == [0, 1, 2, 3, 4]
    assert [error for _, error in tiles] == chunked.feature_error
    assert steps[0] == (1, [0, 1]) and steps[15] == (16, [2, 3]) and steps[-1] == (45, [4])
    # Each tile matched its own channel better than the others' channels.
    assert max(whole.feature_error) < 1.0


def test_gallery_tiles_differ_by_channel(image: Tensor) -> None:
    gallery = channel_gallery(tiny_net(), image, [0, 1], settings=Settings(iters=30), device="cpu")
    assert (gallery.images[0] - gallery.images[1]).abs().max() > 1e-2


def test_gallery_stops_between_chunks(image: Tensor) -> None:
    class StopAfterFirstTile:
        def __init__(self) -> None:
            self.tiles = 0

        def is_set(self) -> bool:
            return self.tiles > 0

    stop = StopAfterFirstTile()

    def on_tile(index: int, tile: Tensor, error: float) -> None:
        stop.tiles += 1

    gallery = channel_gallery(tiny_net(), image, [0, 1, 2], settings=Settings(iters=5), device="cpu", on_tile=on_tile, stop=stop)
    assert gallery.stopped and gallery.feature_error[0] > 0
    assert all(math.isnan(error) for error in gallery.feature_error[1:])  # never started
    assert gallery.images[1:].eq(0).all()


@pytest.mark.parametrize(
    ("channels", "options", "message"),
    [
        ([], {}, "no channels"),
        ([6], {}, "out of range"),
        ([0, 0], {}, "more than once"),
        ([0], {"chunk": 0}, "chunk must be a positive integer"),
        ([0], {"mask": torch.zeros(7, 7, dtype=torch.bool)}, "no code entry"),
        ([0], {"mask": torch.ones(4, 4, dtype=torch.bool)}, "does not fit"),
    ],
)
def test_gallery_rejects(image: Tensor, channels: list[int], options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_gallery(tiny_net(), image, channels, device="cpu", **options)  # type: ignore[arg-type]


def test_gallery_leaves_out_channels_the_image_leaves_at_zero(image: Tensor) -> None:
    rep = TinyNet("conv2")
    assert rep.conv2.bias is not None
    with torch.no_grad():
        rep.conv2.weight[3] = 0
        rep.conv2.bias[3] = 0
    settings = Settings(iters=3)
    result = channel_gallery(rep, image, [2, 3, 4], settings=settings, device="cpu")
    assert result.empty == [3] and result.metrics()["empty_channels"] == [3]
    assert math.isnan(result.feature_error[1]) and not result.images[1].any()
    # The others are what they would be without the dead channel.
    alone = channel_gallery(rep, image, [2, 4], settings=settings, device="cpu")
    assert not math.isnan(result.feature_error[0]) and torch.equal(result.images[0], alone.images[0])
    with pytest.raises(ValueError, match="channel 3 of the target code is all zero"):
        channel_gallery(rep, image, [3], device="cpu")


# --- command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "photo.png"
    noise = torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(0))
    Image.fromarray((noise.numpy() * 255).astype("uint8")).save(path)
    return path


LITE0 = ("--rep", "efficientnet_lite0:blocks.2", "--size", "32")  # code (24, 8, 8)


def run_cli(photo: Path, out: Path, *flags: str) -> int:
    """``invviz invert`` for 3 iterations; the tiny test net at 16² unless ``flags`` choose ``--rep``."""
    rep = () if "--rep" in flags else ("--rep", "tiny:conv2", "--size", "16")
    return main(["invert", str(photo), *rep, "--iters", "3", "--quiet", "--out", str(out),
                 "--metrics", str(out.with_suffix(".json")), *flags])


def test_cli_restarts(photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    assert run_cli(photo, out, *LITE0, "--restarts", "3") == 0
    names = ["r.png", "r-2.png", "r-3.png", "r-grid.png"]
    assert all((tmp_path / name).is_file() for name in names)
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert [r["file"] for r in metrics["results"]] == [str(tmp_path / n) for n in names[:3]]
    assert all(r["feature_error"] > 0 for r in metrics["results"]) and metrics["diversity"] > 0
    assert Image.open(tmp_path / "r-grid.png").size == (2 * 32 + 6, 2 * 32 + 6)


def test_cli_channel_gallery_with_window(photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.png"
    assert run_cli(photo, out, *LITE0, "--channels", "0-3", "--window", "1,1,2,2") == 0
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert [c["channel"] for c in metrics["channels"]] == [0, 1, 2, 3]
    assert all(c["feature_error"] > 0 for c in metrics["channels"])
    assert Image.open(out).size == (2 * 32 + 6, 2 * 32 + 6)
    rf = Image.open(tmp_path / "g-rf.png")
    assert rf.size[0] > rf.size[1]  # original and four reconstructions side by side
    assert "channel 3: feature error" in capsys.readouterr().out


def test_cli_channels_together(photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.png"
    assert run_cli(photo, out, "--channels", "first-half", "--channels-together") == 0
    assert out.is_file() and not (tmp_path / "t-rf.png").exists()
    assert len(json.loads(out.with_suffix(".json").read_text())["results"]) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--restarts", "0"], "--restarts: must be at least 1"),
        (["--restarts", "x"], "--restarts: expected an integer"),
        (["--window", "1,2,3"], "expected Y,X,H,W"),
        (["--window", "0,0,0,1"], "at least 1"),
        (["--window=-1,0,1,1"], "expected Y,X,H,W"),
        (["--window", "6,0,2,1"], "outside the code"),
        (["--channels", "6"], "out of range"),
        (["--channels", "2-1"], "end is before the start"),
        (["--channels", "zero"], "not N or N-M"),
        (["--channels-together"], "--channels-together needs --channels"),
        (["--channels", "0-1", "--restarts", "2"], "cannot be combined"),
    ],
)
def test_cli_bad_input(photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    assert run_cli(photo, tmp_path / "e.png", *flags) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("invviz: error:") and message in error


def test_cli_window_needs_a_spatial_code(photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["invert", str(photo), "--rep", "efficientnet_lite0:logits", "--weights", "random", "--size", "32",
                 "--iters", "1", "--quiet", "--out", str(tmp_path / "e.png"), "--window", "0,0,1,1"])
    assert code == 2 and "spatial code" in capsys.readouterr().err
