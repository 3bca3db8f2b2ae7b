"""The inner rectifiers' smoothed gradient (``Settings.rectifier_smoothing``)."""

import threading

import pytest
import torch
import torch.nn.functional as F

from invviz import Settings, invert, representation
from invviz.engine import _native
from invviz.engine import loop as engine_loop
from invviz.representations._surrogates import (
    current_smoothing,
    rectifier_smoothing,
    smoothed_relu6_grad,
    smoothed_relu6_weight,
)
from invviz.representations.efficientnet import ConvBN, MBConv


def rounded_relu6(x: torch.Tensor, width: float) -> torch.Tensor:
    """ReLU6 with each corner replaced by the parabola that joins its two lines ``width`` either side."""
    low = (x + width) ** 2 / (4 * width)
    high = 6 - (6 + width - x) ** 2 / (4 * width)
    return torch.where(
        x <= -width, torch.zeros_like(x),
        torch.where(x < width, low,
                    torch.where(x <= 6 - width, x, torch.where(x < 6 + width, high, torch.full_like(x, 6.0)))))


def straight_through(width: float):  # type: ignore[no-untyped-def]
    """ReLU6's values with ``rounded_relu6``'s gradient, from autograd alone: the oracle."""

    def activation(x: torch.Tensor) -> torch.Tensor:
        rounded = rounded_relu6(x, width)
        return F.relu6(x).detach() + (rounded - rounded.detach())

    return activation


def reference_lite0(rep, images: torch.Tensor, activation, branch: float = 1.0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Lite0's stages written out once more, with autograd and ``activation`` for every ReLU6, and
    each residual block's branch passing ``branch`` of its gradient (straight through its values)."""

    def conv_bn(layer: ConvBN, x: torch.Tensor) -> torch.Tensor:
        y = layer.conv(x)
        return activation(y) if layer.relu else y

    x = images * 2 - 1
    for stage in rep.stages:
        if isinstance(stage, ConvBN):
            x = conv_bn(stage, x)
        else:
            assert isinstance(stage, MBConv)
            y = conv_bn(stage.expand, x) if stage.expand is not None else x
            y = conv_bn(stage.project, conv_bn(stage.depthwise, y))
            x = x + (y.detach() + branch * (y - y.detach())) if stage.residual else y
    return x


@pytest.mark.parametrize("width", [0.25, 1.0, 3.0])
def test_the_smoothing_function_is_the_rounded_rectifiers_derivative(width: float) -> None:
    x = torch.linspace(-5, 11, 4001, dtype=torch.float64).requires_grad_(True)
    expected = torch.autograd.grad(rounded_relu6(x, width).sum(), x)[0]
    got = smoothed_relu6_weight(x.detach(), width)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert got.min() == 0 and got.max() == 1 and ((got > 0) & (got < 1)).any()
    grad = torch.randn(4001, dtype=torch.float64)
    torch.testing.assert_close(smoothed_relu6_grad(grad, x.detach(), width), grad * expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("layer", "width", "size", "branch"),
    [("blocks.2", 3.0, (37, 50), 1.0), ("blocks.5", 1.0, (64, 48), 1.0), ("blocks.6", 2.0, (45, 64), 0.3)],
)
def test_lite0s_hand_written_gradient_is_the_straight_through_oracles(
    layer: str, width: float, size: tuple[int, int], branch: float
) -> None:
    """In float64, on odd and even sizes (stride-2 "same" padding of both kinds), through ``rep(x)``
    and the engine's prepared input: values are the network's, the gradient autograd's of a
    network whose ReLU6s pass ``rounded_relu6``'s gradient (straight through its true values) and
    whose residual branches pass ``branch`` of theirs."""
    rep = representation(f"efficientnet_lite0:{layer}").double()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, *size, generator=generator, dtype=torch.float64)
    weights = torch.randn_like(rep(images))
    x = images.clone().requires_grad_(True)
    expected_code = reference_lite0(rep, x, straight_through(width), branch)
    (expected,) = torch.autograd.grad((expected_code * weights).sum(), x)
    torch.testing.assert_close(expected_code.detach(), rep(images), rtol=1e-12, atol=1e-12)  # the layouts' rounding
    for backward in (None, _native.smoothed_relu6_backward_for_run()):  # the CPU kernel falls back on float64
        y = images.clone().requires_grad_(True)
        with rectifier_smoothing(width, backward, branch):
            code = rep(y)
            (got,) = torch.autograd.grad((code * weights).sum(), y)
        assert torch.equal(code.detach(), rep(images))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        prepared = rep.input_layout(*size).prepare(images).requires_grad_(True)
        with rectifier_smoothing(width, backward, branch):
            code = rep.forward_prepared(prepared)
            (through_prepared,) = torch.autograd.grad((code * weights).sum(), prepared)
        assert torch.equal(code.detach().contiguous(), rep(images))
        # The prepared input is the pixels scaled by 2 (and padded): the gradient halves.
        top, _, left, _ = rep.input_layout(*size).pad
        torch.testing.assert_close(2 * through_prepared[..., top : top + size[0], left : left + size[1]], expected)


