"""Inputs a review (session 17) found unchecked or mishandled, each a clear error now, and results it
found wrong (a one-restart run ignoring its seed, the first ETA)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import run_cli

import invviz
from invviz.cli import ProgressBar
from invviz.engine.jobs import TimeLeft
from invviz.engine.loop import Step

SETTINGS = invviz.Settings(iters=2)


@pytest.fixture(scope="module")
def rep() -> invviz.Representation:
    return invviz.representation("efficientnet_lite0", layer="blocks.1")


@pytest.fixture()
def png(tmp_path: Path) -> Path:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


# ---- Python API ----


def test_an_image_too_small_for_the_layer_is_a_value_error(rep) -> None:
    alexnet = invviz.representation("alexnet", layer="conv3", weights="random")
    with pytest.raises(ValueError, match="too small|smaller|at least"):
        invviz.invert(alexnet, torch.rand(3, 16, 16), settings=SETTINGS, device="cpu")


def test_targets_must_fit_the_image_and_the_batch(rep) -> None:
    image = torch.rand(3, 32, 40)
    target = rep(image[None]).detach()
    with pytest.raises(ValueError, match="does not fit"):
        invviz.invert(rep, torch.rand(3, 16, 16), target=target, settings=SETTINGS, device="cpu")
    two = rep(torch.rand(2, 3, 32, 40)).detach()
    with pytest.raises(ValueError, match="2 codes but batch is 1"):
        invviz.invert(rep, target=two, size=(32, 40), settings=SETTINGS, device="cpu")
    result = invviz.invert(rep, target=two, size=(np.int64(32), np.int64(40)), batch=np.int64(2), settings=SETTINGS, device="cpu")
    assert result.images.shape == (2, 3, 32, 40)


def test_per_row_masks_are_checked_like_a_users_mask(rep) -> None:
    image = torch.rand(3, 32, 40)
    shape = tuple(rep(image[None]).shape[1:])
    run = lambda mask, batch=1: invviz.invert(rep, image, mask=mask, batch=batch, settings=SETTINGS, device="cpu")
    with pytest.raises(ValueError, match="boolean"):
        run(torch.ones(1, *shape))
    with pytest.raises(ValueError, match="does not fit"):
        run(torch.ones(1, shape[0], shape[1] + 1, shape[2], dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        run(torch.ones(3, *shape, dtype=torch.bool), batch=2)
    with pytest.raises(ValueError, match="does not fit"):
        run(torch.ones(1, 1, *shape, dtype=torch.bool))
    empty = torch.ones(2, *shape, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="selects no code entry"):
        run(empty, batch=2)
    window = np.zeros(shape[1:], dtype=bool)
    window[:2, :2] = True
    assert run(window).images.shape == (1, 3, 32, 40)  # a numpy mask is taken as a tensor
    assert run(torch.ones(2, *shape, dtype=torch.bool), batch=2).images.shape == (2, 3, 32, 40)


def test_channel_gallery_checks_its_image_channels_and_settings(rep) -> None:
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        invviz.channel_gallery(rep, image * 3, [0], settings=SETTINGS, device="cpu")
    with pytest.raises(ValueError, match="integers"):
        invviz.channel_gallery(rep, image, [1.5], settings=SETTINGS, device="cpu")
    with pytest.raises(ValueError, match="invviz.Settings"):
        invviz.channel_gallery(rep, image, [0], settings="x", device="cpu")  # type: ignore[arg-type]


def test_one_restart_still_starts_from_its_seeds_noise(rep) -> None:
    image = torch.rand(3, 32, 32)
    first, second = (
        invviz.restarts(rep, image, np.int64(1), settings=invviz.Settings(iters=2, seed=seed), device="cpu").images
        for seed in (1, 2)
    )
    assert float((first - second).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["tv_beta", "alpha_weight", "alpha", "chroma_rate"])
def test_settings_refuse_none_where_a_number_is_needed(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        invviz.Settings(**{name: None})


def test_settings_refuse_a_rate_beyond_any_use() -> None:
    with pytest.raises(ValueError, match="lr must be at most"):
        invviz.Settings(lr=1e39)
    assert invviz.Settings(lr=1e6).lr == 1e6


def test_windows_and_cells_must_be_integers(rep) -> None:
    shape = (24, 8, 10)
    for window in [(0.5, 0, 2, 2), (0, 0, 2), "0,0,2,2"]:
        with pytest.raises(ValueError, match="four integers"):
            invviz.window_mask(shape, window)  # type: ignore[arg-type]
    assert invviz.window_mask(shape, (np.int64(1), 0, 2, 2)).sum() == 24 * 2 * 2
    for cells in [0.5, (0, 1, 2), "1"]:
        with pytest.raises(ValueError, match="cell index or a range"):
            rep.receptive_field(cells, 0, 64, 64)
    assert rep.receptive_field(np.int64(2), (0, 2), 64, 64) == rep.receptive_field(2, (0, 2), 64, 64)


def _step(step: int, total: int) -> Step:
    return Step(step=step, total=total, terms={}, feature_error=[0.5], images=torch.zeros(1, 3, 2, 2), seconds=0.0)


def test_the_time_left_leaves_the_first_steps_set_up_out() -> None:
    """The first step of a run includes its set-up (model, target, kernels): not a step's cost."""
    left = TimeLeft(0.0)
    assert left(_step(1, 101), 5.0) is None  # a slow first step: no estimate yet
    assert left(_step(2, 101), 5.1) == pytest.approx(9.9)  # 99 steps at 0.1 s, not at (5.1 / 2) s
    assert left(_step(3, 101), 5.2) == pytest.approx(9.8)


