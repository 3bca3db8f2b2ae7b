"""Objectives for inversion, composable with ``+`` and ``*``.

``match(rep, target, mask) + 10 * tv(beta=2) + alpha_norm(6)`` is one objective whose value is the
sum of its named terms. Each term returns one value per image of the batch, so a batch of restarts
or channel subsets is optimized at once with independent losses.

Units: images are RGB in [0, 1]. The priors are normalized like the IJCV follow-up
(aravindhm/nnpreimage): pixels are measured relative to a typical magnitude ``B`` and averaged
over pixels, so a weight of 1 means the same thing at every image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..representations import Representation
from ..representations._surrogates import RevivingClamp as _RevivingClamp
from ..representations._surrogates import check_slope
from . import _native

#: Typical pixel magnitude of a mean-subtracted image: 80/255 in the IJCV code's 0–255 units.
PIXEL_SCALE = 80.0 / 255.0
#: Typical neighbouring-pixel difference of a natural image, ``B / 6.5`` in the IJCV code.
VARIATION_SCALE = PIXEL_SCALE / 6.5
#: Mean pixel of ImageNet images in [0, 1] RGB; the α-norm measures distance from it.
MEAN_PIXEL = (0.485, 0.456, 0.406)
#: Added to TV's squared differences for ``β ≠ 2`` (a tiny fraction of a typical one).
TV_EPSILON = 1e-8 * VARIATION_SCALE**2


class Context:
    """What objectives see during one step: the images and a per-step cache of codes.

    ``prepared``: a representation and the images as its ``input_layout`` prepares them (the CPU
    engine writes that input itself); codes of that representation are computed from it.
    """

    def __init__(self, images: Tensor, prepared: tuple[Representation, Tensor] | None = None) -> None:
        self.images = images
        self.prepared = prepared
        self._codes: dict[tuple[int, float], Tensor] = {}
        self._pre: dict[int, tuple[Tensor, float, float] | None] = {}

    def _run(self, rep: Representation, pre: bool) -> Any:
        """``rep`` (or its ``pre_rectifier``) on the images, or on the prepared input if it is rep's."""
        if self.prepared is not None and self.prepared[0] is rep:
            source = self.prepared[1]
            return rep.pre_rectifier(source, prepared=True) if pre else rep.forward_prepared(source)
        return rep.pre_rectifier(self.images) if pre else rep(self.images)

    def pre_code(self, rep: Representation) -> tuple[Tensor, float, float] | None:
        """``rep.pre_rectifier(images)``, computed once per step."""
        if id(rep) not in self._pre:
            self._pre[id(rep)] = self._run(rep, pre=True)
        return self._pre[id(rep)]

    def code(self, rep: Representation, rectifier_slope: float = 0.0) -> Tensor:
        """``rep(images)``, computed once per step however many terms use it.

        With ``rectifier_slope > 0`` and a code that ends in a clamp (``rep.pre_rectifier``), the
        values are the same but the gradient also reaches clamped entries (see ``match``).
        """
        key = (id(rep), rectifier_slope)
        if key not in self._codes:
            pre = self.pre_code(rep) if rectifier_slope else None
            self._codes[key] = self._run(rep, pre=False) if pre is None else _RevivingClamp.apply(*pre, rectifier_slope)
        return self._codes[key]


TermFunction = Callable[[Context], Tensor]


