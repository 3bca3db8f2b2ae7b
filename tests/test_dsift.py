"""Dense SIFT against VLFeat, plus gradients, receptive fields and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import gradient_support
from vlfeat import assert_matches, gray_255, requires_vlfeat, sample_images, vl_dsift

from invviz.representations.dsift import DenseSIFT, dsift_frames

IMAGES = sample_images()
GEOMETRIES = [(5, 5), (4, 3), (3, 7)]


@requires_vlfeat
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"bin{g[0]}-step{g[1]}")
@pytest.mark.parametrize("name", list(IMAGES))
def test_equals_vlfeat(geometry: tuple[int, int], name: str) -> None:
    bin_size, step = geometry
    image = IMAGES[name]
    code = DenseSIFT("features", bin_size=bin_size, step=step)(torch.from_numpy(image)[None])[0].numpy()
    assert_matches(code, vl_dsift(gray_255(image), bin_size, step))


def test_shape_and_batch() -> None:
    rep = DenseSIFT("features")
    images = torch.from_numpy(np.stack([IMAGES["random_67x93"], IMAGES["astronaut_131x150"][:, :67, :93]]))
    code = rep(images)
    assert code.shape == (2, 128, dsift_frames(67, 5, 5), dsift_frames(93, 5, 5)) == (2, 128, 11, 16)
    torch.testing.assert_close(code[1:], rep(images[1:]))
    # Unit descriptors with no entry above the clamp (up to the renormalization).
    torch.testing.assert_close(code.norm(dim=1), torch.ones(2, 11, 16))


def test_gradcheck() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(DenseSIFT("features").double(), (images,), fast_mode=True)


def test_gradient_finite_on_flat_and_natural_images() -> None:
    flat = torch.full((1, 3, 32, 32), 0.5)
    natural = torch.from_numpy(IMAGES["astronaut_131x150"])[None]
    for images in (flat, natural):
        images = images.clone().requires_grad_(True)
        DenseSIFT("features")(images).square().sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("geometry", [(5, 5), (3, 2)], ids=lambda g: f"bin{g[0]}-step{g[1]}")
def test_receptive_field_is_gradient_support(geometry: tuple[int, int]) -> None:
    bin_size, step = geometry
    rep = DenseSIFT("features", bin_size=bin_size, step=step)
    height, width = 9 * bin_size + 2, 10 * bin_size + 1
    rows, cols = dsift_frames(height, bin_size, step), dsift_frames(width, bin_size, step)
    for row, col in [(rows // 2, cols // 2), (2, cols - 3)]:
        box = rep.receptive_field(row, col, height, width)
        assert box == rep.receptive_field(row, col, height, width, clip=False)  # inside the image
        assert gradient_support(rep, row, col, height, width) == box
    for row, col in [(0, 0), (rows - 1, cols - 1)]:
        support = gradient_support(rep, row, col, height, width)
        box = rep.receptive_field(row, col, height, width)
        assert box.top <= support.top and box.left <= support.left
        assert box.bottom >= support.bottom and box.right >= support.right


def test_receptive_field_formula() -> None:
    rep = DenseSIFT("features", bin_size=5, step=4)
    # Bin centres at 4c + 5i (i = 0..3), triangular reach 4, one more pixel for the derivative.
    assert rep.receptive_field(2, 3, 100, 100, clip=False).as_tuple() == (8 - 5, 12 - 5, 8 + 21, 12 + 21)
    assert rep.stride(100, 100) == 4


@pytest.mark.parametrize("option", [{"bin_size": 0}, {"bin_size": -1}, {"step": 0}, {"step": 1.5}])
def test_bad_options(option: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(option))):
        DenseSIFT("features", **option)  # type: ignore[arg-type]


def test_image_smaller_than_a_window() -> None:
    with pytest.raises(ValueError, match=r"at least 16×16 pixels \(one SIFT window at bin_size=5\)"):
        DenseSIFT("features")(torch.rand(1, 3, 15, 40))


def test_step_larger_than_image() -> None:
    with pytest.raises(ValueError, match="step=40"):
        DenseSIFT("features", step=40)(torch.rand(1, 3, 32, 32))


def test_registered() -> None:
    from invviz.representations import representation

    rep = representation("dsift", bin_size=4, step=3)
    assert isinstance(rep, DenseSIFT) and (rep.bin_size, rep.step) == (4, 3)
    assert rep.grayscale and rep.native_size is None and rep.layers == ("features",)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    images = torch.from_numpy(IMAGES["coffee_256x256"])[None]
    rep = DenseSIFT("features")
    on_cpu = images.clone().requires_grad_(True)
    on_gpu = images.cuda().requires_grad_(True)
    code_cpu, code_gpu = rep(on_cpu), rep(on_gpu)
    assert code_gpu.device.type == "cuda"
    torch.testing.assert_close(code_gpu.cpu(), code_cpu, atol=1e-4 * 0.2, rtol=0)
    # A fixed random projection: the plain sum of squares of unit descriptors has no gradient.
    weights = torch.randn(code_cpu.shape, generator=torch.Generator().manual_seed(0))
    (code_cpu * weights).sum().backward()
    (code_gpu * weights.cuda()).sum().backward()
    assert on_cpu.grad is not None and on_gpu.grad is not None
    assert torch.linalg.norm(on_gpu.grad.cpu() - on_cpu.grad) <= 1e-3 * torch.linalg.norm(on_cpu.grad)