# ---- command line ----


def test_outputs_may_not_overwrite_the_weights_file_or_features_input(tmp_path, png, capsys) -> None:
    weights = tmp_path / "w.pth"
    torch.save(invviz.representation("alexnet", layer="conv1", weights="random").state_dict(), weights)
    before = weights.read_bytes()
    code, _, err = run_cli(capsys, "invert", png, "--rep", "alexnet:conv1", "--weights", weights, "--iters", 1,
                           "--out", tmp_path / "o.png", "--metrics", weights)
    assert code == 2 and "--weights file" in err and weights.read_bytes() == before
    image = tmp_path / "img.npy"
    image.write_bytes(png.read_bytes())
    code, _, err = run_cli(capsys, "features", image, "--rep", "efficientnet_lite0:blocks.1", "--out", image)
    assert code == 2 and "input image" in err and image.read_bytes() == png.read_bytes()


def test_features_refuses_a_code_of_nan(tmp_path, png, capsys) -> None:
    from invviz.representations.efficientnet import imagenet_weights_path

    state = torch.load(imagenet_weights_path(), weights_only=True)
    name = next(key for key in state if key.endswith("running_var"))
    state[name] = -torch.ones_like(state[name])
    weights = tmp_path / "bad.pth"
    torch.save(state, weights)
    out = tmp_path / "f.npy"
    code, _, err = run_cli(capsys, "features", png, "--rep", "efficientnet_lite0:stem", "--weights", weights, "--out", out)
    assert code == 2 and "NaN" in err and not out.exists()


def test_the_demo_checks_its_outputs_and_iterations_first(tmp_path, capsys) -> None:
    (tmp_path / "demo.png").mkdir()
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path, "--iters", 2)
    assert code == 2 and "demo.png" in err and not any(p.suffix == ".png" for p in tmp_path.iterdir() if p.is_file())
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "d", "--iters", 10**11)
    assert code == 2 and "--iters must be at most" in err
    for argv in (["--out", ""], ["--out", tmp_path / "d", "--image", ""]):
        code, _, err = run_cli(capsys, "demo", *argv)
        assert code == 2 and "empty" in err and len(err.splitlines()) == 1


