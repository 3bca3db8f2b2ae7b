import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import run_cli

from invviz.images import load_image, sample_path


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.open(sample_path("coffee")).resize((90, 60)).save(path)
    return path


def test_invert_writes_png_of_the_requested_size_and_metrics(tmp_path, photo, capsys) -> None:
    out, metrics = tmp_path / "out.png", tmp_path / "m.json"
    code, stdout, _ = run_cli(
        capsys, "invert", photo, "--rep", "efficientnet_lite0:blocks.1", "--out", out, "--size", "48",
        "--iters", "15", "--metrics", metrics, "--quiet",
    )
    assert code == 0
    picture = Image.open(out)
    assert picture.mode == "RGB" and picture.size == (48, 48)
    record = json.loads(metrics.read_text())
    assert record["rep"] == "efficientnet_lite0:blocks.1" and record["iters"] == 15
    assert record["seconds"] > 0
    assert record["results"][0]["file"] == str(out)
    assert 0 < record["results"][0]["feature_error"] < 1
    assert "feature error" in stdout


def test_invert_is_reproducible_with_a_seed(tmp_path, photo, capsys) -> None:
    outputs = []
    for name in ("a.png", "b.png"):
        args = ["invert", photo, "--rep", "tiny:conv2", "--out", tmp_path / name, "--iters", "5", "--seed", "3", "--quiet"]
        assert run_cli(capsys, *args)[0] == 0
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_invert_grey_writes_a_grey_png_and_says_so_in_the_metrics(tmp_path, photo, capsys) -> None:
    out, metrics = tmp_path / "grey.png", tmp_path / "m.json"
    args = ["invert", photo, "--rep", "tiny:conv2", "--out", out, "--iters", "5", "--grey", "--metrics", metrics, "--quiet"]
    assert run_cli(capsys, *args)[0] == 0
    pixels = np.asarray(Image.open(out)).astype(int)
    assert pixels.std() > 0 and (pixels == pixels[..., :1]).all()
    assert json.loads(metrics.read_text())["settings"]["grey"] is True