@dataclass(frozen=True)
class Objective:
    """A weighted sum of named terms; each term maps a ``Context`` to a ``(B,)`` tensor."""

    terms: tuple[tuple[str, float, TermFunction], ...] = field(default=())

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        names = [name for name, _, _ in self.terms] + [name for name, _, _ in other.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"objective terms must have distinct names, got {names}")
        return Objective(self.terms + other.terms)

    def __mul__(self, weight: float) -> Objective:
        if isinstance(weight, bool) or not hasattr(weight, "__float__"):
            return NotImplemented
        if not math.isfinite(float(weight)):
            raise ValueError(f"an objective's weight must be a finite number, got {weight!r}")
        return Objective(tuple((name, w * float(weight), fn) for name, w, fn in self.terms))

    __rmul__ = __mul__

    def named(self, name: str) -> Objective:
        """The same single-term objective under another name (to combine two of a kind)."""
        if len(self.terms) != 1:
            raise ValueError("only a single-term objective can be renamed")
        _, weight, fn = self.terms[0]
        return Objective(((name, weight, fn),))

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.terms]

    def weight(self, name: str) -> float:
        return next(w for n, w, _ in self.terms if n == name)

    def evaluate(self, context: Context, scales: Mapping[str, float] | None = None) -> dict[str, Tensor]:
        """Weighted value of every term, each ``(B,)``; zero-weight terms are skipped. ``scales``
        multiplies the weights of the terms it names (a schedule's factor for this step)."""
        scales = scales or {}
        values = {}
        for name, weight, fn in self.terms:
            if weight != 0.0:
                factor = weight * scales.get(name, 1.0)
                value = fn(context)
                # A factor of 1 (the data term's usual weight) adds no operation.
                values[name] = value if factor == 1.0 else factor * value
        return values

    def __call__(self, context: Context) -> Tensor:
        """Total loss per image, ``(B,)``."""
        values = list(self.evaluate(context).values())
        if not values:
            raise ValueError("objective has no term with a non-zero weight")
        return torch.stack(values).sum(0)


def _term(name: str, fn: TermFunction) -> Objective:
    return Objective(((name, 1.0, fn),))


