"""HOG and HOGb against VLFeat, plus gradients, receptive fields, errors and glyph rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import gradient_support
from vlfeat import assert_matches, gray_255, requires_vlfeat, sample_images, vl_hog, vl_hog_render

from invviz.representations.hog import HOG, HOGb, hog_cells, render_hog

IMAGES = sample_images()
VARIANTS = [(HOG, 8), (HOGb, 8), (HOG, 5), (HOGb, 6)]


def _id(variant: tuple[type[HOG], int]) -> str:
    return f"{variant[0].model}-cell{variant[1]}"


@requires_vlfeat
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("name", list(IMAGES))
def test_equals_vlfeat(variant: tuple[type[HOG], int], name: str) -> None:
    cls, cell_size = variant
    image = IMAGES[name]
    code = cls("features", cell_size=cell_size)(torch.from_numpy(image)[None])[0].numpy()
    reference = vl_hog(gray_255(image), cell_size, bilinear=cls.bilinear)
    assert_matches(code, reference)


def test_shape_and_batch() -> None:
    rep = HOGb("features")
    images = torch.from_numpy(np.stack([IMAGES["random_67x93"], IMAGES["astronaut_131x150"][:, :67, :93]]))
    code = rep(images)
    assert code.shape == (2, 31, hog_cells(67, 8), hog_cells(93, 8)) == (2, 31, 8, 12)
    torch.testing.assert_close(code[1:], rep(images[1:]))


@pytest.mark.parametrize("cls", [HOG, HOGb])
def test_gradcheck(cls: type[HOG]) -> None:
    """With the true gradient at the 0.2 truncation (``truncation_slope=0``)."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cls("features", truncation_slope=0).double(), (images,), fast_mode=True)


@pytest.mark.parametrize("cls", [HOG, HOGb])
def test_truncated_bins_get_a_gradient_only_toward_coming_back_down(cls: type[HOG]) -> None:
    """The default truncation slope leaves the values alone; it adds gradient only where a descent
    step would lower a truncated bin (a loss that lowers every bin), none where it would raise one."""
    images = torch.from_numpy(IMAGES["astronaut_131x150"])[None]
    true, reviving = cls("features", truncation_slope=0), cls("features")
    assert reviving.truncation_slope > 0
    assert torch.equal(true(images), reviving(images))
    grads = {}
    for sign in (1.0, -1.0):
        for name, rep in (("true", true), ("reviving", reviving)):
            leaf = images.clone().requires_grad_(True)
            (sign * rep(leaf)).sum().backward()
            grads[name, sign] = leaf.grad
    assert not torch.allclose(grads["true", 1.0], grads["reviving", 1.0])
    assert torch.allclose(grads["true", -1.0], grads["reviving", -1.0])


def test_truncation_slope_must_be_between_0_and_1() -> None:
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="truncation_slope"):
            HOG("features", truncation_slope=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [HOG, HOGb])
def test_gradient_finite_on_flat_and_natural_images(cls: type[HOG]) -> None:
    flat = torch.full((1, 3, 32, 32), 0.5)
    natural = torch.from_numpy(IMAGES["astronaut_131x150"])[None]
    for images in (flat, natural):
        images = images.clone().requires_grad_(True)
        cls("features")(images).square().sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("variant", [(HOG, 8), (HOGb, 5)], ids=_id)
def test_receptive_field_is_gradient_support(variant: tuple[type[HOG], int]) -> None:
    cls, cell_size = variant
    rep = cls("features", cell_size=cell_size)
    height, width = 7 * cell_size + 3, 8 * cell_size - 2
    rows, cols = hog_cells(height, cell_size), hog_cells(width, cell_size)
    for row, col in [(3, 4), (2, cols - 3)]:
        box = rep.receptive_field(row, col, height, width)
        assert box == rep.receptive_field(row, col, height, width, clip=False)  # inside the image
        assert gradient_support(rep, row, col, height, width) == box
    for row, col in [(0, 0), (rows - 1, cols - 1), (0, cols - 1)]:
        support = gradient_support(rep, row, col, height, width)
        box = rep.receptive_field(row, col, height, width)
        assert box.top <= support.top and box.left <= support.left
        assert box.bottom >= support.bottom and box.right >= support.right


def test_receptive_field_formula() -> None:
    rep = HOG("features", cell_size=8)
    # Cell c pools pixels [8c - 4, 8c + 12) plus one for the central difference, then one cell more
    # on each side for block normalization.
    box = rep.receptive_field(4, 5, 100, 100, clip=False)
    assert box.as_tuple() == (8 * 4 - 13, 8 * 5 - 13, 8 * 4 + 21, 8 * 5 + 21)
    assert rep.stride(100, 100) == 8
    # 70 = 8 * 8 + 6 rounds up to 9 rows; 67 rounds down to 8.
    rep.receptive_field(8, 0, 70, 70)
    with pytest.raises(ValueError, match="row 8:9"):
        rep.receptive_field(8, 0, 67, 67)


@pytest.mark.parametrize("cell_size", [0, -3, 2.5, True])
def test_bad_cell_size(cell_size: object) -> None:
    with pytest.raises(ValueError, match="cell_size"):
        HOG("features", cell_size=cell_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(7, 30), (30, 5)])
def test_image_smaller_than_a_cell(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"at least 8×8 pixels \(one cell at cell_size=8\)"):
        HOGb("features")(torch.rand(1, 3, *size))


def test_registered() -> None:
    from invviz.representations import representation

    rep = representation("hogb", cell_size=4)
    assert isinstance(rep, HOGb) and rep.cell_size == 4 and rep.spec == "hogb:features"
    assert rep.grayscale and rep.native_size is None
    assert type(representation("hog")) is HOG


@requires_vlfeat
def test_render_equals_vl_hog_render() -> None:
    image = IMAGES["chelsea_256x256"][:, :96, :128]
    code = HOG("features")(torch.from_numpy(image)[None])
    picture = render_hog(code[0])
    assert picture.shape == (12 * 21, 16 * 21) and picture.dtype == np.float32
    reference = vl_hog_render(code[0].numpy())
    np.testing.assert_allclose(picture, reference, atol=1e-6 * np.abs(reference).max())
    assert render_hog(code).shape == (1, *picture.shape)


def test_render_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match="31"):
        render_hog(torch.zeros(27, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [HOG, HOGb])
def test_cuda_matches_cpu(cls: type[HOG]) -> None:
    images = torch.from_numpy(IMAGES["coffee_256x256"])[None]
    rep = cls("features")
    on_cpu = images.clone().requires_grad_(True)
    on_gpu = images.cuda().requires_grad_(True)
    code_cpu, code_gpu = rep(on_cpu), rep(on_gpu)
    assert code_gpu.device.type == "cuda"
    torch.testing.assert_close(code_gpu.cpu(), code_cpu, atol=1e-4 * 0.4, rtol=0)
    # A fixed random projection: the plain sum of squares of unit descriptors has no gradient.
    weights = torch.randn(code_cpu.shape, generator=torch.Generator().manual_seed(0))
    (code_cpu * weights).sum().backward()
    (code_gpu * weights.cuda()).sum().backward()
    assert on_cpu.grad is not None and on_gpu.grad is not None
    assert torch.linalg.norm(on_gpu.grad.cpu() - on_cpu.grad) <= 1e-3 * torch.linalg.norm(on_cpu.grad)
