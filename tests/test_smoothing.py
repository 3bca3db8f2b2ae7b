"""The inner rectifiers' smoothed gradient (``Settings.rectifier_smoothing``)."""

import threading

import pytest
import torch
import torch.nn.functional as F

from invviz import Settings, invert, representation
from invviz.engine import _native
from invviz.engine import loop as engine_loop
from invviz.representations._surrogates import (
    SmoothedReLU6,
    rectifier_smoothing,
    smooth_relu6,
    smoothed_relu6_weight,
)


def rounded_relu6(x: torch.Tensor, width: float) -> torch.Tensor:
    """ReLU6 with each corner replaced by the parabola that joins its two lines ``width`` either side."""
    low = (x + width) ** 2 / (4 * width)
    high = 6 - (6 + width - x) ** 2 / (4 * width)
    return torch.where(
        x <= -width, torch.zeros_like(x),
        torch.where(x < width, low,
                    torch.where(x <= 6 - width, x, torch.where(x < 6 + width, high, torch.full_like(x, 6.0)))))


@pytest.mark.parametrize("width", [0.25, 1.0, 3.0])
def test_the_gradient_is_the_rounded_rectifiers_and_the_values_relu6s(width: float) -> None:
    x = torch.linspace(-5, 11, 4001, dtype=torch.float64).requires_grad_(True)
    expected = torch.autograd.grad(rounded_relu6(x, width).sum(), x)[0]
    with rectifier_smoothing(width):
        y = smooth_relu6(x)
    assert torch.equal(y, F.relu6(x))
    (got,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert got.min() == 0 and got.max() == 1 and ((got > 0) & (got < 1)).any()


def test_outside_the_context_and_in_other_threads_the_gradient_is_relu6s() -> None:
    x = torch.linspace(-2, 8, 101).requires_grad_(True)
    exact = torch.autograd.grad(F.relu6(x).sum(), x)[0]
    assert torch.equal(torch.autograd.grad(smooth_relu6(x).sum(), x)[0], exact)
    seen = {}

    def other() -> None:
        seen["grad"] = torch.autograd.grad(smooth_relu6(x).sum(), x)[0]

    with rectifier_smoothing(1.0):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert not torch.equal(torch.autograd.grad(smooth_relu6(x).sum(), x)[0], exact)
        with rectifier_smoothing(0.0):  # nested: 0 is the true gradient again
            assert torch.equal(torch.autograd.grad(smooth_relu6(x).sum(), x)[0], exact)
    assert torch.equal(seen["grad"], exact)
    assert torch.equal(torch.autograd.grad(smooth_relu6(x).sum(), x)[0], exact)


@pytest.mark.parametrize("bad", [-0.1, 3.5, float("nan")])
def test_widths_out_of_range_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="rectifier.smoothing"), rectifier_smoothing(bad):
        pass
    with pytest.raises(ValueError, match="rectifier_smoothing"):
        Settings(rectifier_smoothing=bad)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("width", [0.5, 3.0])
def test_the_cpu_kernel_equals_the_torch_formulation(channels_last: bool, width: float) -> None:
    if _native.library() is None:
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(2, 5, 9, 7, generator=generator) * 4 + 3
    grad = torch.randn(2, 5, 9, 7, generator=generator)
    if channels_last:
        pre, grad = (t.contiguous(memory_format=torch.channels_last) for t in (pre, grad))
    got = _native.smoothed_relu6_backward(grad, pre, width)
    torch.testing.assert_close(got, smoothed_relu6_weight(pre, width) * grad, atol=1e-6, rtol=1e-6)
    # Layouts that differ fall back to torch's formulation, with the same result.
    mixed = _native.smoothed_relu6_backward(grad.contiguous(), pre.contiguous(memory_format=torch.channels_last), width)
    torch.testing.assert_close(mixed, got)
    x = pre.clone().requires_grad_(True)
    SmoothedReLU6.apply(x, width, _native.smoothed_relu6_backward).backward(grad)
    torch.testing.assert_close(x.grad, got)


def test_lite0_defaults_by_stride_and_zero_elsewhere() -> None:
    def default(spec: str) -> float:
        value = Settings().resolved(representation(spec)).rectifier_smoothing
        assert value is not None
        return value

    assert [default(f"efficientnet_lite0:{layer}") for layer in ("blocks.1", "blocks.4", "blocks.10", "blocks.15", "head")] == [
        3.0, 3.0, 1.0, 0.5, 0.5]
    assert default("hog") == 0.0 and default("tiny:conv2") == 0.0
    assert Settings(optimizer="paper").resolved(representation("efficientnet_lite0:blocks.4")).rectifier_smoothing == 0.0
    assert Settings(rectifier_smoothing=0.0).resolved(representation("efficientnet_lite0:blocks.4")).rectifier_smoothing == 0.0


def test_the_engine_shrinks_the_width_to_zero_and_reports_the_true_error(monkeypatch) -> None:
    rep = representation("efficientnet_lite0:blocks.1")
    photo = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    widths = []
    real = engine_loop.rectifier_smoothing

    def spy(width, backward=None):
        widths.append(width)
        return real(width, backward)

    monkeypatch.setattr(engine_loop, "rectifier_smoothing", spy)
    result = invert(rep, photo, settings=Settings(iters=8, rectifier_smoothing=2.0), device="cpu")
    assert widths == pytest.approx([2.0 * (1 - step / 8) for step in range(8)])
    # A custom objective gets the network's true gradient.
    from invviz import match

    widths.clear()
    with torch.no_grad():
        code = rep(photo[None])
    invert(rep, photo, objective=match(rep, code), settings=Settings(iters=3, rectifier_smoothing=2.0), device="cpu")
    assert widths == [0.0, 0.0, 0.0]
    with torch.no_grad():
        target = rep(photo[None])
        error = float((rep(result.image[None]) - target).norm() / target.norm())
    assert result.feature_error[0] == pytest.approx(error, rel=1e-4)
    # After the run the representation's gradient is ReLU6's own again.
    x = photo[None].clone().requires_grad_(True)
    rep(x).sum().backward()
    y = photo[None].clone().requires_grad_(True)
    with real(0.0):
        rep(y).sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_smoothing_lowers_the_error_of_a_short_run() -> None:
    """The reason it is on by default: at blocks.4 (stride 8) a 30-step run ends lower with it."""
    rep = representation("efficientnet_lite0:blocks.4")
    from invviz import sample_image

    photo = torch.nn.functional.interpolate(sample_image("chelsea")[None], size=(96, 96), mode="area")[0]
    errors = {w: invert(rep, photo, settings=Settings(iters=30, rectifier_smoothing=w), device="cpu").feature_error[0]
              for w in (0.0, 3.0)}
    assert errors[3.0] < errors[0.0] - 0.01, errors