def feature_error_squared(code: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """``‖m⊙(Φ − Φ0)‖² / ‖m⊙Φ0‖²`` per image, ``(B,)``; ``mask`` broadcasts against the code."""
    difference = (code - target).flatten(1)
    reference = target.expand_as(code).flatten(1)
    if mask is not None:
        selected = mask.to(code.dtype).expand_as(code).flatten(1)
        difference = difference * selected
        reference = reference * selected
    norm = reference.pow(2).sum(1).clamp_min(torch.finfo(code.dtype).tiny)
    return difference.pow(2).sum(1) / norm


def check_mask(mask: object, code_shape: Sequence[int], batch: int | None = None) -> Tensor:
    """A user's boolean mask over the code, ``code_shape`` or (spatial codes) ``(H, W)``, as a
    mask of ``code_shape``; with ``batch``, also one mask per image ``(B, *code_shape)`` (B being 1
    or ``batch``, as batched analyses give), returned as it is. Numpy arrays are taken as tensors.
    ``ValueError`` if it is not boolean, has another shape, or selects nothing (in some row)."""
    code_shape = tuple(code_shape)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean tensor, got {kind}")
    if batch is not None and mask.dim() > len(code_shape):
        if mask.dim() != len(code_shape) + 1 or mask.shape[0] not in (1, batch) or any(
            m not in (1, c) for m, c in zip(mask.shape[1:], code_shape)
        ):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not fit the code: expected {code_shape}, or one row "
                f"per image ({batch}, {', '.join(str(c) for c in code_shape)})"
            )
        if not bool(mask.flatten(1).any(1).all()):
            raise ValueError("mask selects no code entry in some row")
        return mask
    shapes = [code_shape] + ([code_shape[1:]] if len(code_shape) == 3 else [])
    if tuple(mask.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit the code: expected {expected}")
    if not bool(mask.any()):
        raise ValueError("mask selects no code entry")
    return mask.expand(code_shape)


def check_rectifier_slope(value: object) -> float:
    """``value`` as a float if it is a number from 0 to 1, else a ``ValueError`` naming it."""
    return check_slope("rectifier_slope", value)


#: Floor of the squared relative error under a power < 2: far below any error worth reporting, it
#: keeps the gradient finite at an exact match.
SQUARED_ERROR_FLOOR = 1e-12


class _RelativeError(torch.autograd.Function):
    """``(‖m⊙(Φ − Φ0)‖² / n)^(p/2)`` per image, ``n = ‖m⊙Φ0‖²`` given, with its gradient written out
    (a dozen composed torch ops and their autograd nodes otherwise). ``selected`` is the mask as
    0/1 or ``None``."""

    @staticmethod
    def forward(ctx: Any, code: Tensor, target: Tensor, selected: Tensor | None, norm: Tensor, power: float) -> Tensor:
        difference = code - target
        if selected is not None:
            difference.mul_(selected)
        flat = difference.flatten(1)
        squared = torch.linalg.vecdot(flat, flat).div_(norm)
        if power == 2.0:
            value, slope = squared, 2 / norm
        else:
            # d/dΦ of (s/n)^(p/2) is (p/2)(s/n)^(p/2 − 1) · 2 m⊙(Φ − Φ0) / n, zero under the floor
            # (where the clamp holds the value); (s/n)^(p/2 − 1) is value / (s/n) above it.
            floored = squared.clamp_min(SQUARED_ERROR_FLOOR)
            value = floored.pow(power / 2)
            slope = torch.where(squared >= SQUARED_ERROR_FLOOR, value / floored * (power / norm), 0.0)
        ctx.save_for_backward(difference, slope)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        difference, slope = ctx.saved_tensors
        return difference * (grad * slope).view(-1, *[1] * (difference.dim() - 1)), None, None, None, None


class _FusedRelativeError(torch.autograd.Function):
    """The same term through the CPU kernels (``_native.DataTerm``): one call forward, one back.

    Right after the network, whose kernels push the interpreter's and dispatcher's code out of the
    caches, each of the composed form's small ops cost 15-80 µs instead of a few: ~0.4 ms a step,
    2 % of a small network's step. Unmasked contiguous CPU float32 codes take this path.
    """

    @staticmethod
    def forward(ctx: Any, code: Tensor, term: _native.DataTerm) -> Tensor:
        value, slope = term.value(code)
        ctx.save_for_backward(code, slope)
        ctx.term = term
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        code, slope = ctx.saved_tensors
        return ctx.term.gradient(code, grad * slope), None


class FeatureMatch:
    """The data term's function: ``(‖m⊙(Φ(x) − Φ0)‖² / ‖m⊙Φ0‖²)^(power/2)`` per image, ``(B,)``."""

    def __init__(
        self, rep: Representation, target: Tensor, mask: Tensor | None, rectifier_slope: float, power: float
    ) -> None:
        self.rep, self.target, self.mask = rep, target, mask
        self.rectifier_slope, self.power = rectifier_slope, power
        # The target, mask and ‖m⊙Φ0‖² as the codes need them (and the fused kernels' state where
        # they apply): computed at the first step, reused.
        self._prepared: tuple[tuple[object, ...], Tensor, Tensor | None, Tensor, _native.DataTerm | None] | None = None

    def _constants(
        self, code: Tensor, rectifier: tuple[float, float, float] | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor, _native.DataTerm | None]:
        layout = _native.memory_format(code)
        key = (code.shape, code.dtype, code.device, rectifier, layout)
        if self._prepared is None or self._prepared[0] != key:
            # Laid out as the codes come (channels-last from the CPU engine's prepared input).
            target = self.target.to(code).contiguous(memory_format=layout)
            selected = None if self.mask is None else self.mask.to(code).expand_as(code)
            reference = target.expand_as(code) if selected is None else target * selected
            norm = torch.linalg.vecdot(reference.flatten(1), reference.flatten(1)).clamp_min(torch.finfo(code.dtype).tiny)
            fused = None
            if selected is None and _native.usable(code, target, norm, memory_format=layout):
                fused = _native.DataTerm(
                    code.shape[0], code[0].numel(), target, norm, self.power, SQUARED_ERROR_FLOOR, rectifier
                )
            self._prepared = (key, target, selected, norm, fused)
        return self._prepared[1:]

    def __call__(self, ctx: Context) -> Tensor:
        if self.rectifier_slope and self.mask is None:
            # The rectifier's clamp and reviving gradient fused into the kernels too, where they apply.
            pre = ctx.pre_code(self.rep)
            if pre is not None and _native.usable(pre[0], memory_format=_native.memory_format(pre[0])):
                fused_rectified = self._constants(pre[0], (pre[1], pre[2], self.rectifier_slope))[3]
                if fused_rectified is not None:
                    rectified: Tensor = _FusedRelativeError.apply(pre[0], fused_rectified)
                    return rectified
        code = ctx.code(self.rep, self.rectifier_slope)
        target, selected, norm, fused = self._constants(code)
        value: Tensor
        if fused is not None:
            value = _FusedRelativeError.apply(code, fused)
        else:
            value = _RelativeError.apply(code, target, selected, norm, self.power)
        return value

    def feature_error(self, value: float) -> float:
        """The relative error ``‖Φ(x) − Φ0‖ / ‖Φ0‖`` from this term's (unweighted) value."""
        return max(value, 0.0) ** (1.0 / self.power)


def match(
    rep: Representation,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    rectifier_slope: float = 0.0,
    power: float = 2.0,
) -> Objective:
    """The paper's data term: the normalized distance between ``rep(x)`` and ``target``, to ``power``.

    ``target`` is a code ``(C, ...)`` or ``(B, C, ...)``; ``mask`` a boolean tensor broadcastable to
    the code ``(B, C, H, W)`` (e.g. ``(C, H, W)``, ``(1, H, W)`` or per image ``(B, C, H, W)``)
    selecting the entries that enter both the distance and the normalization.

    ``power``: 2 is the paper's ``‖Φ(x) − Φ0‖² / ‖Φ0‖²``; 1 its square root, the relative error
    itself, whose gradient does not fade as the error shrinks (the squared form's is 2·error times
    it), so next to the same priors the data term keeps its pull to the end of a run.

    ``rectifier_slope``: when the code ends in a clamp such as ReLU6 (``rep.pre_rectifier``), let
    this fraction of the gradient through to entries the clamp has switched off, in the direction
    that switches them on. The value is unchanged; 0 is the true gradient.
    """
    target = target.detach()
    if target.dim() == (3 if rep.is_spatial else 1):  # one code without its batch dimension
        target = target[None]
    if mask is not None and not bool(mask.any()):
        raise ValueError("mask selects no code entry")
    slope = check_rectifier_slope(rectifier_slope)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power < float("inf"):
        raise ValueError(f"feature power must be a positive number, got {power!r}")
    return _term("feature", FeatureMatch(rep, target, mask, slope, float(power)))


class _TotalVariation(torch.autograd.Function):
    """``mean_ij s_ij^(β/2)`` per image with ``s = Σ_rgb (Δx)² + (Δy)²``, gradient written out.

    Autograd through the slicing would take about twenty passes over the pixels per step; for
    β = 2 this takes eight (two differences and two dot products forward, four in-place passes
    back), which matters when the prior runs beside a small network (see ``benchmarks/``).
    With ``stretch`` ≠ 1 (``tv``'s chroma), the image is colour-stretched first
    (``_stretch_colour``) and the gradient carried back through the same symmetric stretch.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, beta: float, epsilon: float, stretch: float = 1.0) -> Tensor:
        ctx.shape = x.shape
        if x.shape[-2] < 2 or x.shape[-1] < 2:
            # No pixel has both a right and a lower neighbour: no variation (as the C kernel).
            ctx.flat = True
            return x.new_zeros(x.shape[0])
        ctx.flat = False
        ctx.stretch = stretch if x.shape[1] > 1 else 1.0
        if ctx.stretch != 1.0:
            x = _stretch_colour(x, ctx.stretch)
        corner = x[..., :-1, :-1]
        dx = x[..., :-1, 1:] - corner
        dy = x[..., 1:, :-1] - corner
        if beta == 2.0:
            # s summed over pixels is two dot products: no per-pixel s is ever stored.
            flat_x, flat_y = dx.flatten(1)[:, None], dy.flatten(1)[:, None]
            total = torch.bmm(flat_x, flat_x.transpose(1, 2)) + torch.bmm(flat_y, flat_y.transpose(1, 2))
            ctx.save_for_backward(dx, dy)
            return total.flatten() / (dx.shape[-2] * dx.shape[-1])
        squared = (dx * dx).add_(dy * dy).sum(1).add_(epsilon)
        powered = squared.pow(beta / 2)
        slope = (powered / squared).mul_(beta / 2)  # (β/2) s^(β/2 − 1)
        ctx.save_for_backward(dx, dy, slope)
        return powered.flatten(1).mean(1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.flat:
            return grad.new_zeros(ctx.shape), None, None, None
        dx, dy, *slopes = ctx.saved_tensors
        batch, _, height, width = ctx.shape
        # d/dx of mean(s): 2 Δ / N per difference; per-image factor folded with the slope.
        scale = (grad * (2.0 / ((height - 1) * (width - 1)))).view(batch, 1, 1, 1)
        if slopes:
            weight = slopes[0][:, None] * scale
            dx, dy = dx * weight, dy * weight
        # The negated gradient, −Δx − Δy at each corner plus each difference at its far pixel,
        # built in place; one multiplication by −scale at the end gives the sign and the factor.
        out = dx.new_empty(ctx.shape)
        torch.add(dx, dy, out=out[..., :-1, :-1])
        out[..., -1, :] = 0
        out[..., :-1, -1] = 0
        out[..., :-1, 1:] -= dx
        out[..., 1:, :-1] -= dy
        out.mul_(-1.0 if slopes else -scale)
        # The stretch is symmetric, so the chain rule through it applies it again.
        return (_stretch_colour(out, ctx.stretch) if ctx.stretch != 1.0 else out), None, None, None


def _stretch_colour(x: Tensor, stretch: float) -> Tensor:
    """Each pixel's mean over the channels plus ``stretch`` times its difference from that mean."""
    mean = x.mean(1, keepdim=True)
    return (x - mean).mul_(stretch).add_(mean)


@dataclass(frozen=True)
class PixelPrior:
    """A prior on the pixels alone, ``(B, 3, H, W)`` → ``(B,)``: TV^β (``kind="tv"``) or the
    α-norm (``kind="alpha"``) with its ``exponent``. Being plain functions of the image with
    written-out gradients, they are the terms the loop may evaluate with fused CPU kernels
    (``_native``) instead of autograd; calling one evaluates it with torch. ``chroma``: TV's extra
    weight on colour variation (see ``tv``)."""

    kind: Literal["tv", "alpha"]
    exponent: float
    chroma: float = 0.0

    @property
    def scale(self) -> float:
        """The value is the image's mean (TV^β or α-norm) times this (``1 / V^β``, ``1 / B^α``)."""
        return 1.0 / (VARIATION_SCALE if self.kind == "tv" else PIXEL_SCALE) ** self.exponent

    def __call__(self, ctx: Context) -> Tensor:
        # Scale the per-image scalar, not the image: the same value, fewer passes over pixels.
        if self.kind == "tv":
            stretch = math.sqrt(1.0 + self.chroma)
            value: Tensor = _TotalVariation.apply(ctx.images, self.exponent, TV_EPSILON, stretch)
        else:
            value = _AlphaNorm.apply(ctx.images, self.exponent)
        return value * self.scale


def tv(beta: float = 2.0, chroma: float = 0.0) -> Objective:
    """Total variation ``mean_ij ((Δx)² + (Δy)²)^(β/2) / V^β`` per image (Δ summed over RGB).

    ``β = 2`` is smooth; ``β = 1`` is the classic TV, which the paper shows gives spiky artefacts.
    Pixels with a zero difference get a tiny epsilon so that ``β < 2`` stays differentiable.

    ``chroma`` ≥ 0 weighs colour variation more than brightness variation: TV is taken of
    ``Y + √(1 + chroma)·(x − Y)``, ``Y`` each pixel's mean over RGB, so for β = 2 it is the plain
    TV plus ``chroma`` times the TV of the colour differences ``x − Y`` (natural photos vary far
    less in colour than in brightness at fine scales). It changes nothing on one-channel images.
    """
    if not beta > 0:
        raise ValueError(f"tv beta must be positive, got {beta}")
    if not (math.isfinite(chroma) and chroma >= 0):
        raise ValueError(f"tv chroma must be a finite number ≥ 0, got {chroma}")
    return _term("tv", PixelPrior("tv", float(beta), float(chroma)))


class _AlphaNorm(torch.autograd.Function):
    """``mean_ij (‖x_ij − m‖² + ε)^(α/2)`` per image, gradient written out (four passes, not ten)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        centred = x - x.new_tensor(MEAN_PIXEL).view(1, 3, 1, 1)
        squared = (centred * centred).sum(1).add_(1e-12)
        powered = squared.pow(alpha / 2)
        ctx.save_for_backward(centred, powered, squared)
        ctx.alpha = alpha
        return powered.flatten(1).mean(1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        centred, powered, squared = ctx.saved_tensors
        batch, _, height, width = centred.shape
        # d/dc of s^(α/2) = α s^(α/2 − 1) c, averaged over pixels.
        scale = (grad * (ctx.alpha / (height * width))).view(batch, 1, 1)
        return centred * (powered / squared).mul_(scale)[:, None], None


def alpha_norm(alpha: float = 6.0) -> Objective:
    """``mean_ij (‖x_ij − mean pixel‖ / B)^α`` per image: keeps pixels in a natural range."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return _term("alpha", PixelPrior("alpha", float(alpha)))


def term_values(values: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Detached per-image floats of each term (for histories and snapshots)."""
    return {name: value.cpu().tolist() for name, value in values.items()}
