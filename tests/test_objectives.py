import math

import pytest
import torch
from tiny import TinyNet

from invviz import Context, alpha_norm, feature_error_squared, match, representation, tv
from invviz.engine.objectives import PIXEL_SCALE, VARIATION_SCALE


def images(seed: int = 0, shape: tuple[int, ...] = (2, 3, 6, 7)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("beta", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("chroma", [0.0, 3.0])
def test_tv_gradcheck(beta: float, chroma: float) -> None:
    x = images().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: tv(beta, chroma)(Context(t)), (x,))


@pytest.mark.parametrize("alpha", [2.0, 6.0])
def test_alpha_norm_gradcheck(alpha: float) -> None:
    x = images().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: alpha_norm(alpha)(Context(t)), (x,))


def test_match_gradcheck_through_a_network() -> None:
    rep = representation("tiny:conv2").double()
    target = rep(images(1))
    mask = torch.zeros(6, 2, 3, dtype=torch.bool)
    mask[:3, 1] = True
    x = images(2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: match(rep, target, mask)(Context(t)), (x,))


@pytest.mark.parametrize("power", [1.0, 1.5])
def test_match_power_is_the_relative_error_to_that_power(power: float) -> None:
    rep = representation("tiny:conv2").double()
    target = rep(images(1))
    x = images(2).requires_grad_(True)
    squared = match(rep, target)(Context(x))
    assert torch.allclose(match(rep, target, power=power)(Context(x)), squared ** (power / 2))
    assert torch.autograd.gradcheck(lambda t: match(rep, target, power=power)(Context(t)), (x,))
    for bad in (0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="feature power"):
            match(rep, target, power=bad)


def test_rectifier_slope_keeps_the_value_and_wakes_switched_off_units() -> None:
    rep = representation("tiny:relu1").double()
    target = rep(images(4))
    x = images(3).requires_grad_(True)
    exact, surrogate = match(rep, target), match(rep, target, rectifier_slope=0.5)
    assert torch.equal(exact(Context(x)), surrogate(Context(x)))
    # By hand: d/dcode of ‖code − target‖² / ‖target‖², let through the clamp where the unit is on,
    # and at half strength where it is off but the descent direction would switch it on.
    pre, low, high = rep.pre_rectifier(x)
    code = pre.clamp(low, high)
    grad = 2 * (code - target) / target.flatten(1).pow(2).sum(1).view(-1, 1, 1, 1)
    on = (pre > low) & (pre < high)
    waking = (pre <= low) & (grad < 0)
    assert waking.any() and (~on & ~waking).any()
    expected = torch.autograd.grad(pre, x, grad * (on + 0.5 * waking))[0]
    assert torch.allclose(torch.autograd.grad(surrogate(Context(x)).sum(), x)[0], expected)
    assert not torch.allclose(torch.autograd.grad(exact(Context(x)).sum(), x)[0], expected)
    with pytest.raises(ValueError, match="rectifier_slope"):
        match(rep, target, rectifier_slope=2.0)


def test_rectifier_slope_changes_nothing_without_a_final_clamp() -> None:
    rep = representation("tiny:conv2").double()
    target = rep(images(4))
    x = images(3).requires_grad_(True)
    exact = torch.autograd.grad(match(rep, target)(Context(x)).sum(), x)[0]
    assert torch.equal(torch.autograd.grad(match(rep, target, rectifier_slope=0.5)(Context(x)).sum(), x)[0], exact)


def test_tv_value_by_hand() -> None:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    x[0, :, 0, 1] = 0.3  # one pixel differs from its left neighbour in every channel
    # only the top-left pixel has both a right and a lower neighbour: Δx = 0.3 per channel, Δy = 0
    expected = 3 * 0.3**2 / VARIATION_SCALE**2
    assert tv(2.0)(Context(x)).item() == pytest.approx(expected)
    assert tv(1.0)(Context(x)).item() == pytest.approx(math.sqrt(3 * 0.3**2 + 1e-8) / VARIATION_SCALE)