def test_empty_names_and_newlines_in_paths_get_one_clear_line(tmp_path, png, capsys) -> None:
    code, _, err = run_cli(capsys, "invert", "", "--rep", "hog", "--out", tmp_path / "o.png")
    assert code == 2 and "image path is empty" in err
    code, _, err = run_cli(capsys, "layers", "resnet18", "--weights", "")
    assert code == 2 and "empty" in err
    code, _, err = run_cli(capsys, "invert", tmp_path / "miss\ning.png", "--rep", "hog", "--out", tmp_path / "o.png")
    assert code == 2 and err.count("\n") == 1 and "miss\\ning.png" in err


def test_a_dangling_metrics_link_is_refused_before_any_work(tmp_path, png, capsys) -> None:
    link = tmp_path / "m.json"
    link.symlink_to(tmp_path / "missing" / "m.json")
    out = tmp_path / "o.png"
    code, _, err = run_cli(capsys, "invert", png, "--rep", "hog", "--iters", 1, "--out", out, "--metrics", link)
    assert code == 2 and "missing file" in err and not out.exists()


def test_images_used_as_they_are_are_capped_before_decoding(tmp_path, capsys) -> None:
    wide = tmp_path / "wide.png"
    Image.new("L", (5000, 40)).save(wide)
    for command, out in (("invert", "o.png"), ("features", "f.npy")):
        code, _, err = run_cli(capsys, command, wide, "--rep", "hog", "--out", tmp_path / out)
        assert code == 2 and "5000×40" in err and "--size" in err
    with pytest.raises(ValueError, match="5000×40"):
        invviz.load_image(wide, max_side=4096)
    assert invviz.load_image(wide, 32, max_side=4096).shape == (3, 32, 32)  # resized: no cap


def test_running_out_of_memory_is_one_line(monkeypatch, tmp_path, png, capsys) -> None:
    def too_big(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 51539607552 bytes")

    monkeypatch.setattr("invviz.cli.invert", too_big)
    code, _, err = run_cli(capsys, "invert", png, "--rep", "hog", "--iters", 1, "--out", tmp_path / "o.png")
    assert code == 2 and err.startswith("invviz: error: not enough memory") and len(err.splitlines()) == 1


def test_an_error_after_a_live_progress_bar_starts_its_own_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = ProgressBar("x")
    bar(_step(1, 3))
    from invviz.cli import _error_line

    _error_line("boom")
    err = capsys.readouterr().err
    assert "\ninvviz: error: boom\n" in err and not ProgressBar._open_line


def test_receptive_fields_leave_out_what_floor_mode_pooling_drops() -> None:
    """AlexNet at 67×83: pool1 drops conv1's trailing outputs, so the bottom/right cells never read
    the last two rows/columns of pixels; the box must equal the gradient's support there too."""
    from support import gradient_support

    rep = invviz.representation("alexnet", layer="conv2", weights="random")
    _, rows, cols = rep.code_shape(67, 83)
    for row, col in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols - 1), (rows - 1, 0), ((rows - 2, rows), (cols - 2, cols))]:
        assert rep.receptive_field(row, col, 67, 83) == gradient_support(rep, row, col, 67, 83), (row, col)
    assert rep.receptive_field(rows - 1, cols - 1, 67, 83).as_tuple()[2:] == (65, 81)


def test_restarts_without_start_noise_are_refused(rep, png, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="same image"):
        invviz.restarts(rep, torch.rand(3, 32, 32), 2, settings=invviz.Settings(iters=2, start_noise=0.0), device="cpu")
    code, _, err = run_cli(capsys, "invert", png, "--rep", "efficientnet_lite0:blocks.1", "--restarts", 2,
                           "--start-noise", 0, "--iters", 1, "--out", tmp_path / "o.png")
    assert code == 2 and "same image" in err