@pytest.mark.parametrize("layer", ["blocks.1", "blocks.4", "head"])
def test_with_relu6s_own_backward_the_hand_written_gradient_is_autograds_bit_for_bit(layer: str, monkeypatch) -> None:
    """With the exact ReLU6 backward plugged in, the one-node pass equals autograd's, float32."""
    rep = representation(f"efficientnet_lite0:{layer}")
    images = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    x = images.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(rep(x).square().sum(), x)

    def exact(grad: torch.Tensor, pre: torch.Tensor, width: float, in_place: bool) -> torch.Tensor:
        return torch.ops.aten.hardtanh_backward(grad, pre, 0.0, 6.0)

    y = images.clone().requires_grad_(True)
    with rectifier_smoothing(1.0, exact):
        code = rep(y)
        assert code.grad_fn is not None
        (got,) = torch.autograd.grad(code.square().sum(), y)
    assert torch.equal(got, expected)


def test_outside_the_context_in_other_threads_and_at_width_zero_the_gradient_is_relu6s() -> None:
    rep = representation("efficientnet_lite0:blocks.2")
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))

    def gradient() -> torch.Tensor:
        x = images.clone().requires_grad_(True)
        return torch.autograd.grad(rep(x).square().sum(), x)[0]

    exact = gradient()
    seen = {}

    def other() -> None:
        seen["grad"] = gradient()
        seen["state"] = current_smoothing()

    assert current_smoothing() is None
    with rectifier_smoothing(1.0):
        assert current_smoothing() is not None
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert not torch.equal(gradient(), exact)
        with rectifier_smoothing(0.0):  # nested: 0 is the true gradient again
            assert current_smoothing() is None
            assert torch.equal(gradient(), exact)
        with torch.no_grad():  # no gradient taken: the plain forward
            assert torch.equal(rep(images), rep(images.clone()))
    assert seen["state"] is None and torch.equal(seen["grad"], exact)
    assert torch.equal(gradient(), exact)


@pytest.mark.parametrize("bad", [-0.1, 3.5, float("nan")])
def test_widths_out_of_range_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="rectifier.smoothing"), rectifier_smoothing(bad):
        pass
    with pytest.raises(ValueError, match="rectifier_smoothing"):
        Settings(rectifier_smoothing=bad)


def test_the_branch_share_changes_the_gradient_and_nothing_else() -> None:
    """A branch share below 1 changes Lite0's input gradient (it has residual blocks from blocks.2
    on) but not its values; before blocks.2, where there is no residual block, it changes nothing."""
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    for layer, changes in (("blocks.1", False), ("blocks.4", True)):
        rep = representation(f"efficientnet_lite0:{layer}")
        gradients, codes = [], []
        for branch in (1.0, 0.5):
            x = images.clone().requires_grad_(True)
            with rectifier_smoothing(1.0, None, branch):
                code = rep(x)
                gradients.append(torch.autograd.grad(code.square().sum(), x)[0])
            codes.append(code.detach())
        assert torch.equal(codes[0], codes[1])
        assert torch.equal(gradients[0], gradients[1]) is not changes


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True])
def test_branch_shares_out_of_range_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="branch_gradient"), rectifier_smoothing(1.0, None, bad):
        pass
    with pytest.raises(ValueError, match="branch_gradient"):
        Settings(branch_gradient=bad)