def test_chroma_weighs_colour_variation_and_leaves_brightness_alone() -> None:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 1] = 0.3  # only the red channel differs: Δ = (0.3, 0, 0), a brightness step of 0.1
    # Stretched about the channel mean 0.1: (0.1 + 0.2 s, 0.1 − 0.1 s, 0.1 − 0.1 s), s² = 1 + chroma.
    for chroma in (0.0, 3.0):
        expected = (0.03 + 0.06 * (1 + chroma)) / VARIATION_SCALE**2
        assert tv(2.0, chroma)(Context(x)).item() == pytest.approx(expected)
    grey = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    grey[0, :, 0, 1] = 0.3
    assert tv(2.0, 3.0)(Context(grey)).item() == pytest.approx(tv(2.0)(Context(grey)).item())
    one_channel = torch.rand(1, 1, 4, 5, dtype=torch.float64)
    assert tv(1.0, 3.0)(Context(one_channel)).item() == pytest.approx(tv(1.0)(Context(one_channel)).item())
    with pytest.raises(ValueError, match="chroma"):
        tv(2.0, -1.0)


@pytest.mark.parametrize("beta", [2.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1)])
def test_tv_of_a_single_row_or_column_is_zero(beta: float, shape: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    value = tv(beta)(Context(x))
    value.sum().backward()
    assert value.tolist() == [0.0, 0.0]
    assert x.grad is not None and not x.grad.any()


def test_alpha_norm_value_by_hand() -> None:
    x = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    x[0, 0, 0, 1] += PIXEL_SCALE  # one of two pixels is one typical magnitude from the mean
    assert alpha_norm(6.0)(Context(x)).item() == pytest.approx(0.5, rel=1e-6)


def test_feature_error_uses_only_masked_entries() -> None:
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    code = torch.tensor([[1.0, 0.0, 3.0, 0.0]])
    mask = torch.tensor([True, False, True, True])
    # selected: (1,3,4) vs (1,3,0): squared distance 16, squared norm 1+9+16 = 26
    assert feature_error_squared(code, target, mask).item() == pytest.approx(16 / 26)
    assert feature_error_squared(code, target).item() == pytest.approx(20 / 30)


def test_empty_mask_is_rejected() -> None:
    rep = TinyNet("conv1")
    with pytest.raises(ValueError, match="selects no"):
        match(rep, torch.zeros(4, 4, 4), torch.zeros(4, 4, 4, dtype=torch.bool))


def test_objectives_compose_with_plus_and_times() -> None:
    rep = representation("tiny:relu1").double()
    x = images(3)
    target = rep(images(4))
    objective = match(rep, target) + 0.5 * tv(2) + alpha_norm(6) * 2
    assert objective.names == ["feature", "tv", "alpha"]
    terms = objective.evaluate(Context(x))
    assert terms["tv"] == pytest.approx(0.5 * tv(2)(Context(x)))
    assert terms["alpha"] == pytest.approx(2 * alpha_norm(6)(Context(x)))
    total = objective(Context(x))
    assert total == pytest.approx(terms["feature"] + terms["tv"] + terms["alpha"])
    with pytest.raises(ValueError, match="distinct"):
        _ = tv(2) + tv(1)
    assert (tv(2) + tv(1).named("tv1")).names == ["tv", "tv1"]


def test_code_is_computed_once_per_step() -> None:
    calls = []
    rep = representation("tiny:conv1")
    rep.register_forward_hook(lambda *_: calls.append(1))
    target = torch.zeros(1, 4, 6, 7)
    (match(rep, target) + match(rep, target + 1).named("other"))(Context(images(5).float()))
    assert len(calls) == 1


@pytest.mark.parametrize("make", [lambda: tv(0), lambda: tv(-1), lambda: alpha_norm(0)])
def test_bad_exponents(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()