def test_invert_of_a_grey_image_mentions_grey(tmp_path, capsys) -> None:
    path = tmp_path / "grey.png"
    Image.open(sample_path("coffee")).convert("L").resize((40, 40)).save(path)
    args = ["invert", path, "--rep", "tiny:conv2", "--out", tmp_path / "o.png", "--iters", "2", "--quiet"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 0 and stderr.count("\n") == 1 and "--grey reconstructs a grey image" in stderr
    code, _, stderr = run_cli(capsys, *args, "--grey")
    assert code == 0 and stderr == ""


def test_image_already_at_size_is_used_unchanged(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "exact.png"
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    out = tmp_path / "f.npy"
    assert run_cli(capsys, "features", path, "--rep", "tiny:conv1", "--out", out)[0] == 0
    from invviz import representation

    rep = representation("tiny:conv1")
    expected = rep(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None])[0]
    np.testing.assert_allclose(np.load(out), expected.detach().numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mode, scale",
    [("I;16", 257), ("I", 257), ("I", 1), ("F", 1 / 255)],  # 16-bit PNG, 32-bit TIFF (both ranges), float TIFF
)
def test_one_channel_deep_images_are_scaled_not_clipped(tmp_path, mode, scale) -> None:
    pixels = np.tile(np.arange(0, 256, 4, dtype=np.float64), (64, 1))  # a 0-252 ramp
    deep = pixels * scale
    array = deep.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    expected = torch.from_numpy(pixels / 255).float().expand(3, -1, -1)
    torch.testing.assert_close(load_image(path), expected, atol=1 / 255, rtol=0)


def test_a_long_strip_is_cut_before_it_is_resized(tmp_path) -> None:
    strip = np.random.default_rng(0).integers(0, 256, (2, 100_000, 3), dtype=np.uint8)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    image = load_image(path, 32)  # resized whole, the strip would be 32×1,600,000
    assert image.shape == (3, 32, 32)
    # What the strip's centre columns give: the part of the strip the centre crop keeps.
    middle = strip[:, 50_000 - 8 : 50_000 + 8]
    reference = load_image(Image.fromarray(np.ascontiguousarray(middle)).resize((256, 32), Image.Resampling.BICUBIC).crop((112, 0, 144, 32)))
    assert (image - reference).abs().mean() < 0.05


def test_features_shapes(tmp_path, photo, capsys) -> None:
    out = tmp_path / "f.npy"
    assert run_cli(capsys, "features", photo, "--rep", "efficientnet_lite0:stem", "--out", out)[0] == 0
    code = np.load(out)
    assert code.dtype == np.float32 and code.shape == (32, 112, 112)
    assert run_cli(capsys, "features", photo, "--rep", "efficientnet_lite0:pool", "--out", out, "--size", "64")[0] == 0
    assert np.load(out).shape == (1280,)


def test_models_and_layers(capsys) -> None:
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "efficientnet_lite0" in out and "alexnet" in out and "hog" in out
    assert "1 layers" not in out and "features … features" not in out
    code, out, _ = run_cli(capsys, "layers", "efficientnet_lite0")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "32×112×112" in lines["stem"] and "1280×7×7" in lines["head"] and "1000" in lines["logits"]
    assert "whole image" in lines["pool"]
    assert "(input 224×224)" in out.splitlines()[0]
    code, out, _ = run_cli(capsys, "layers", "hog")  # no native size: the tables' default, 224
    assert code == 0 and "(input 224×224)" in out.splitlines()[0] and "31×28×28" in out


def _truncated_png(path: Path) -> Path:
    full = path.parent / "full.png"
    Image.new("RGB", (64, 64), "red").save(full)
    path.write_bytes(full.read_bytes()[:60])
    return path


def _malicious_checkpoint(path: Path) -> Path:
    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    path.write_bytes(pickle.dumps({"weight": Exploit()}))
    return path


def _bomb_png(path: Path) -> Path:
    """A tiny PNG whose header claims 30000×30000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _lite0_weights(path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """The bundled Lite0 state dict with ``change`` applied to one tensor."""
    from invviz.representations.efficientnet import imagenet_weights_path

    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    state["_fc.weight"] = change(state["_fc.weight"])
    torch.save(state, path)
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _float_tiff(path: Path, bad: float) -> Path:
    values = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    values[3, 4] = bad
    Image.fromarray(values, mode="F").save(path)
    return path


def _flat_png(path: Path) -> Path:
    Image.new("RGB", (40, 40), (90, 90, 90)).save(path)
    return path


BAD_INPUTS = {
    "missing file": (lambda t, p: ["invert", t / "nope.png", "--rep", "tiny:conv1", "--out", t / "o.png"], "not found"),
    "empty file": (lambda t, p: ["invert", (t / "e.png", (t / "e.png").write_bytes(b""))[0], "--rep", "tiny:conv1", "--out", t / "o.png"], "empty"),
    "truncated file": (lambda t, p: ["invert", _truncated_png(t / "tr.png"), "--rep", "tiny:conv1", "--out", t / "o.png"], "truncated"),
    "not an image": (lambda t, p: ["invert", (t / "x.png", (t / "x.png").write_text("hello"))[0], "--rep", "tiny:conv1", "--out", t / "o.png"], "not an image"),
    "unknown model": (lambda t, p: ["invert", p, "--rep", "nosuchnet:conv1", "--out", t / "o.png"], "unknown model"),
    "unknown layer": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:blocks.99", "--out", t / "o.png"], "valid layers: stem, blocks.0"),
    "negative iters": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--iters", "-3"], "--iters"),
    "nan tv": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--tv", "nan"], "finite"),
    "negative tv": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--tv", "-1"], "--tv"),
    "zero size": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--size", "0"], "--size"),
    "inf alpha": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--alpha", "inf"], "finite"),
    "rectifier slope above 1": (lambda t, p: ["invert", p, "--rep", "tiny:relu1", "--out", t / "o.png", "--rectifier-slope", "2"], "rectifier_slope"),
    "bad optimizer": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--optimizer", "lbfgs"], "optimizer"),
    "bad output suffix": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.jpg"], ".png"),
    "missing output folder": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "no" / "o.png"], "does not exist"),
    "option the model lacks": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--cell-size", "4"], "does not take"),
    "malicious checkpoint": (lambda t, p: ["invert", p, "--rep", "alexnet:conv1", "--out", t / "o.png", "--weights", _malicious_checkpoint(t / "evil.pth")], "weights"),
    "missing checkpoint": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:stem", "--out", t / "o.png", "--weights", t / "none.pth"], "weights"),
    "unknown device": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--device", "tpu"], "device"),
    "no command": (lambda t, p: [], "required"),
    "image too small for the layer": (lambda t, p: ["invert", p, "--rep", "alexnet:pool5", "--weights", "random", "--out", t / "o.png", "--size", "32"], "cannot take a 32×32 image"),
    "output is a directory": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", _directory(t / "d.png")], "is a directory"),
    "restart output is a directory": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--restarts", "2", "--iters", "2", (_directory(t / "o-2.png"), "--quiet")[1]], "o-2.png is a directory"),
    "metrics is a directory": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--metrics", _directory(t / "m.json")], "--metrics"),
    "metrics over the image": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--metrics", t / "o.png"], "would overwrite"),
    "huge alpha": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--alpha", "400"], "at most"),
    "huge tv beta": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--tv-beta", "1000"], "at most"),
    "huge size": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--size", "100000"], "at most"),
    "huge restarts": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--restarts", "1000000"], "at most"),
    "huge seed": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--seed", str(2**64)], "seed"),
    "huge channel range": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--channels", "0-4294967295"], "out of range"),
    "decompression bomb": (lambda t, p: ["invert", _bomb_png(t / "bomb.png"), "--rep", "tiny:conv1", "--out", t / "o.png"], "too large"),
    "integer weights": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:stem", "--out", t / "o.png", "--weights", _lite0_weights(t / "w.pt", lambda w: w.int())], "floating point"),
    "nan weights": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:stem", "--out", t / "o.png", "--weights", _lite0_weights(t / "w.pt", lambda w: w * float("nan"))], "nan"),
    "weights directory": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:stem", "--out", t / "o.png", "--weights", _directory(t / "w")], "is a directory"),
    "demo into a file": (lambda t, p: ["demo", "--out", p], "is a file"),
    "negative window": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--window", "-1,0,2,2"], "non-negative"),
    "rectifier slope without a rectifier": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--rectifier-slope", "0.5"], "end in a rectifier"),
    "rectifier smoothing without inner rectifiers": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:stem", "--out", t / "o.png", "--rectifier-smoothing", "1"], "has none"),
    "branch gradient without inner rectifiers": (lambda t, p: ["invert", p, "--rep", "hog", "--out", t / "o.png", "--branch-gradient", "0.5"], "is not one"),
    "branch gradient without smoothing": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:blocks.4", "--out", t / "o.png", "--branch-gradient", "0.5", "--rectifier-smoothing", "0"], "--rectifier-smoothing 0 turns off"),
    "branch gradient with the paper's optimizer": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:blocks.4", "--out", t / "o.png", "--branch-gradient", "0.5", "--optimizer", "paper"], "--optimizer paper turns off"),
    "branch gradient above 1": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:blocks.4", "--out", t / "o.png", "--branch-gradient", "1.5"], "branch_gradient"),
    "rectifier smoothing above 3": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:blocks.1", "--out", t / "o.png", "--rectifier-smoothing", "4"], "rectifier_smoothing"),
    "flat regions off for a CNN": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--no-flat-regions"], "hog, hogb and dsift only"),
    "polishing a vector code": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:logits", "--out", t / "o.png", "--polish", "5"], "spatial code"),
    "colour TV for a grey code": (lambda t, p: ["invert", p, "--rep", "hog", "--out", t / "o.png", "--tv-chroma", "1"], "grey images"),
    "colour basis for a grey code": (lambda t, p: ["invert", p, "--rep", "dsift", "--out", t / "o.png", "--colour-basis", "rgb"], "colour images"),
    "chroma rate with the paper's optimizer": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--optimizer", "paper", "--chroma-rate", "0.3"], "adam optimizer"),
    "chroma rate in rgb": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--colour-basis", "rgb", "--chroma-rate", "0.3"], "opponent colour basis"),
    "grey for a grey code": (lambda t, p: ["invert", p, "--rep", "hog", "--out", t / "o.png", "--grey"], "grey images already"),
    "chroma rate for a grey reconstruction": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--grey", "--chroma-rate", "0.3"], "--grey reconstructs grey ones"),
    "colour TV for a grey reconstruction": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--grey", "--tv-chroma", "1"], "--grey reconstructs grey images"),
    "momentum of 1": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--momentum", "1"], "momentum must be below 1"),
    "negative momentum": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--momentum", "-0.5"], "at least 0"),
    "unknown colour basis": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--colour-basis", "hsv"], "invalid choice"),
    "weights for a model without": (lambda t, p: ["layers", "hog", "--weights", "random"], "has no weights"),
    "nan pixel in a float image": (lambda t, p: ["invert", _float_tiff(t / "nan.tiff", float("nan")), "--rep", "tiny:conv1", "--out", t / "o.png"], "NaN or infinite"),
    "a flat image's hog": (lambda t, p: ["invert", _flat_png(t / "flat.png"), "--rep", "hog", "--out", t / "o.png"], "all zero"),
    "features on an unknown device": (lambda t, p: ["features", p, "--rep", "tiny:conv1", "--out", t / "f.npy", "--device", "bogus"], "device"),
    "huge iters": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--iters", "99999999999"], "at most"),
    "empty weights name": (lambda t, p: ["invert", p, "--rep", "efficientnet_lite0:stem", "--out", t / "o.png", "--weights", ""], "empty name"),
    "truncation slope above 1": (lambda t, p: ["invert", p, "--rep", "hog", "--out", t / "o.png", "--truncation-slope", "3"], "truncation_slope"),
    "jitter beyond the image": (lambda t, p: ["invert", p, "--rep", "tiny:conv1", "--out", t / "o.png", "--jitter", "1000000"], "--jitter"),
}


@pytest.mark.parametrize("target", ["out", "restart", "metrics"])
def test_no_output_may_overwrite_the_input_image(target: str, tmp_path, photo, capsys) -> None:
    """Bad input loses nothing: --out, a restart's companion file or --metrics naming the input."""
    before = photo.read_bytes()
    out = {"out": photo, "restart": tmp_path / "photo-2.png"}.get(target, tmp_path / "o.png")
    if target == "restart":
        out, photo = tmp_path / "photo.png", photo.rename(tmp_path / "photo-2.png")
    extra = ["--metrics", photo] if target == "metrics" else ["--restarts", "2"] if target == "restart" else []
    code, _, stderr = run_cli(capsys, "invert", photo, "--rep", "tiny:conv1", "--out", out, "--iters", "2", *extra)
    assert code == 2 and "is the input image" in stderr and len(stderr.strip().splitlines()) == 1
    assert photo.read_bytes() == before


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, photo, capsys) -> None:
    make, fragment = BAD_INPUTS[case]
    code, _, stderr = run_cli(capsys, *make(tmp_path, photo))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("invviz: error:")
    assert fragment.lower() in lines[0].lower()
    assert "Traceback" not in stderr
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "o.png").exists()