def test_a_branch_share_without_the_smoothed_gradient_is_refused() -> None:
    """The share acts in the smoothed gradient's backward only: asking for less than 1 with that
    turned off (explicitly, or by the paper's optimizer) is an error, not a silent no-op."""
    with pytest.raises(ValueError, match="rectifier_smoothing=0 turns off"):
        Settings(rectifier_smoothing=0.0, branch_gradient=0.5)
    with pytest.raises(ValueError, match='optimizer="paper" turns off'):
        Settings(optimizer="paper", branch_gradient=0.5)
    head = representation("efficientnet_lite0:head")
    assert Settings(optimizer="paper", rectifier_smoothing=1.0, branch_gradient=0.5).resolved(head).branch_gradient == 0.5
    # 1, the true gradient, asks for nothing; and with the smoothing off the default is 1.
    assert Settings(rectifier_smoothing=0.0, branch_gradient=1.0).resolved(head).branch_gradient == 1.0
    assert Settings(rectifier_smoothing=0.0).resolved(head).branch_gradient == 1.0


def test_branch_gradient_defaults_and_schedule() -> None:
    """0.7 for Lite0's stride-16 layers, 0.5 for its others (1 with the paper's optimizer and for
    networks the engine does not smooth), rising linearly to 1 as the smoothing width falls to 0."""
    head = representation("efficientnet_lite0:head")
    layers = ("blocks.4", "blocks.5", "blocks.10", "blocks.11", "head")
    assert [Settings().resolved(representation(f"efficientnet_lite0:{layer}")).branch_gradient for layer in layers] == [
        0.5, 0.7, 0.7, 0.5, 0.5
    ]
    assert Settings(optimizer="paper").resolved(head).branch_gradient == 1.0
    assert Settings(branch_gradient=0.8).resolved(head).branch_gradient == 0.8
    assert Settings().resolved(representation("efficientnet_lite0:stem")).branch_gradient == 1.0
    assert Settings().resolved(representation("hog")).branch_gradient == 1.0
    settings = Settings(iters=100).resolved(head)
    assert engine_loop._smoothing(settings, 0) == (0.75, 0.5)
    assert engine_loop._smoothing(settings, 50) == (0.375, 0.75)
    width, branch = engine_loop._smoothing(settings, 99)
    assert width == pytest.approx(0.0075) and branch == pytest.approx(0.995)


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
    expected = smoothed_relu6_weight(pre, width) * grad
    kernel = _native.smoothed_relu6_backward_for_run()
    got = kernel(grad, pre, width, False)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert got.data_ptr() != grad.data_ptr()
    # In place: into the gradient itself.
    owned = grad.clone(memory_format=torch.preserve_format)
    assert kernel(owned, pre, width, True) is owned
    torch.testing.assert_close(owned, got, atol=0, rtol=0)
    # Layouts that differ fall back to torch's formulation, with the same result, in place too.
    mixed = kernel(grad.contiguous(), pre.contiguous(memory_format=torch.channels_last), width, False)
    torch.testing.assert_close(mixed, got)
    owned = grad.contiguous().clone()
    assert kernel(owned, pre.contiguous(memory_format=torch.channels_last), width, True) is owned
    torch.testing.assert_close(owned, got)


