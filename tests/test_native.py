"""The fused CPU kernels (``invviz/engine/_native.c``) against the torch formulation they replace."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from invviz import Settings, invert, representation, sample_image
from invviz.engine import _native
from invviz.engine.loop import ColourAdam, _Pyramid, colour_basis, default_objective, random_start
from invviz.engine.objectives import (
    MEAN_PIXEL,
    SQUARED_ERROR_FLOOR,
    TV_EPSILON,
    Context,
    Objective,
    PixelPrior,
    _FusedRelativeError,
    _RelativeError,
    _RevivingClamp,
    match,
)

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no C compiler to build the kernels")

SIZES = [(8, 8, 16, 16), (4, 5, 7, 9), (3, 3, 6, 5), (1, 1, 2, 1), (2, 1, 3, 2), (56, 56, 112, 112)]


def upsampled(coarse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[..., :height, :width]


@pytest.mark.parametrize(("h", "w", "height", "width"), SIZES)
def test_upsample_add_is_torch_bilinear_plus_the_finer_level(h, w, height, width) -> None:
    coarse, fine = torch.rand(2, 3, h, w), torch.rand(2, 3, height, width)
    expected = fine + upsampled(coarse, height, width)
    assert torch.allclose(_native.upsample_add(coarse, fine.clone()), expected, atol=1e-6)


@pytest.mark.parametrize(("h", "w", "height", "width"), SIZES)
def test_clamped_composition_moves_the_excess_into_the_finer_level(h, w, height, width) -> None:
    coarse, fine = torch.rand(2, 3, h, w), torch.rand(2, 3, height, width) * 3 - 1
    raw = fine + upsampled(coarse, height, width)
    corrected = fine.clone()
    image = _native.upsample_add(coarse, corrected, clamp=True)
    assert torch.allclose(image, raw.clamp(0, 1), atol=1e-6)
    assert image.min() >= 0 and image.max() <= 1
    # Afterwards the levels compose to exactly the returned image.
    assert torch.allclose(corrected + upsampled(coarse, height, width), image, atol=1e-6)


@pytest.mark.parametrize(("h", "w", "height", "width"), SIZES)
def test_upsample_adjoint_is_the_gradient_of_upsampling(h, w, height, width) -> None:
    coarse = torch.rand(2, 3, h, w, requires_grad=True)
    grad = torch.randn(2, 3, height, width)
    (upsampled(coarse, height, width) * grad).sum().backward()
    assert torch.allclose(_native.upsample_adjoint(grad, (h, w)), coarse.grad, atol=1e-5)


@pytest.mark.parametrize("beta", [2.0, 1.0, 1.5])
@pytest.mark.parametrize("alpha", [6.0, 2.0, 2.5])
@pytest.mark.parametrize("size", [(5, 7), (2, 3), (32, 32), (1, 6), (4, 1)])
@pytest.mark.parametrize("chroma", [0.0, 3.0])
def test_fused_priors_equal_the_torch_priors(beta, alpha, size, chroma) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, *size, requires_grad=True)
    tv_prior, alpha_prior = PixelPrior("tv", beta, chroma), PixelPrior("alpha", alpha)
    tv_weight, alpha_weight = 0.3, 0.7
    context = Context(images)
    tv_expected, alpha_expected = tv_weight * tv_prior(context), alpha_weight * alpha_prior(context)
    (tv_expected + alpha_expected).sum().backward()

    left = torch.randn_like(images) * 1e-3  # the kernel adds to what the data term left there
    grad = left.clone()
    tv_values, alpha_values = _native.priors(
        images.detach(), grad, tv_weight * tv_prior.scale, beta, TV_EPSILON,
        alpha_weight * alpha_prior.scale, alpha, MEAN_PIXEL, chroma,
    )
    assert torch.allclose((tv_values * tv_weight * tv_prior.scale).float(), tv_expected.detach(), rtol=1e-5)
    assert torch.allclose((alpha_values * alpha_weight * alpha_prior.scale).float(), alpha_expected.detach(), rtol=1e-5)
    assert torch.allclose(grad - left, images.grad, rtol=1e-4, atol=1e-5 * images.grad.abs().max().item())


def test_a_zero_weight_skips_that_prior() -> None:
    images, grad = torch.rand(1, 3, 9, 9), torch.zeros(1, 3, 9, 9)
    tv_values, alpha_values = _native.priors(images, grad, 0.0, 2.0, 0.0, 1.0, 6.0, MEAN_PIXEL)
    assert tv_values.item() == 0.0 and alpha_values.item() > 0.0


def test_adam_is_torch_adam() -> None:
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(3, 50, generator=generator)
    reference = param.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=0.1)
    first, second = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, 30):
        grad = torch.randn(3, 50, generator=generator) * 10.0 ** -(step % 4)
        lr = 0.1 / step
        optimizer.param_groups[0]["lr"] = lr
        reference.grad = grad.clone()
        optimizer.step()
        _native.adam(param, grad, first, second, lr, (0.9, 0.999), 1e-8, step)
    assert torch.allclose(param, reference.detach(), atol=1e-6)


def test_the_opponent_basis_is_grey_and_two_orthogonal_colour_axes() -> None:
    basis = colour_basis(Settings(colour_basis="opponent", chroma_rate=1.0), 3)
    assert basis is not None
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-6)  # orthonormal at rate 1
    assert torch.allclose(basis[:, 0], torch.full((3,), 3**-0.5))  # the grey axis
    assert torch.allclose(basis[:, 1:].sum(0), torch.zeros(2), atol=1e-6)  # colour axes carry no grey
    scaled = colour_basis(Settings(colour_basis="opponent", chroma_rate=0.25), 3)
    assert scaled is not None and torch.allclose(scaled[:, 1:], basis[:, 1:] * 0.25)
    opponent = Settings(colour_basis="opponent")
    for settings, channels in ((Settings(colour_basis="rgb"), 3), (replace(opponent, optimizer="paper"), 3), (opponent, 1)):
        assert colour_basis(settings, channels) is None
    grey = colour_basis(Settings(grey=True, colour_basis="rgb"), 3)  # grey: the grey axis alone, whatever the basis
    assert grey is not None and torch.equal(grey, torch.tensor([[1.0, 0.0, 0.0]] * 3))
    assert colour_basis(Settings(grey=True, optimizer="paper"), 3) is None


def test_colour_adam_with_the_identity_basis_is_torch_adam() -> None:
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(2, 3, 5, 4, generator=generator)
    reference, ours = param.clone().requires_grad_(True), param.clone().requires_grad_(True)
    optimizers = torch.optim.Adam([reference], lr=0.1), ColourAdam([ours], torch.eye(3), lr=0.1)
    for step in range(1, 20):
        grad = torch.randn(param.shape, generator=generator) * 10.0 ** -(step % 4)
        for tensor, optimizer in zip((reference, ours), optimizers):
            optimizer.param_groups[0]["lr"] = 0.1 / step
            tensor.grad = grad.clone()
            optimizer.step()
    assert torch.allclose(ours.detach(), reference.detach(), atol=1e-6)


@pytest.mark.parametrize("basis", ["rgb", "opponent", "grey"])
def test_a_native_step_equals_the_torch_step(basis) -> None:
    """Same start, same objective: the native pyramid, priors, level gradients and Adam (per
    channel, in the opponent colour basis, or along the grey axis alone) give the torch path's
    image, gradients and updated levels."""
    rep = representation("efficientnet_lite0:blocks.1")
    photo = sample_image("chelsea", 40)
    settings = Settings(iters=3, tv_chroma=2.0).resolved(rep)  # the colour-weighted TV, too
    with torch.no_grad():
        target = rep(photo[None])
    objective = default_objective(rep, target, None, settings, (40, 40))
    start = random_start(1, 3, 40, 40, seed=0) * 1.6 - 0.3  # some pixels outside [0, 1] to clamp
    lr = 0.03
    tv, alpha = objective.terms[1], objective.terms[2]
    torch_priors: list[float] = []  # the torch path's TV and α values, unweighted
    results = []
    grey = basis == "grey"
    colours = colour_basis(replace(settings, colour_basis="opponent" if grey else basis, grey=grey), 3)
    for native in (False, True):
        pyramid = _Pyramid(start, 3, native, colours)
        with torch.no_grad():
            for level in pyramid.levels[1:]:
                level.copy_(torch.randn(level.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        image = pyramid.image()
        if native:
            image.requires_grad_(True)
        terms = objective.evaluate(Context(image))
        if native:
            del terms["tv"], terms["alpha"]
        torch.stack(list(terms.values())).sum().backward()
        if native:
            assert pyramid.fused is not None
            values = pyramid.fused.update(
                image.detach(), image.grad, lr,
                (tv[1] * tv[2].scale, 2.0, tv[2].chroma, TV_EPSILON, alpha[1] * alpha[2].scale, 6.0),
            )
            assert [v[0] for v in values] == pytest.approx(torch_priors, rel=1e-5)
            grads = [image.grad, *pyramid.fused.grads[1:]]
        else:
            torch_priors = [terms[name].item() / weight / fn.scale for name, weight, fn in (tv, alpha)]
            grads = [level.grad.clone() for level in pyramid.levels]
            (torch.optim.Adam(pyramid.levels, lr=lr) if colours is None else ColourAdam(pyramid.levels, colours, lr)).step()
        # The next step's image (natively composed by ``update`` already) and the clamped levels.
        following = pyramid.image().detach().clone()
        results.append((image.detach().clone(), grads, [level.detach().clone() for level in pyramid.levels], following))
    (torch_image, torch_grads, torch_levels, torch_next), (native_image, native_grads, native_levels, native_next) = results
    assert torch.allclose(native_image, torch_image, atol=1e-6)
    assert torch.allclose(native_next, torch_next, atol=lr * 1e-3)
    for expected, got in zip(torch_grads, native_grads):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # Adam's first step is ±lr wherever |grad| ≫ its ε, but near ε it amplifies float rounding of
    # the gradient: a tenth of a percent of the rate separates rounding from a wrong update.
    for expected, got in zip(torch_levels, native_levels):
        assert torch.allclose(got, expected, atol=lr * 1e-3)


def test_kernels_give_the_same_bits_on_one_thread_and_on_several(monkeypatch) -> None:
    """The row split changes nothing: one thread and two give identical images, gradients and values."""
    start = random_start(2, 3, 67, 50, seed=3) * 1.6 - 0.3
    outcomes = []
    for threaded in (False, True):
        monkeypatch.setattr(_native, "threads", lambda threaded=threaded: 2 if threaded else 1)
        pyramid = _Pyramid(start, 4, native=True, basis=colour_basis(Settings(colour_basis="opponent"), 3))
        assert pyramid.fused is not None
        with torch.no_grad():
            for index, level in enumerate(pyramid.levels[1:]):
                level.copy_(torch.randn(level.shape, generator=torch.Generator().manual_seed(index)) * 0.1)
        image = pyramid.image()
        grad = torch.randn(image.shape, generator=torch.Generator().manual_seed(9))
        values = pyramid.fused.update(image, grad, 0.03, (0.5, 1.0, 3.0, 1e-6, 0.2, 6.0))
        following = pyramid.image()  # composed by the update
        outcomes.append([image, grad, following, *map(torch.tensor, values), *[level.clone() for level in pyramid.levels], *pyramid.fused.grads[1:]])
    for single, several in zip(*outcomes):
        assert torch.equal(single, several)


@pytest.mark.parametrize("spec", ["efficientnet_lite0:blocks.1", "hog"])
def test_both_paths_reconstruct_equally_well(spec, monkeypatch) -> None:
    """Over many steps the two paths drift apart as any two float orders do (inversion is chaotic:
    a 1e-6 change of the start does the same), so compare what matters: the error reached."""
    rep = representation(spec)
    photo = sample_image("chelsea", 48)
    errors = {}
    for native in ("1", "0"):
        monkeypatch.setenv("INVVIZ_NATIVE", native)
        monkeypatch.setattr(_native, "_loaded", {})
        errors[native] = invert(rep, photo, settings=Settings(iters=60), device="cpu").feature_error[0]
    assert errors["1"] < 0.35 and errors["0"] < 0.35
    assert errors["1"] == pytest.approx(errors["0"], rel=0.25)


def test_without_a_compiler_the_engine_falls_back_to_torch(monkeypatch) -> None:
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    assert _native.library() is None
    assert not _native.usable(torch.zeros(1))
    result = invert(representation("tiny:conv2"), sample_image("chelsea", 16), settings=Settings(iters=5), device="cpu")
    assert len(result.history["feature"]) == 5
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setenv("INVVIZ_NATIVE", "0")
    assert _native.library() is None


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
@pytest.mark.parametrize(("batch", "target_batch", "shape"), [(1, 1, (40, 28, 28)), (3, 1, (5, 90000)), (3, 3, (1000,))])
def test_fused_data_term_equals_the_torch_formulation(power, batch, target_batch, shape) -> None:
    """The data term's kernels (unmasked CPU float32) give the torch formulation's values and
    gradients, shared or per-image targets, codes spanning several of their fixed sum chunks."""
    generator = torch.Generator().manual_seed(4)
    code = torch.randn(batch, *shape, generator=generator)
    target = torch.randn(target_batch, *shape, generator=generator)
    norm = torch.linalg.vecdot(target.flatten(1), target.flatten(1))
    term = _native.DataTerm(batch, code[0].numel(), target, norm, power, SQUARED_ERROR_FLOOR)
    results = []
    for fused in (True, False):
        leaf = code.clone().requires_grad_(True)
        if fused:
            value = _FusedRelativeError.apply(leaf, term)
        else:
            value = _RelativeError.apply(leaf, target, None, norm, power)
        (value * torch.arange(1.0, batch + 1)).sum().backward()
        results.append((value.detach(), leaf.grad))
    (fused_value, fused_grad), (torch_value, torch_grad) = results
    assert torch.allclose(fused_value, torch_value, rtol=1e-5)
    assert torch.allclose(fused_grad, torch_grad, rtol=1e-4, atol=1e-6 * torch_grad.abs().max().item())


def test_fused_data_term_at_an_exact_match_has_the_floor_and_no_gradient() -> None:
    code = torch.randn(2, 7, 9)
    norm = torch.linalg.vecdot(code.flatten(1), code.flatten(1))
    value, slope = _native.DataTerm(2, 63, code.clone(), norm, 1.0, SQUARED_ERROR_FLOOR).value(code)
    assert value.tolist() == pytest.approx([SQUARED_ERROR_FLOOR**0.5] * 2)
    assert slope.tolist() == [0.0, 0.0]


def test_fused_data_term_does_not_depend_on_the_thread_count(monkeypatch) -> None:
    code, target = torch.randn(2, 300000), torch.randn(1, 300000)
    norm = torch.linalg.vecdot(target, target)
    term = _native.DataTerm(2, 300000, target, norm, 1.0, SQUARED_ERROR_FLOOR)
    outcomes = []
    for count in (1, 2):
        monkeypatch.setattr(_native, "threads", lambda count=count: count)
        value, slope = term.value(code)
        outcomes.append((value, slope, term.gradient(code, slope)))
    for single, several in zip(*outcomes):
        assert torch.equal(single, several)


def test_the_engine_takes_the_fused_data_term_for_plain_cpu_codes() -> None:
    rep = representation("efficientnet_lite0:blocks.1")
    photo = sample_image("chelsea", 32)
    with torch.no_grad():
        target = rep(photo[None])
    plain = match(rep, target, power=1.0).terms[0][2]
    masked = match(rep, target, torch.ones(target.shape[1:], dtype=torch.bool), power=1.0).terms[0][2]
    image = photo[None].clone().requires_grad_(True)
    assert type(plain(Context(image)).grad_fn).__name__.startswith("_FusedRelativeError")
    assert type(masked(Context(image)).grad_fn).__name__.startswith("_RelativeError")


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize(("low", "high"), [(0.0, 6.0), (0.0, float("inf"))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_rectified_data_term_equals_the_reviving_clamp(power, low, high, channels_last) -> None:
    """With a rectifier the kernels take the code before its clamp: values and the reviving
    gradient are those of ``_RevivingClamp`` then the torch data term, for codes in either layout."""
    generator = torch.Generator().manual_seed(5)
    pre = torch.randn(2, 6, 11, 13, generator=generator) * 4 + 2  # entries on both sides of both bounds
    target = (torch.randn(1, 6, 11, 13, generator=generator) * 4 + 2).clamp(low, high)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    pre, target = pre.contiguous(memory_format=layout), target.contiguous(memory_format=layout)
    norm = torch.linalg.vecdot(target.flatten(1), target.flatten(1))
    term = _native.DataTerm(2, pre[0].numel(), target, norm, power, SQUARED_ERROR_FLOOR, (low, high, 0.7))
    results = []
    for fused in (True, False):
        leaf = pre.clone().requires_grad_(True)
        if fused:
            value = _FusedRelativeError.apply(leaf, term)
        else:
            value = _RelativeError.apply(_RevivingClamp.apply(leaf, low, high, 0.7), target, None, norm, power)
        (value * torch.tensor([1.0, 2.0])).sum().backward()
        results.append((value.detach(), leaf.grad))
    (fused_value, fused_grad), (torch_value, torch_grad) = results
    assert torch.allclose(fused_value, torch_value, rtol=1e-5)
    assert torch.allclose(fused_grad, torch_grad, rtol=1e-4, atol=1e-6 * torch_grad.abs().max().item())
    # Some clamped entries pass a share of the gradient, some pass none.
    clamped = (pre <= low) | (pre >= high)
    assert (fused_grad[clamped] != 0).any() and (fused_grad[clamped] == 0).any()


@pytest.mark.parametrize(
    ("spec", "size"),
    [("efficientnet_lite0:blocks.1", (40, 40)), ("efficientnet_lite0:stem", (33, 26)), ("alexnet:relu2", (67, 70))],
)
def test_a_step_through_the_prepared_input_equals_one_through_the_image(spec, size) -> None:
    """With an attached input (``Levels.attach_input``) the kernels write the network's input as
    the representation prepares it and take its gradient back: the same image, priors, gradients
    and next levels as a step fed the image's own gradient (channels-last with padding for Lite0,
    per-channel scales without padding for AlexNet)."""
    torch.manual_seed(0)
    rep = representation(spec, weights="random") if spec.startswith("alexnet") else representation(spec)
    layout = rep.input_layout(*size)
    start = random_start(2, 3, *size, seed=0) * 1.6 - 0.3
    outcomes = []
    for attached in (False, True):
        pyramid = _Pyramid(start, 3, native=True)
        assert pyramid.fused is not None
        with torch.no_grad():
            for index, level in enumerate(pyramid.levels[1:]):
                level.copy_(torch.randn(level.shape, generator=torch.Generator().manual_seed(index)) * 0.1)
        prepared = pyramid.fused.attach_input(layout) if attached else None
        image = pyramid.image()
        leaf = image.clone().requires_grad_(True)
        network_input = layout.prepare(leaf) if prepared is None else prepared
        if prepared is not None:
            assert torch.allclose(prepared.detach(), layout.prepare(image), rtol=1e-6, atol=1e-6)
        code = rep.forward_prepared(network_input)
        source = leaf if prepared is None else prepared
        (grad,) = torch.autograd.grad((code * torch.linspace(-1, 1, code.numel()).view(code.shape)).sum(), source)
        values = pyramid.fused.update(image, grad.contiguous() if prepared is None else grad, 0.03, (0.5, 2.0, 2.0, 1e-6, 0.2, 6.0))
        following = pyramid.image()
        if prepared is not None:
            assert torch.allclose(prepared.detach(), layout.prepare(following), rtol=1e-6, atol=1e-6)
        outcomes.append([image, following, *map(torch.tensor, values), *[level.clone() for level in pyramid.levels]])
    for plain, through_input in zip(*outcomes):
        assert torch.allclose(plain, through_input, rtol=1e-5, atol=1e-6)


def test_the_engine_prepares_the_network_input_only_where_the_image_reaches_it_unshifted() -> None:
    """Default CPU inversions of RGB representations write the prepared input; jittered ones,
    objectives with terms of their own and one-channel representations use the image."""
    rep = representation("efficientnet_lite0:blocks.1")
    photo = sample_image("chelsea", 32)
    with torch.no_grad():
        target = rep(photo[None])
    brightness = Objective((("bright", 0.1, lambda ctx: ctx.images.mean(dim=(1, 2, 3))),))
    seen: list[str] = []
    original = _native.Levels.attach_input

    def spy(self, layout):  # type: ignore[no-untyped-def]
        seen.append(case)
        return original(self, layout)

    runs = {
        "default": lambda: invert(rep, photo, settings=Settings(iters=20), device="cpu"),
        "jitter": lambda: invert(rep, photo, settings=Settings(iters=5, jitter=2), device="cpu"),
        "own term": lambda: invert(rep, photo, objective=match(rep, target) + brightness, settings=Settings(iters=5), device="cpu"),
        "hog": lambda: invert(representation("hog"), photo, settings=Settings(iters=5), device="cpu"),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_native.Levels, "attach_input", spy)
        results = {}
        for case, run in runs.items():
            results[case] = run()
    assert seen == ["default"]
    assert results["default"].feature_error[0] < 0.5
    assert len(results["own term"].history["bright"]) == 5