def test_the_installed_command_exits_2_without_traceback(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "invviz", "invert", str(tmp_path / "missing.png"), "--rep", "hog", "--out", str(tmp_path / "o.png")],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_library_warnings_do_not_reach_the_error_line(tmp_path) -> None:
    # torch warns about a plain pickle before refusing it: still one line on stderr.
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weight": [1.0]}))
    result = subprocess.run(
        [sys.executable, "-m", "invviz", "layers", "efficientnet_lite0", "--weights", str(path)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("invviz: error:"), result.stderr


def test_features_writes_exactly_the_path_given(tmp_path, photo, capsys) -> None:
    code, _, _ = run_cli(capsys, "features", photo, "--rep", "tiny:conv1", "--out", tmp_path / "F.NPY")
    assert code == 0 and [p.name for p in tmp_path.glob("F.*")] == ["F.NPY"]
    assert np.load(tmp_path / "F.NPY").dtype == np.float32


def test_nan_is_not_a_number_anywhere(tmp_path, photo, capsys) -> None:
    for option in ("--tv-beta", "--tv-chroma", "--alpha-weight", "--lr", "--rectifier-slope", "--feature-power", "--tv-start", "--chroma-rate", "--rectifier-smoothing", "--momentum", "--branch-gradient"):
        code, _, err = run_cli(capsys, "invert", photo, "--rep", "tiny:conv1", "--out", tmp_path / "o.png", option, "nan")
        assert code == 2 and "finite" in err


def test_demo_writes_a_captioned_grid_a_table_and_metrics(tmp_path, capsys) -> None:
    code, stdout, stderr = run_cli(capsys, "demo", "--out", tmp_path, "--iters", "3")
    assert code == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    layers = [row["layer"] for row in record["results"]]
    assert len(layers) == 6 and layers[0] == "stem"
    assert all(Path(row["file"]).exists() and 0 < row["feature_error"] for row in record["results"])
    assert Image.open(tmp_path / "demo.png").size[0] > 6 * 150
    for layer in layers:
        assert layer in stdout  # the printed table
    assert "3/3" in stderr  # the progress bar's finished line


def test_the_live_progress_bar_shows_the_time_left_and_clears_longer_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from invviz import cli
    from invviz.engine import Step

    clock = [0.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])
    screen = io.StringIO()
    monkeypatch.setattr(cli.sys, "stderr", screen)
    bar = cli.ProgressBar("hog")
    bar.live = True
    images = torch.zeros(1, 3, 2, 2)
    for number in range(1, 5):
        clock[0] += 1.0  # 3 steps of 1 s, then polishing's set-up round
        bar(Step(number, 6, {}, [0.25], images, clock[0], polishing=number > 3, rounds=3))
    clock[0] += 0.5
    bar(Step(5, 6, {}, [0.25], images, clock[0], polishing=True, rounds=3))
    clock[0] += 0.5
    bar(Step(6, 6, {}, [0.25], images, clock[0], polishing=True, rounds=3))
    frames = screen.getvalue().split("\r")[1:]
    assert frames[0].endswith("1/6 err 0.250")  # the first step includes the run's set-up: no estimate
    assert frames[1].endswith("2/6 err 0.250 · 3 s left")  # 1 step at 1 s, 3 rounds at ROUND_COST steps
    assert frames[3].endswith("4/6 err 0.250 polishing · 1 s left")  # 2 rounds at 0.6 s each
    assert frames[4].endswith("5/6 err 0.250 polishing · 0 s left")  # 1 round at 0.5 s
    assert frames[-1].rstrip() == "hog [##############################] 6/6 err 0.250 polishing"
    assert len(frames[-1]) == len(frames[-2]) + 1 and frames[-1].endswith(" \n"), "spaces over the longer line"


def test_no_output_may_overwrite_the_input_through_a_hard_link(tmp_path, photo, capsys) -> None:
    link = tmp_path / "link.png"
    os.link(photo, link)
    before = photo.read_bytes()
    code, _, err = run_cli(capsys, "invert", link, "--rep", "tiny:conv1", "--out", photo, "--iters", "2")
    assert code == 2 and "input image" in err and photo.read_bytes() == before


def test_the_demo_refuses_to_overwrite_its_image(tmp_path, capsys) -> None:
    image = tmp_path / "blocks_4.png"
    Image.new("RGB", (40, 40), (20, 90, 200)).save(image)
    before = image.read_bytes()
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path, "--image", image, "--iters", "1")
    assert code == 2 and "overwrite its --image" in err and image.read_bytes() == before


