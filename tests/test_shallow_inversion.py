"""Inverting HOG, HOGb and dense SIFT from the CLI and the API: outputs, codes, quality, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import run_cli
from vlfeat import gray_255, requires_vlfeat, vl_dsift, vl_hog

from invviz import Settings, invert, representation
from invviz.images import load_image, sample_path, to_uint8

#: (rep, CLI options, largest feature error after ITERS steps and the default polishing on the 70x90
#: photo). Measured with seeds 0 and 1: hog 0.126-0.134, hogb 0.112-0.113, dsift 0.106-0.116.
#: The bounds leave room for float differences across machines and sit far below the error of a
#: σ = 1.5 blur (HOG 0.4-0.6) or of a different photo (0.8-1.0).
CASES = [
    ("hog", [], 0.17),
    ("hogb", ["--cell-size", "6"], 0.16),
    ("dsift", ["--bin-size", "4", "--step", "3"], 0.16),
]
ITERS = 40


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 70x90 (height x width) photo: not a multiple of any cell, bin or step used here."""
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.open(sample_path("chelsea")).resize((90, 70)).save(path)
    return path


def _options(extra: list[str]) -> dict[str, int]:
    return {extra[i].lstrip("-").replace("-", "_"): int(extra[i + 1]) for i in range(0, len(extra), 2)}


@requires_vlfeat
@pytest.mark.parametrize("spec, extra, bound", CASES, ids=[case[0] for case in CASES])
def test_cli_inverts_to_a_gray_png_of_the_input_size(spec, extra, bound, photo, tmp_path, capsys) -> None:
    out, metrics = tmp_path / "out.png", tmp_path / "m.json"
    code, stdout, _ = run_cli(
        capsys, "invert", photo, "--rep", spec, *extra, "--out", out, "--iters", ITERS, "--metrics", metrics, "--quiet"
    )
    assert code == 0 and "feature error" in stdout
    written = np.asarray(Image.open(out).convert("RGB"))
    assert written.shape == (70, 90, 3)
    assert (written == written[..., :1]).all(), "a luminance code must give a gray picture"
    record = json.loads(metrics.read_text())
    assert record["rep"] == f"{spec}:features" and record["iters"] == ITERS
    assert record["results"][0]["feature_error"] < bound
    # The same error, measured by VLFeat on the 8-bit PNG against the input's own code.
    rep = representation(spec, **_options(extra))
    reference = _vlfeat(rep, load_image(photo))
    reconstruction = _vlfeat(rep, load_image(out))
    assert np.linalg.norm(reconstruction - reference) / np.linalg.norm(reference) < bound