def test_lite0_defaults_by_stride_and_zero_elsewhere() -> None:
    def default(spec: str) -> float:
        value = Settings().resolved(representation(spec)).rectifier_smoothing
        assert value is not None
        return value

    layers = ("blocks.1", "blocks.4", "blocks.5", "blocks.10", "blocks.11", "blocks.15", "head")
    assert [default(f"efficientnet_lite0:{layer}") for layer in layers] == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.75]
    assert default("hog") == 0.0 and default("tiny:conv2") == 0.0
    assert Settings(optimizer="paper").resolved(representation("efficientnet_lite0:blocks.4")).rectifier_smoothing == 0.0
    assert Settings(rectifier_smoothing=0.0).resolved(representation("efficientnet_lite0:blocks.4")).rectifier_smoothing == 0.0


def test_the_engine_shrinks_the_width_to_zero_and_reports_the_true_error(monkeypatch) -> None:
    rep = representation("efficientnet_lite0:blocks.1")
    photo = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    widths, branches = [], []
    real = engine_loop.rectifier_smoothing

    def spy(width, backward=None, branch=1.0):
        widths.append(width)
        branches.append(branch)
        return real(width, backward, branch)

    monkeypatch.setattr(engine_loop, "rectifier_smoothing", spy)
    result = invert(rep, photo, settings=Settings(iters=8, rectifier_smoothing=2.0), device="cpu")
    assert widths == pytest.approx([2.0 * (1 - step / 8) for step in range(8)])
    assert branches == pytest.approx([1 - 0.5 * (1 - step / 8) for step in range(8)])
    # A custom objective gets the network's true gradient.
    from invviz import match

    widths.clear()
    with torch.no_grad():
        code = rep(photo[None])
    invert(rep, photo, objective=match(rep, code), settings=Settings(iters=3, rectifier_smoothing=2.0), device="cpu")
    assert widths == [0.0, 0.0, 0.0] and branches[-3:] == [1.0, 1.0, 1.0]
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


def test_the_kernel_bound_for_a_run_falls_back_on_other_dtypes_and_honours_invviz_native(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(5)
    pre = (torch.randn(1, 6, 8, 8, generator=generator) * 4 + 3).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(1, 6, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    expected = smoothed_relu6_weight(pre, 1.5) * grad
    bound = _native.smoothed_relu6_backward_for_run()
    torch.testing.assert_close(bound(grad, pre, 1.5, False), expected)
    torch.testing.assert_close(bound(grad.contiguous(), pre, 1.5, False), expected)  # mixed layouts: torch's
    torch.testing.assert_close(bound(grad.double(), pre.double(), 1.5, False), expected.double())
    owned = grad.clone(memory_format=torch.preserve_format)
    assert bound(owned, pre, 1.5, True) is owned
    torch.testing.assert_close(owned, expected)
    monkeypatch.setenv("INVVIZ_NATIVE", "0")
    assert _native.smoothed_relu6_backward_for_run() is smoothed_relu6_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_hand_written_gradient_on_cuda_is_the_straight_through_oracles() -> None:
    """The taped backward on the GPU (where the CPU kernels do not apply): float64 against the
    autograd oracle there, and float32 (TF32 off) against the same pass on the CPU."""
    rep = representation("efficientnet_lite0:blocks.5").double().cuda()
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 48, generator=generator, dtype=torch.float64).cuda()
    weights = torch.randn_like(rep(images))
    x = images.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((reference_lite0(rep, x, straight_through(1.0)) * weights).sum(), x)
    y = images.clone().requires_grad_(True)
    with rectifier_smoothing(1.0):
        code = rep(y)
        (got,) = torch.autograd.grad((code * weights).sum(), y)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)

    rep = rep.float()
    on_cpu = representation("efficientnet_lite0:blocks.5")
    gradients = []
    for model, device in ((rep, "cuda"), (on_cpu, "cpu")):
        z = images.float().to(device).requires_grad_(True)
        # cuDNN's default TF32 convolutions round to 10 bits: compare true float32 arithmetic.
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), \
                rectifier_smoothing(1.0, _native.smoothed_relu6_backward_for_run()):
            (gradient,) = torch.autograd.grad((model(z) * weights.float().to(device)).sum(), z)
        gradients.append(gradient.cpu())
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-3, atol=1e-3 * gradients[1].abs().max().item())