def test_the_demo_takes_a_flat_image(tmp_path, capsys) -> None:
    """Its roughness is 0: the ratio is shown as '-' and written as null, not a ZeroDivisionError."""
    code, stdout, _ = run_cli(capsys, "demo", "--out", tmp_path / "d", "--image", _flat_png(tmp_path / "f.png"), "--iters", "1")
    assert code == 0
    record = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert [row["roughness_ratio"] for row in record["results"]] == [None] * 6
    table = [line.split() for line in stdout.splitlines() if line.startswith(("stem ", "blocks."))]
    assert len(table) == 6 and all(row[3] == "-" for row in table)


def test_layers_measures_receptive_fields_at_the_centre_and_marks_layers_that_do_not_run(capsys) -> None:
    """resnet18's fields are measured from the gradient: at a corner cell they were cut by the
    image (conv1 read 4×4, maxpool 6×6); googlenet's auxiliary heads do not run in inference."""
    code, stdout, _ = run_cli(capsys, "layers", "resnet18", "--size", "64")
    rows = {line.split()[0]: line for line in stdout.splitlines()[1:]}
    assert code == 0 and "7×7 px" in rows["conv1"] and "11×11 px" in rows["maxpool"]
    code, stdout, _ = run_cli(capsys, "layers", "googlenet", "--size", "64")
    rows = {line.split()[0]: line for line in stdout.splitlines()[1:]}
    assert code == 0 and "does not run" in rows["aux1"] and "whole image" in rows["fc"]
    code, _, stderr = run_cli(capsys, "layers", "googlenet", "--size", "8")
    assert code == 2 and "cannot take a 8×8 image" in stderr and "Traceback" not in stderr


def test_images_load_upright_and_arrays_scale_like_files(tmp_path) -> None:
    from invviz.images import load_image, save_image

    sideways = Image.new("RGB", (80, 40), (200, 30, 30))
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    sideways.save(tmp_path / "phone.jpg", exif=exif)
    assert tuple(load_image(tmp_path / "phone.jpg").shape) == (3, 80, 40)
    sixteen = load_image(np.full((4, 5), 32768, np.uint16))
    assert abs(float(sixteen.mean()) - 128 / 255) < 1e-6, "16-bit arrays are scaled, not clipped"
    floats = np.random.default_rng(0).random((6, 7, 3))
    assert torch.allclose(load_image(floats), torch.from_numpy(np.rint(floats * 255) / 255).permute(2, 0, 1).float())
    for bad, message in ((np.zeros((4, 4, 2)), r"\(H, W, 3\)"), (np.zeros((4, 4), bool), "integers or floats"),
                         (np.full((4, 4), np.inf), "NaN or infinite")):
        with pytest.raises(ValueError, match=message):
            load_image(bad)
    for bad, message in ((torch.zeros(4, 4), r"\(3, H, W\)"), (torch.full((3, 4, 4), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=message):
            save_image(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