def _vlfeat(rep: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
    gray = gray_255(image.numpy())
    if rep.model == "dsift":
        return vl_dsift(gray, rep.bin_size, rep.step)
    return vl_hog(gray, rep.cell_size, bilinear=rep.bilinear)


@requires_vlfeat
@pytest.mark.parametrize(
    "spec, extra, channels",
    [("hog", [], 31), ("hogb", ["--cell-size", "5"], 31), ("dsift", [], 128), ("dsift", ["--bin-size", "3", "--step", "2"], 128)],
)
def test_features_equal_vlfeat(spec, extra, channels, photo, tmp_path, capsys) -> None:
    out = tmp_path / "f.npy"
    assert run_cli(capsys, "features", photo, "--rep", spec, *extra, "--out", out)[0] == 0
    code = np.load(out)
    reference = _vlfeat(representation(spec, **_options(extra)), load_image(photo))
    assert code.shape == reference.shape and code.shape[0] == channels
    np.testing.assert_allclose(code, reference, atol=1e-4 * float(np.ptp(reference)))


@pytest.mark.parametrize("spec", ["hog", "hogb", "dsift"])
def test_inversion_lowers_the_error(spec: str) -> None:
    """From noise (error about 1) to well under a blurred copy's (HOG 0.4-0.6) in 60 steps.

    Measured on the 8-bit result, polished by default: hog 0.139, hogb 0.076, dsift 0.077 (0.153,
    0.077, 0.081 without polishing).
    """
    torch.manual_seed(0)
    image = load_image(sample_path("coffee"), 64)
    rep = representation(spec)
    result = invert(rep, image, settings=Settings(iters=60), device="cpu")
    written = torch.from_numpy(to_uint8(result.image)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        target = rep(image[None])
        start = rep(torch.full((1, 3, 64, 64), 0.45) + 0.05 * torch.randn(1, 1, 64, 64))
        errors = [float((code - target).norm() / target.norm()) for code in (start, rep(written[None]))]
    bounds = {"hog": 0.18, "hogb": 0.11, "dsift": 0.11}
    assert errors[0] > 0.8
    assert errors[1] < bounds[spec], errors


def test_shallow_defaults_differ_from_cnn_defaults() -> None:
    """HOG/SIFT pick their own TV weight and Adam rate; an explicit value still wins."""
    rep = representation("hog")
    resolved = Settings().resolved(rep)
    assert resolved.tv_weight == rep.default_tv_weight() and resolved.lr == rep.default_adam_lr()
    assert Settings(lr=0.1, tv_weight=0.5).resolved(rep).lr == 0.1
    assert Settings(optimizer="paper").resolved(rep).lr != rep.default_adam_lr()


def test_default_iterations_per_representation() -> None:
    """HOG, HOGb and dense SIFT take 400 steps by default, CNN layers 200; an explicit count wins."""
    counts = {spec: Settings().resolved(representation(spec)).iters for spec in ("hog", "hogb", "dsift", "tiny:conv2")}
    assert counts == {"hog": 400, "hogb": 400, "dsift": 400, "tiny:conv2": 200}
    assert Settings(iters=7).resolved(representation("hog")).iters == 7


BAD_INPUTS = {
    "image smaller than a HOG cell": (["--rep", "hog", "--cell-size", "16"], (12, 40), "at least 16×16"),
    "image smaller than a SIFT window": (["--rep", "dsift", "--bin-size", "6"], (15, 40), "one SIFT window"),
    "zero cell size": (["--rep", "hog", "--cell-size", "0"], (70, 90), "--cell-size: must be at least 1"),
    "negative bin size": (["--rep", "dsift", "--bin-size", "-2"], (70, 90), "--bin-size: must be at least 1"),
    "step larger than the image": (["--rep", "dsift", "--step", "80"], (70, 90), "step=80"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path, capsys) -> None:
    options, (height, width), fragment = BAD_INPUTS[case]
    image = tmp_path / "in.png"
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(image)
    for command in ("invert", "features"):
        out = tmp_path / ("o.png" if command == "invert" else "o.npy")
        code, _, stderr = run_cli(capsys, command, image, *options, "--out", out, *(["--iters", "2"] * (command == "invert")))
        assert code == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("invviz: error:"), stderr
        assert fragment in lines[0]
        assert not out.exists()


@pytest.mark.parametrize(
    "spec, options, name",
    [("hog", {"cell_size": 0}, "cell_size"), ("dsift", {"bin_size": -1}, "bin_size"), ("dsift", {"step": 2.5}, "step")],
)
def test_api_names_the_bad_parameter(spec: str, options: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        representation(spec, **options)


def _flat_square_image(size: int = 64) -> torch.Tensor:
    """Noise with a flat square in it: the code is all zero over the square's inside."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
    pixels[8:48, 12:56] = 90
    return torch.from_numpy(pixels).float().div(255).expand(3, -1, -1).contiguous()


@pytest.mark.parametrize("spec", ["hog", "hogb", "dsift"])
def test_flat_support_holds_what_an_all_zero_cell_says_is_flat(spec: str) -> None:
    rep = representation(spec)
    image = _flat_square_image()
    with torch.no_grad():
        code = rep(image[None])[0]
    zero = (code == 0).all(0)
    assert 0 < int(zero.sum()) < zero.numel()
    for row, col in zero.nonzero().tolist():
        box = rep.flat_support(row, col, 64, 64)
        patch = image[0, box.top : box.bottom, box.left : box.right]
        assert bool((patch == patch[0, 0]).all()), (row, col, box)
    # Tight along the box's middle row and column: changing one pixel just inside wakes the cell.
    row, col = zero.nonzero()[len(zero.nonzero()) // 2].tolist()
    box = rep.flat_support(row, col, 64, 64)
    middle_y, middle_x = (box.top + box.bottom) // 2, (box.left + box.right) // 2
    for y, x in ((box.top, middle_x), (box.bottom - 1, middle_x), (middle_y, box.left), (middle_y, box.right - 1)):
        poked = image.clone()
        poked[:, y, x] += 0.1
        with torch.no_grad():
            assert bool(rep(poked[None])[0, :, row, col].abs().sum() > 0), (y, x)


@pytest.mark.parametrize("spec", ["hog", "dsift"])
def test_pixels_under_all_zero_cells_come_out_flat(spec: str) -> None:
    from invviz.engine.flat import FlatRegions

    rep = representation(spec)
    image = _flat_square_image()
    settings = Settings(iters=30)
    with torch.no_grad():
        target = rep(image[None])
    regions = FlatRegions.from_target(rep, target, 1, 64, 64)
    assert regions is not None and regions.regions == 1
    held = regions.ids[0].view(64, 64) > 0
    result = invert(rep, image, settings=settings)
    inside = torch.from_numpy(to_uint8(result.image)[..., 0])[held]
    assert bool((inside == inside[0]).all())  # one value, even after 8-bit rounding
    free = invert(rep, image, settings=Settings(iters=30, flat_regions=False))
    assert torch.from_numpy(to_uint8(free.image)[..., 0])[held].unique().numel() > 1
    # The reported error is the error of the image returned.
    with torch.no_grad():
        error = ((rep(result.images) - target).norm() / target.norm()).item()
    assert result.feature_error[0] == pytest.approx(error, rel=1e-5)


def test_flat_regions_stay_out_of_masked_and_custom_inversions() -> None:
    from invviz import match, tv

    rep = representation("hog")
    image = _flat_square_image()
    with torch.no_grad():
        target = rep(image[None])
    mask = torch.ones(target.shape[-2:], dtype=torch.bool)
    masked = invert(rep, image, mask=mask, settings=Settings(iters=3))
    custom = invert(rep, image, objective=match(rep, target) + 0.001 * tv(2), settings=Settings(iters=3))
    for result in (masked, custom):
        assert torch.from_numpy(to_uint8(result.image)[..., 0])[12:44, 16:52].unique().numel() > 1
    with pytest.raises(ValueError, match="flat_regions"):
        Settings(flat_regions=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["hog", "dsift"])
def test_separate_flat_areas_are_separate_regions(spec: str) -> None:
    from invviz.engine.flat import FlatRegions

    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (96, 128), dtype=np.uint8)
    pixels[4:44, 4:60] = 30
    pixels[52:92, 70:124] = 200
    image = torch.from_numpy(pixels).float().div(255).expand(3, -1, -1)[None]
    rep = representation(spec)
    with torch.no_grad():
        target = rep(image)
    regions = FlatRegions.from_target(rep, target.expand(2, -1, -1, -1), 2, 96, 128)
    assert regions is not None and regions.regions == 2 and regions.ids.shape == (2, 96 * 128)
    for number, value in ((1, 30), (2, 200)):
        held = regions.ids[1].view(96, 128) == number
        assert bool(held.any()) and bool((torch.from_numpy(pixels)[held] == value).all())
    # Each region is replaced by its mean, the rest is untouched.
    x = torch.rand(2, 1, 96, 128)
    projected = regions.project(x)
    for row in range(2):
        held = regions.ids[row].view(1, 96, 128) == 1
        expected = x[row][held].mean().expand(int(held.sum()))
        torch.testing.assert_close(projected[row][held], expected)
    assert torch.equal(projected[regions.ids.view(2, 1, 96, 128) == 0], x[regions.ids.view(2, 1, 96, 128) == 0])
