"""The inversion loop: find images whose code matches a target code, under natural-image priors.

The loop knows nothing about widgets or display. It reports every step through ``on_step`` and
stops when ``stop`` is set, returning what it has. Only the calling thread touches torch.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..representations import Representation
from ..representations._base import ColourBasis
from ..representations._surrogates import check_slope, check_smoothing, rectifier_smoothing
from . import _native
from ._device import resolve_device
from .flat import FlatRegions
from .objectives import (
    MEAN_PIXEL,
    TV_EPSILON,
    Context,
    FeatureMatch,
    Objective,
    PixelPrior,
    alpha_norm,
    check_mask,
    check_rectifier_slope,
    feature_error_squared,
    match,
    term_values,
    tv,
)
from .polish import polish

OptimizerName = Literal["adam", "paper"]
OPTIMIZERS: tuple[str, ...] = ("adam", "paper")
COLOUR_BASES: tuple[str, ...] = get_args(ColourBasis)


class StopSignal(Protocol):
    """Anything with ``is_set()``, e.g. a ``threading.Event``."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Settings:
    """Everything that shapes one inversion. ``None`` means "the representation's default".

    - ``iters``: optimization steps; ``None``: the representation's default (200 for CNN layers,
      400 for HOG, HOGb and dense SIFT, whose per-cell normalization converges more slowly).
    - ``optimizer``: ``"adam"`` (fast default) or ``"paper"`` (CVPR 2015's momentum SGD schedule).
    - ``tv_weight``: weight of the TV^β prior; ``None`` picks a per-layer default that grows with
      depth, as in the paper.
    - ``tv_chroma``: how much more the TV prior weighs colour variation than brightness
      variation (``objectives.tv``'s ``chroma``; 0: plain TV over RGB). ``None``: the
      representation's default — 3 for CNN layers of stride 8 or more, 0 for shallower ones.
      Deep codes keep little of an image's fine colour, and without it the reconstructions of
      smooth photos came out speckled with colour: on the 8 scikit-image photos at 200 steps (GPU
      sweep) the roughest reconstruction per layer went from 1.99 / 1.42 / 1.41 / 1.21 / 1.47 to
      1.36 / 1.28 / 1.27 / 1.12 / 1.38 times its photo at blocks.4 / 8 / 10 / 12 / 15 (rocket's
      sky: colour roughness 5.8× the photo's → 2.6×) at the same mean error (0.118 / 0.129 /
      0.129 / 0.098 / 0.135 → 0.121 / 0.131 / 0.127 / 0.099 / 0.122). At blocks.1 it cost error
      (0.084 → 0.091 mean), so shallow layers keep plain TV.
    - ``tv_start``: the TV weight of the first step as a multiple of ``tv_weight``; it falls
      geometrically to ``tv_weight`` by the last step (1: constant, as in the paper). Strong
      smoothing while the coarse layout forms, less once the detail is being matched: with 2, at 200
      steps on 8 photos (GPU sweep), the roughest reconstruction per layer (blocks.2 to head) was
      0.08-0.3 times the photo's roughness smoother at the same or lower error. ``None``: the
      representation's default for the run's length (``Representation.default_tv_start``): 2, and
      for colour codes of stride 8 or more in runs shorter than 200 steps 2 × 200 / steps (at most
      8), since short runs end rougher. Only the default objective is scheduled; a custom
      ``objective`` keeps its weights.
    - ``jitter``: largest random shift in pixels per step (the IJCV follow-up's jitter); the last
      fifth of the steps runs unjittered. Off by default: on EfficientNet-Lite0 it raised the final
      feature error at every layer (e.g. blocks.4: 0.15 → 0.27 in 200 steps).
    - ``pyramid_levels``: the image is optimized as a sum of this many upsampled resolutions
      (1 = plain pixels, as the paper does); coarse levels let Adam move large structures as fast
      as fine detail, which converges in fewer steps and to smoother images. ``None``: the
      representation's default (5 for CNN layers, 4 for HOG, HOGb and DSIFT).
    - ``start_noise``: standard deviation of the start image's Gaussian noise around the mean
      pixel (the noise is drawn from ``seed``). ``None``: the representation's default — 0 for CNN
      layers, a flat start, and 0.05 for HOG, HOGb and DSIFT, whose gradient vanishes on a flat
      image. On Lite0 (8 photos, 200 steps, CPU) a flat start took the mean error of blocks.1 from
      0.099 to 0.084 (lower on every photo) and of blocks.4 / 8 / 15 / head by 0.003-0.010, with
      blocks.12 0.002 higher; noise as small as 0.001 gave the noisy start's results (likely
      because Adam's first steps move every pixel by ±lr whatever the size of its gradient, so
      even the small gradient faint noise induces becomes full-size noise). With a flat start
      ``seed`` only matters with jitter; a batch of restarts (``invert(batch=K)``, ``restarts``)
      uses 0.05 where this is ``None``, so that its starts differ.
    - ``feature_power``: the data term is ``(‖Φ(x) − Φ0‖ / ‖Φ0‖)^p``. ``None``: 1 with Adam, 2 (the
      paper's squared form) with the paper's optimizer. With the squared form the data term's pull
      fades with the error while the priors' does not, so the priors win the last steps: at 200
      steps on the 8 scikit-image photos (GPU sweep) p = 1 took the mean error of blocks.2 / 4 / 8
      / 10 from 0.144 / 0.158 / 0.162 / 0.153 to 0.104 / 0.133 / 0.141 / 0.137 and stem's from 0.068
      to 0.009, at the price of rougher images on the smoothest photos.
    - ``rectifier_slope``: for codes that end in a rectifier (Lite0 ``stem`` and ``head``, ReLU6;
      AlexNet / VGG16 ``relu*`` layers),
      the share of the gradient let through to switched-off units in the direction that switches
      them on (0 = the true gradient, which never wakes a unit the target has on). Values and the
      reported error are unchanged. On ``head`` at 200 steps it took the error from 0.56 to 0.23 (8 photos);
      on AlexNet with random weights (``relu5``, ``relu7``, 3 photos) it changed the error by ≤ 0.005
      (pretrained AlexNet / VGG16 weights are not on this machine to measure).
    - ``rectifier_smoothing``: inside the network (Lite0's ReLU6s), the gradient is that of a
      rectifier with its corners rounded off this far on either side (in pre-activation units;
      0: the true gradient; at most 3), shrinking linearly to 0 by the last step; values and the
      reported error are always the network's own. ``None``: the representation's default
      (``Representation.default_rectifier_smoothing``; 0, the true gradient, with the paper's
      optimizer, which reproduces the paper). Units just off or just saturated still
      get part of the gradient, and the gradient changes gradually as units switch instead of
      jumping, so Adam can take longer steps through the network's kinks. With the default
      objective only (a custom ``objective`` gets the network's true gradient). At 200 steps on the
      8 scikit-image photos it took the mean error of blocks.1 0.086 → 0.047 and blocks.4 0.110 →
      0.085, and at 100 steps blocks.4 0.147 → 0.105. Lite0 computes that gradient by hand, in
      one autograd node, and a step costs about what it does with the true gradient (the README).
    - ``branch_gradient``: with the smoothed gradient (``rectifier_smoothing`` > 0), the share of
      the gradient each residual block's branch (its convolutions) passes back at the first step,
      rising linearly to 1 (the true gradient) as the smoothing width falls to 0; the skip
      connections pass all of theirs, and values and the reported error are the network's own
      (a share below 1 with that gradient turned off, by ``rectifier_smoothing=0`` or the paper's
      optimizer without it, is an error). ``None``: the representation's default (``Representation.default_branch_gradient``; 0.7 at
      Lite0's stride 16, 0.5 at its other layers, 1 for networks the engine does not smooth, and 1
      with the paper's optimizer). A block's skip connection passes a change of the image on
      unaltered, its branch through rectifying convolutions; weighing the skips more steers the
      early steps along the network's most nearly linear paths. On the 8 scikit-image photos
      (CPU) 0.5 took ``head`` at 200 steps 0.129 → 0.113 mean error, blocks.15 0.080 → 0.070,
      and 0.7 blocks.10 at 100 steps 0.135 → 0.130 (the README's table has every layer).
    - ``flat_regions``: for codes where an all-zero cell means an exactly flat image under it
      (HOG, HOGb, DSIFT: ``Representation.zero_means_flat``), the pixels under the target's
      all-zero cells are held flat, one value per connected region (see ``engine.flat``). Only
      with the default objective and no mask. On retina (a clipped black surround) it took the
      HOG / HOGb / DSIFT errors from 0.185 / 0.141 / 0.169 to 0.144 / 0.078 / 0.117 (Table 1).
    - ``colour_basis``: the coordinates of colour Adam takes its per-coordinate steps in, for
      3-channel images; ``None``: the representation's default (``"opponent"``, except ``"rgb"`` at
      Lite0's ``head``, where it measured worse). ``"opponent"``: brightness (the grey axis) and
      two colour-opponent axes, an orthonormal basis, with the colour axes' steps scaled by
      ``chroma_rate``; ``"rgb"``: R, G and B as they are (the engine before this option). Adam
      normalizes each coordinate's step on its own, so in RGB a weak colour component of the
      gradient moved the pixels as far as a strong brightness one, and a large colour gradient
      (the network's first filters are colour-opponent) inflated each channel's second moment and
      slowed its brightness steps.
      Grey photos came back tinted and their error stalled: at ``blocks.4`` (200 steps, 8 grey or
      mostly grey scikit-image photos: camera, moon, coins, grass, gravel, brick, cat, clock) the
      mean error went 0.189 → 0.152, and on the 8 colour photos it fell too, 0.121 → 0.110 (torch
      path, CPU). Only with Adam; the paper's optimizer and one-channel images take steps per channel.
    - ``chroma_rate``: with ``colour_basis="opponent"``, the colour axes' step as a share of the
      brightness axis' (0.5: colour moves at half the rate). 0.3 / 0.4 / 0.5 at ``blocks.4`` read
      0.115 / 0.112 / 0.110 on the colour photos (rocket's blue sky needs its colour: 0.201 /
      0.181 / 0.155) and 0.141 / 0.147 / 0.152 on the grey ones.
    - ``grey``: reconstruct a grey image (one brightness channel shown as R = G = B), for codes
      of grey photos. The code does not say that its photo was grey; reconstructed in colour it
      comes back tinted and its error falls more slowly: at 200 steps on the 7 grey scikit-image
      photos (camera, moon, coins, grass, gravel, brick, clock; 8-bit PNG) the mean error went
      0.166 → 0.142 at ``blocks.4`` (moon 0.160 → 0.103, clock 0.218 → 0.167) and 0.159 → 0.140
      at ``blocks.10``. With Adam the images keep three equal channels that move along the grey
      axis alone (see ``colour_basis``), the same steps as on one grey channel at the colour
      step's cost; the paper's optimizer works on one channel. ``colour_basis`` and
      ``chroma_rate`` then do nothing. Grayscale representations (HOG, HOGb, DSIFT) reconstruct
      grey images anyway.
    - ``momentum``: Adam's first-moment decay β1, or the paper's SGD momentum, from 0 to below 1.
      ``None``: 0.9 with the paper's optimizer (the CVPR code's), with Adam the representation's
      default (``Representation.default_adam_momentum``): Adam's own 0.9, and 0.95 for Lite0
      from stride 8 on, where a longer memory of the gradient took the 200-step error of every
      layer measured lower (8 photos: blocks.4 0.086 → 0.080, blocks.15 0.097 → 0.080, ``head``
      0.142 → 0.129 mean; the README's table has every layer).
    - ``polish``: rounds of 8-bit polishing after the last step (``engine.polish``): the result is
      rounded to 8 bits, as a PNG stores it, and searched on that grid, one level at a time, block
      by block, keeping only moves that lower the true feature error. The result is then exactly
      what a PNG holds, and its error the PNG's. ``None``: the representation's default, 2.5 rounds
      per step for HOG and HOGb, 10 for DSIFT, none for CNN codes. Only with the default objective and
      spatial codes; a stopped run is not polished.
    """

    iters: int | None = None
    optimizer: OptimizerName = "adam"
    lr: float | None = None
    tv_weight: float | None = None
    tv_start: float | None = None
    tv_beta: float = 2.0
    tv_chroma: float | None = None
    alpha_weight: float = 1e-4
    alpha: float = 6.0
    jitter: int = 0
    seed: int = 0
    pyramid_levels: int | None = None
    rectifier_slope: float = 0.7
    rectifier_smoothing: float | None = None
    branch_gradient: float | None = None
    feature_power: float | None = None
    start_noise: float | None = None
    flat_regions: bool = True
    polish: int | None = None
    colour_basis: ColourBasis | None = None
    chroma_rate: float = 0.5
    grey: bool = False
    momentum: float | None = None

    def __post_init__(self) -> None:
        # numpy and other numbers as plain Python ones (values stay JSON-able in the metrics).
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, item.name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                object.__setattr__(self, item.name, float(value))

        def finite(name: str, value: float | None, positive: bool = False, optional: bool = True) -> None:
            if value is None:
                if not optional:
                    raise ValueError(f"{name} must be a number, got None")
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value}")

        def integer(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
                maximum is not None and value > maximum
            ):
                bound = f"from {minimum} to {maximum}" if maximum is not None else f"≥ {minimum}"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.colour_basis is not None and self.colour_basis not in COLOUR_BASES:
            raise ValueError(f"unknown colour basis {self.colour_basis!r}; choose one of {', '.join(COLOUR_BASES)}")
        if self.iters is not None:
            integer("iters", self.iters, 1)
        if self.pyramid_levels is not None:
            integer("pyramid_levels", self.pyramid_levels, 1, 8)
        integer("jitter", self.jitter, 0)
        if self.polish is not None:
            integer("polish", self.polish, 0, MAX_POLISH)
        integer("seed", self.seed, 0, MAX_SEED)
        finite("lr", self.lr, positive=True)
        if self.lr is not None and self.lr > MAX_LR:
            raise ValueError(f"lr must be at most {MAX_LR:g}, got {self.lr:g}")
        finite("tv_weight", self.tv_weight)
        finite("tv_start", self.tv_start, positive=True)
        finite("tv_beta", self.tv_beta, positive=True, optional=False)
        finite("tv_chroma", self.tv_chroma)
        finite("alpha_weight", self.alpha_weight, optional=False)
        finite("alpha", self.alpha, positive=True, optional=False)
        for name, exponent in (("tv_beta", self.tv_beta), ("alpha", self.alpha)):
            if exponent > MAX_EXPONENT:
                raise ValueError(f"{name} must be at most {MAX_EXPONENT}, got {exponent}")
        finite("feature_power", self.feature_power, positive=True)
        finite("start_noise", self.start_noise)
        finite("chroma_rate", self.chroma_rate, positive=True, optional=False)
        finite("momentum", self.momentum)
        if self.momentum is not None and self.momentum >= 1:
            raise ValueError(f"momentum must be below 1, got {self.momentum}")
        check_rectifier_slope(self.rectifier_slope)
        if self.rectifier_smoothing is not None:
            check_smoothing(self.rectifier_smoothing)
        if self.branch_gradient is not None:
            check_slope("branch_gradient", self.branch_gradient)
            smoothing_off = self.rectifier_smoothing == 0 or (self.rectifier_smoothing is None and self.optimizer == "paper")
            if smoothing_off and self.branch_gradient != 1:
                raise ValueError(
                    "branch_gradient acts through the smoothed gradient, which "
                    + ("rectifier_smoothing=0" if self.rectifier_smoothing == 0 else 'optimizer="paper"')
                    + " turns off; give rectifier_smoothing above 0 too"
                )
        if not isinstance(self.flat_regions, bool):
            raise ValueError(f"flat_regions must be True or False, got {self.flat_regions!r}")  # noqa: TRY004
        if not isinstance(self.grey, bool):
            raise ValueError(f"grey must be True or False, got {self.grey!r}")  # noqa: TRY004

    def resolved(self, rep: Representation) -> Settings:
        """These settings with every ``None`` replaced by the representation's default."""
        paper = self.optimizer == "paper"
        iters = self.iters if self.iters is not None else rep.default_iters()
        smoothing = (
            self.rectifier_smoothing
            if self.rectifier_smoothing is not None
            else 0.0 if paper else rep.default_rectifier_smoothing()
        )
        return replace(
            self,
            iters=iters,
            lr=self.lr if self.lr is not None else (PAPER_LR if paper else rep.default_adam_lr() or ADAM_LR),
            tv_weight=self.tv_weight if self.tv_weight is not None else rep.default_tv_weight(),
            tv_start=self.tv_start if self.tv_start is not None else rep.default_tv_start(iters),
            rectifier_smoothing=smoothing,
            branch_gradient=(
                self.branch_gradient
                if self.branch_gradient is not None
                else 1.0 if paper or smoothing == 0 else rep.default_branch_gradient()
            ),
            tv_chroma=self.tv_chroma if self.tv_chroma is not None else rep.default_tv_chroma(),
            feature_power=self.feature_power if self.feature_power is not None else (2.0 if paper else 1.0),
            pyramid_levels=self.pyramid_levels if self.pyramid_levels is not None else rep.default_pyramid_levels(),
            start_noise=self.start_noise if self.start_noise is not None else rep.default_start_noise(),
            polish=self.polish if self.polish is not None else rep.default_polish(iters),
            colour_basis=self.colour_basis or rep.default_colour_basis(),
            momentum=(
                self.momentum
                if self.momentum is not None
                else PAPER_MOMENTUM if paper else rep.default_adam_momentum()
            ),
        )


#: Largest seed: the jitter's generator takes ``seed + 1``, and larger seeds would alias smaller ones.
MAX_SEED = 2**32 - 2
#: Largest learning rate: far beyond any that converges (the paper's base rate is 50), and well
#: inside float32's range, which torch's optimizers need.
MAX_LR = 1e12
#: Most polishing rounds (``Settings.polish``).
MAX_POLISH = 100_000
#: Largest TV β and α: beyond, the priors' normalization ``1 / scale^exponent`` nears float32's range.
MAX_EXPONENT = 16.0
#: Adam's base rate on CNN codes. With the default feature_power 1, 0.03 beat 0.05 and 0.08 at 200
#: steps on every Lite0 layer swept (blocks.2 to head, 8 photos; mean error 0.003-0.011 lower).
#: Lite0's deepest layers take lower rates (``EfficientNetLite0.default_adam_lr``).
ADAM_LR = 0.03
#: Adam's second-moment decay (torch's default).
ADAM_BETA2 = 0.999
#: Standard deviation of the start images' noise around the mean pixel where there is noise (HOG,
#: HOGb and DSIFT by default, and ``restarts``); see ``Settings.start_noise``.
START_NOISE = 0.05
#: Base rate of the CVPR schedule for [0, 1] pixels and the normalized loss (the CVPR code's 0.004
#: is for 0–255 pixels and un-normalized priors). Picked from 0.5–500 on Lite0 blocks.4/12 at 112².
PAPER_LR = 50.0
#: The CVPR code's SGD momentum, ``Settings.momentum`` with the paper's optimizer.
PAPER_MOMENTUM = 0.9
#: CVPR schedule: fractions of the run and the learning-rate multiplier of each (100/200/100 of 400).
PAPER_SCHEDULE = ((0.25, 1.0), (0.5, 0.1), (0.25, 0.01))
#: The final fraction of steps run without jitter, so the result is aligned with the target.
UNJITTERED_FRACTION = 0.2


@dataclass
class Step:
    """What ``on_step`` receives after each step. ``images`` is the live tensor: copy to keep it.

    ``total`` counts the steps and the polishing rounds after them (``Settings.polish``), of
    which there are ``rounds``; a polishing round has ``polishing`` set and no ``terms``, only the
    ``feature_error``.
    """

    step: int
    total: int
    terms: dict[str, list[float]]
    feature_error: list[float]
    images: Tensor
    seconds: float
    polishing: bool = False
    rounds: int = 0


@dataclass
class InversionResult:
    """Reconstructions ``images`` ``(B, 3, H, W)`` in [0, 1] on the CPU, with how they were made.

    ``history[term][step][b]`` is the weighted value of each loss term per step and image;
    ``feature_error[b]`` the final ``‖Φ(x) − Φ0‖ / ‖Φ0‖`` (masked entries only when a mask is given);
    ``polished`` the rounds of 8-bit polishing done after the ``steps`` (``Settings.polish``).
    """

    images: Tensor
    feature_error: list[float]
    history: dict[str, list[list[float]]]
    settings: Settings
    seconds: float
    steps: int
    stopped: bool = False
    spec: str = ""
    polished: int = 0

    @property
    def image(self) -> Tensor:
        """The first reconstruction, ``(3, H, W)``."""
        return self.images[0]

    def metrics(self) -> dict[str, object]:
        return {
            "rep": self.spec,
            "iters": self.steps,
            "polished": self.polished,
            "seconds": self.seconds,
            "stopped": self.stopped,
            "feature_error": self.feature_error,
            "settings": asdict(self.settings),
        }


def polishing(rep: Representation, settings: Settings) -> int:
    """Rounds of 8-bit polishing a default-objective run of ``rep`` with ``settings`` does after its
    steps: ``Settings.polish`` (or the representation's default), for spatial codes only."""
    if not rep.is_spatial:
        return 0
    rounds = settings.resolved(rep).polish
    assert rounds is not None
    return rounds


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; ``last_good`` holds the last finite images ``(B, 3, H, W)``."""

    def __init__(self, step: int, last_good: Tensor) -> None:
        super().__init__(
            f"inversion diverged at step {step} (loss is NaN or infinite); "
            "try a smaller learning rate or a larger TV weight"
        )
        self.step = step
        self.last_good = last_good


def default_objective(
    rep: Representation, target: Tensor, mask: Tensor | None, settings: Settings, size: tuple[int, int]
) -> Objective:
    """``match + tv_weight · TV^β + alpha_weight · α-norm`` as the paper sets it up.

    With a spatial mask the data term pulls only on the selected cells' receptive field, with
    gradients as strong as a whole image's would be, while TV is averaged over the whole image;
    the TV weight is scaled by image area / receptive-field area to keep the same balance.
    """
    assert settings.tv_weight is not None and settings.tv_chroma is not None and settings.feature_power is not None, (
        "resolve the settings first"
    )
    tv_weight = settings.tv_weight * _masked_area_ratio(rep, mask, target, size)
    return (
        match(rep, target, mask, rectifier_slope=settings.rectifier_slope, power=settings.feature_power)
        + tv_weight * tv(settings.tv_beta, settings.tv_chroma)
        + settings.alpha_weight * alpha_norm(settings.alpha)
    )


def _masked_area_ratio(rep: Representation, mask: Tensor | None, target: Tensor, size: tuple[int, int]) -> float:
    """Image area over the receptive-field area of the mask's selected cells (1 without a mask)."""
    if mask is None or target.dim() != 4 or not rep.is_spatial:
        return 1.0
    height, width = size
    cells = mask.expand(torch.broadcast_shapes(mask.shape, target.shape)).flatten(0, 1).any(0)
    rows = torch.nonzero(cells.any(1)).flatten()
    cols = torch.nonzero(cells.any(0)).flatten()
    box = rep.receptive_field(
        (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1), height, width
    )
    return height * width / max(box.height * box.width, 1)


def random_start(
    batch: int, channels: int, height: int, width: int, seed: int, deviation: float = START_NOISE, grey: bool = False
) -> Tensor:
    """Seeded start images ``(B, C, H, W)``: the mean pixel plus Gaussian noise of ``deviation``;
    with ``grey`` (or one channel) the mean pixel's brightness plus the same noise in every channel."""
    generator = torch.Generator().manual_seed(seed)
    if grey or channels == 1:
        noise = torch.randn(batch, 1, height, width, generator=generator) * deviation
        return (noise + torch.tensor(MEAN_PIXEL).mean()).clamp(0, 1).expand(-1, channels, -1, -1).contiguous()
    noise = torch.randn(batch, channels, height, width, generator=generator) * deviation
    return (noise + torch.tensor(MEAN_PIXEL).view(3, 1, 1)).clamp(0, 1)


def image_channels(rep: Representation, settings: Settings) -> int:
    """Channels of the images the engine optimizes: 1 (grey, shown as RGB) for grayscale
    representations and for ``settings.grey`` without Adam, else 3 (``settings.grey`` with Adam:
    grey RGB images that Adam moves along the grey axis only, see ``colour_basis``)."""
    return 1 if rep.grayscale or (settings.grey and settings.optimizer != "adam") else 3


def colour_basis(settings: Settings, channels: int) -> Tensor | None:
    """The 3 × 3 basis Adam steps in (``basis[r, k]``: colour r of axis k; see
    ``Settings.colour_basis``), or ``None`` for steps per channel. With ``settings.grey``: the grey
    axis alone.

    Columns: the grey axis ``(1, 1, 1)/√3`` and the colour-opponent axes ``(1, −1, 0)/√2`` (red
    against green) and ``(1, 1, −2)/√6`` (yellow against blue), these two times ``chroma_rate``.
    Adam on coordinates ``p`` of levels ``x = basis @ p`` sees the gradient ``basis.T @ g`` and moves
    ``x`` by ``basis @ d`` for its step ``d``.
    """
    if settings.optimizer != "adam" or channels != 3:
        return None
    if settings.grey:
        # Only the grey axis, unnormalized: Adam sees R + G + B and moves each channel as far, the
        # steps it takes on one grey channel (the kernels' fast 3-channel path, same results).
        return torch.tensor([[1.0, 0.0, 0.0]] * 3)
    if settings.colour_basis != "opponent":
        return None
    axes = torch.tensor(
        [[1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6)],
         [1 / math.sqrt(3), -1 / math.sqrt(2), 1 / math.sqrt(6)],
         [1 / math.sqrt(3), 0.0, -2 / math.sqrt(6)]],
        dtype=torch.float64,
    )  # fmt: skip
    return (axes * torch.tensor([1.0, settings.chroma_rate, settings.chroma_rate], dtype=torch.float64)).float()


class ColourAdam(torch.optim.Optimizer):
    """``torch.optim.Adam`` (no weight decay) on the coordinates of ``(B, 3, H, W)`` parameters in
    a colour ``basis`` (see ``colour_basis``): the torch path's twin of the native kernels'."""

    def __init__(self, params: list[Tensor], basis: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.basis = basis.to(params[0])

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["first"] = torch.zeros_like(param)
                    state["second"] = torch.zeros_like(param)
                state["step"] += 1
                grad = torch.einsum("rk,brhw->bkhw", self.basis, param.grad)
                first, second = state["first"], state["second"]
                first.lerp_(grad, 1 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                size = group["lr"] / (1 - beta1 ** state["step"])
                root = math.sqrt(1 - beta2 ** state["step"])
                move = first / (second.sqrt() / root + group["eps"]) * size
                param.sub_(torch.einsum("rk,bkhw->brhw", self.basis, move))


def _upsample_adjoint_axis(grad: Tensor, dim: int) -> Tensor:
    """Adjoint of 2× bilinear upsampling (``align_corners=False``) along ``dim`` of even length.

    Output ``2i`` is ``¾ c[i] + ¼ c[i−1]``, output ``2i+1`` is ``¾ c[i] + ¼ c[i+1]`` (indices clamped
    at the borders), so ``c[i]`` collects ``¾`` of both its outputs and ``¼`` of each neighbour's.
    """
    cells = grad.shape[dim] // 2
    shape = list(grad.shape)
    shape[dim : dim + 1] = [cells, 2]
    pairs = grad.reshape(shape)
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    out = torch.add(even, odd).mul_(0.75)
    if cells > 1:
        out.narrow(dim, 0, cells - 1).add_(even.narrow(dim, 1, cells - 1), alpha=0.25)
        out.narrow(dim, 1, cells - 1).add_(odd.narrow(dim, 0, cells - 1), alpha=0.25)
    out.narrow(dim, 0, 1).add_(even.narrow(dim, 0, 1), alpha=0.25)
    out.narrow(dim, cells - 1, 1).add_(odd.narrow(dim, cells - 1, 1), alpha=0.25)
    return out


class _Upsample(torch.autograd.Function):
    """2× bilinear upsampling of ``(B, C, h, w)``, cropped to ``(H, W)`` (``H`` is ``2h`` or ``2h − 1``).

    Torch's own backward of bilinear upsampling costs twice its forward on the CPU; the adjoint of
    the fixed 2× stencil, written with strided slices, takes a third of that (the pyramid pays it
    every step at full resolution).
    """

    @staticmethod
    def forward(ctx: Any, coarse: Tensor, height: int, width: int) -> Tensor:
        ctx.height, ctx.width = height, width
        return F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[..., :height, :width]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        rows, cols = 2 * math.ceil(ctx.height / 2), 2 * math.ceil(ctx.width / 2)
        if (rows, cols) != (ctx.height, ctx.width):
            grad = F.pad(grad, (0, cols - ctx.width, 0, rows - ctx.height))
        return _upsample_adjoint_axis(_upsample_adjoint_axis(grad, 3), 2), None, None


class _Pyramid:
    """An image ``(B, C, H, W)`` as a sum of ``levels`` resolutions, each half the size of the last.

    Composed coarse to fine (``l0 + up(l1 + up(l2 + …))``) so only one upsampling per level is paid,
    at that level's own size. ``levels=1`` is plain pixels. With ``native`` the composition and its
    adjoint run in the fused CPU kernels and the levels carry no autograd graph.
    """

    def __init__(self, start: Tensor, levels: int, native: bool = False, basis: Tensor | None = None) -> None:
        batch, channels, height, width = start.shape
        self.levels = [start.clone().contiguous().requires_grad_(not native)]
        for level in range(1, levels):
            size = (math.ceil(height / 2**level), math.ceil(width / 2**level))
            if min(size) < 2:
                break
            self.levels.append(start.new_zeros(batch, channels, *size).requires_grad_(not native))
        # Natively: the levels' Adam moments and the kernels' buffers (see _native.Levels).
        self.fused = _native.Levels(self.levels, MEAN_PIXEL, basis) if native else None
        self.basis = basis  # the colour basis Adam steps in (Settings.colour_basis), None: per channel

    def compose(self) -> Tensor:
        image = self.levels[-1]
        for level in reversed(self.levels[:-1]):
            upsampled: Tensor = _Upsample.apply(image, *level.shape[-2:])
            image = level + upsampled
        return image

    def image(self) -> Tensor:
        """The composed image, clamped to [0, 1] with the gradient of the unclamped composition.

        The clamp is made exact by moving the excess into the finest level, so the returned tensor
        is precisely the composition of the corrected levels (a projection onto valid images), at
        the cost of one composition per step. Natively it is a new tensor without a graph.
        """
        if self.fused is not None:
            return self.fused.compose()
        raw = self.compose()
        with torch.no_grad():
            excess = raw.clamp(0, 1) - raw
            self.levels[0] += excess
        # With one level ``raw`` is the finest level itself, already corrected in place.
        return raw if raw is self.levels[0] else raw + excess


def _betas(settings: Settings) -> tuple[float, float]:
    """Adam's ``(β1, β2)``: the settings' momentum (the paper's SGD takes β1 as its momentum) and
    Adam's own second-moment decay."""
    assert settings.momentum is not None
    return settings.momentum, ADAM_BETA2


def _learning_rate(settings: Settings, step: int) -> float:
    assert settings.lr is not None and settings.iters is not None
    progress = step / settings.iters
    if settings.optimizer == "paper":
        edge = 0.0
        for fraction, multiplier in PAPER_SCHEDULE:
            edge += fraction
            if progress < edge:
                return settings.lr * multiplier
        return settings.lr * PAPER_SCHEDULE[-1][1]
    # Adam: cosine decay to 5% of the base rate gives fast progress then fine detail.
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _feature_errors(objective: Objective) -> Callable[[dict[str, list[float]]], list[float]]:
    """Per-image relative feature error from a step's term values (empty without a feature term)."""
    term = next(((weight, fn) for name, weight, fn in objective.terms if name == "feature"), None)
    if term is None:
        return lambda values: []
    weight, fn = term
    to_error = fn.feature_error if isinstance(fn, FeatureMatch) else lambda v: math.sqrt(max(v, 0.0))
    return lambda values: [to_error(v / weight) for v in values.get("feature", [])]


def _tv_terms(objective: Objective) -> list[str]:
    """Names of the objective's TV terms (those the TV schedule scales)."""
    return [name for name, _, fn in objective.terms if isinstance(fn, PixelPrior) and fn.kind == "tv"]


Stepper = Callable[[int, float, float], tuple[Tensor, dict[str, list[float]]]]


def _torch_stepper(
    pyramid: _Pyramid,
    objective: Objective,
    settings: Settings,
    view: Callable[[Tensor], Tensor],
    shifted: Callable[[Tensor, int], Tensor],
    check: Callable[[dict[str, list[float]], int], None],
) -> Stepper:
    """One step with autograd and a torch optimizer: ``(step, rate, TV factor) → (images, term values)``."""
    optimizer: torch.optim.Optimizer
    betas = _betas(settings)
    if settings.optimizer == "paper":
        optimizer = torch.optim.SGD(pyramid.levels, lr=_learning_rate(settings, 0), momentum=betas[0])
    elif pyramid.basis is not None:
        optimizer = ColourAdam(pyramid.levels, pyramid.basis, lr=_learning_rate(settings, 0), betas=betas)
    else:
        # The fused kernel does the whole update in one pass: a third of the default's cost.
        optimizer = torch.optim.Adam(pyramid.levels, lr=_learning_rate(settings, 0), betas=betas, fused=True)

    tv_names = _tv_terms(objective)

    def take_step(step: int, rate: float, tv_factor: float) -> tuple[Tensor, dict[str, list[float]]]:
        if settings.optimizer == "paper" and rate != optimizer.param_groups[0]["lr"]:
            optimizer.state.clear()  # the CVPR code resets momentum when the rate changes
        for group in optimizer.param_groups:
            group["lr"] = rate
        images = view(pyramid.image())
        terms = objective.evaluate(Context(shifted(images, step)), dict.fromkeys(tv_names, tv_factor))
        values = term_values(terms)
        check(values, step)
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(terms.values())).sum(0).sum().backward()
        optimizer.step()
        return images.detach(), values

    return take_step


def _native_stepper(
    pyramid: _Pyramid,
    objective: Objective,
    view: Callable[[Tensor], Tensor],
    shifted: Callable[[Tensor, int], Tensor],
    check: Callable[[dict[str, list[float]], int], None],
    fused_priors: bool,
    network: Representation | None,
    betas: tuple[float, float],
) -> Stepper:
    """One Adam step with the fused CPU kernels around the network: autograd only for the terms
    that need it (the data term), then one kernel call for the pixel priors' values and gradients
    (RGB images; they see the unjittered image, which differs from jittered TV only at the wrap
    seam), each pyramid level's gradient and Adam on every level.

    With ``network`` (given only where the image reaches it unshifted) and when the remaining
    terms all match codes of it and it has an ``input_layout``, the kernels also write the
    network's prepared input and take its gradient back (``Levels.attach_input``)."""
    priors: dict[str, tuple[str, float, PixelPrior]] = {}
    for name, weight, fn in objective.terms:
        if fused_priors and isinstance(fn, PixelPrior) and fn.kind not in priors and weight != 0.0:
            priors[fn.kind] = (name, weight, fn)
    fused = {name for name, _, _ in priors.values()}
    rest = Objective(tuple(term for term in objective.terms if term[0] not in fused))
    levels = pyramid.fused
    assert levels is not None, "a native stepper needs a native pyramid"
    ones = torch.ones(pyramid.levels[0].shape[0])
    tv_names = _tv_terms(rest)
    # An absent prior has weight 0, which the kernel skips.
    tv_name, tv_weight, tv_prior = priors.get("tv", ("", 0.0, PixelPrior("tv", 2.0)))
    alpha_name, alpha_weight, alpha_prior = priors.get("alpha", ("", 0.0, PixelPrior("alpha", 6.0)))
    alpha_scale = alpha_weight * alpha_prior.scale
    layout = None
    if network is not None and rest.terms and all(
        isinstance(fn, FeatureMatch) and fn.rep is network for _, _, fn in rest.terms
    ):
        layout = network.input_layout(*pyramid.levels[0].shape[-2:])
    prepared = levels.attach_input(layout) if layout is not None else None

    def gradients(step: int, tv_factor: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The image, the gradient ``update`` takes and the remaining terms' values."""
        if prepared is None:
            images = pyramid.image().requires_grad_(True)
            context = Context(shifted(view(images), step))
        else:
            assert network is not None
            images = pyramid.image()  # also written into ``prepared``
            context = Context(images, prepared=(network, prepared))
        terms = rest.evaluate(context, dict.fromkeys(tv_names, tv_factor))
        source = images if prepared is None else prepared
        if not terms:
            return images, torch.zeros_like(source), terms
        total = next(iter(terms.values())) if len(terms) == 1 else torch.stack(list(terms.values())).sum(0)
        # ∂(Σ_b total_b)/∂total_b = 1, without a sum operation; the gradient as the network leaves it.
        (grad,) = torch.autograd.grad(total, source, ones)
        return images.detach(), grad, terms

    def take_step(step: int, rate: float, tv_factor: float) -> tuple[Tensor, dict[str, list[float]]]:
        images, grad, terms = gradients(step, tv_factor)
        found = term_values(terms)
        tv_scale = tv_weight * tv_factor * tv_prior.scale
        priors_setting = (tv_scale, tv_prior.exponent, tv_prior.chroma, TV_EPSILON, alpha_scale, alpha_prior.exponent)
        # One call: the priors' gradients into ``grad``, each level's gradient, Adam on every level.
        tv_values, alpha_values = levels.update(
            images, grad.contiguous() if prepared is None else grad, rate, priors_setting, betas
        )
        if tv_name:
            found[tv_name] = [value * tv_scale for value in tv_values]
        if alpha_name:
            found[alpha_name] = [value * alpha_scale for value in alpha_values]
        values = {name: found[name] for name in objective.names if name in found}
        check(values, step)
        return view(images), values

    return take_step


def _check_image(image: object) -> None:
    """``ValueError`` unless ``image`` is a float ``(3, H, W)`` tensor of finite values in [0, 1]."""
    if not isinstance(image, Tensor):
        hint = " (invviz.load_image makes one from a file or an array)"
        raise ValueError(f"image must be a torch tensor (3, H, W) in [0, 1], got {type(image).__name__}{hint}")  # noqa: TRY004
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point with values in [0, 1], got {image.dtype} (divide 8-bit pixels by 255)")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image has NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        raise ValueError(f"image values must be in [0, 1], got {low:g} to {high:g}")


def _check_size(size: object) -> tuple[int, int]:
    """``(H, W)`` as positive integers, else a ``ValueError``."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and int(n) >= 1 for n in size)
    ):
        raise ValueError(f"size must be (height, width) in pixels, two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _smoothing(settings: Settings, step: int) -> tuple[float, float]:
    """``rectifier_smoothing`` at step 0, shrinking linearly to 0 at the last step, and
    ``branch_gradient``, rising linearly to 1 with it."""
    assert settings.iters is not None and settings.rectifier_smoothing is not None
    assert settings.branch_gradient is not None
    left = 1.0 - step / max(settings.iters, 1)
    return settings.rectifier_smoothing * left, 1.0 - (1.0 - settings.branch_gradient) * left


def _tv_factor(settings: Settings, step: int) -> float:
    """``tv_start`` at step 0, falling geometrically to 1 at the last step."""
    assert settings.iters is not None and settings.tv_start is not None
    return float(settings.tv_start ** (1.0 - step / max(settings.iters - 1, 1)))


def invert(
    rep: Representation,
    image: Tensor | None = None,
    *,
    target: Tensor | None = None,
    size: tuple[int, int] | None = None,
    mask: Tensor | None = None,
    settings: Settings | None = None,
    objective: Objective | None = None,
    batch: int = 1,
    init: Tensor | None = None,
    device: str | torch.device = "auto",
    on_step: Callable[[Step], None] | None = None,
    stop: StopSignal | None = None,
) -> InversionResult:
    """Reconstruct images from a code.

    - ``image`` ``(3, H, W)`` in [0, 1]: the target is its code (``rep(image)``). Otherwise give
      ``target`` (the code, ``(C, ...)`` or ``(B, C, ...)``) and ``size`` ``(H, W)``.
    - ``mask``: boolean, broadcastable to the code ``(B, C, H', W')``; only selected entries count.
    - ``batch``: reconstructions optimized at once (random restarts, or one per mask/target row).
      Restarts of one target and mask start from noise of at least ``START_NOISE`` unless
      ``settings.start_noise`` is given, so that they differ; rows with their own targets or masks
      start as the representation's default does.
    - ``objective``: replaces the default ``match + TV + α`` objective (then ``target``/``mask``
      are only used for the reported feature error).
    - ``on_step`` is called after every step; ``stop.is_set()`` ends the run early (``stopped``).
    """
    settings = settings or Settings()
    if not isinstance(settings, Settings):
        raise ValueError(f"settings must be an invviz.Settings, got {type(settings).__name__}")  # noqa: TRY004
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch (number of restarts) must be an integer ≥ 1, got {batch!r}")
    batch = int(batch)
    dev = resolve_device(device)
    rep = rep.to(dev)
    if image is not None:
        _check_image(image)
        height, width = image.shape[1:]
        given = target is not None
        if target is None:
            target = rep.code_of(image.to(dev, torch.float32)[None])
    elif target is None or size is None:
        raise ValueError("give an image, or a target code together with the image size")
    else:
        height, width = _check_size(size)
        given = True
    if not isinstance(target, Tensor) or not target.is_floating_point():
        kind = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must be a floating-point tensor (a code), got {kind}")
    target = target.to(dev, torch.float32)
    # A code is (C, H', W') or (D,): add the batch dimension if the target lacks it.
    if target.dim() == (3 if rep.is_spatial else 1):
        target = target[None]
    code_shape = tuple(target.shape[1:])
    expected = tuple(rep.code_shape(height, width)) if given else code_shape
    if code_shape != expected:
        raise ValueError(
            f"target code {tuple(target.shape)} does not fit {rep.spec} at {height}×{width}: its code is {expected}"
        )
    if not bool(torch.isfinite(target).all()):
        raise ValueError("the target code has NaN or infinite entries")
    if target.shape[0] not in (1, batch):
        raise ValueError(f"the target has {target.shape[0]} codes but batch is {batch}: give one code, or one per row")
    if mask is not None:
        mask = check_mask(mask, code_shape, batch)
        mask = mask.to(dev, torch.bool)
    selected = target if mask is None else target * mask
    if not bool(selected.flatten(1).ne(0).any(1).all()):
        where = " in the mask" if mask is not None else ""
        raise ValueError(
            f"the target code is all zero{where}: nothing to match (the error is relative to its size); "
            "e.g. a flat image's HOG or SIFT, or a layer whose units are all off at this image size"
        )
    if init is not None and (not isinstance(init, Tensor) or not bool(torch.isfinite(init).all())):
        raise ValueError("init must be a tensor of finite values")
    explicit_noise = settings.start_noise is not None
    settings = settings.resolved(rep)
    per_row_mask = mask is not None and mask.dim() > len(code_shape) and mask.shape[0] > 1
    if batch > 1 and target.shape[0] == 1 and not per_row_mask and not explicit_noise and init is None:
        # Random restarts of one target: their starts must differ, whatever the representation's
        # default. Rows with their own targets or masks keep it (they differ anyway).
        settings = replace(settings, start_noise=max(settings.start_noise or 0.0, START_NOISE))
    assert settings.iters is not None and settings.pyramid_levels is not None and settings.start_noise is not None
    scheduled = objective is None  # a custom objective keeps its own weights
    objective = objective or default_objective(rep, target, mask, settings, (height, width))

    channels = image_channels(rep, settings)
    if init is not None and settings.grey and init.dim() == 4 and init.shape[1] == 3:
        # A colour start for a grey inversion: its brightness.
        init = init.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
    start = init if init is not None else random_start(
        batch, channels, height, width, settings.seed, settings.start_noise, grey=settings.grey
    )
    if start.shape[1:] != (channels, height, width) or start.shape[0] != batch:
        raise ValueError(f"init must be {(batch, channels, height, width)}, got {tuple(start.shape)}")
    start = start.to(dev, torch.float32)
    # The fused CPU kernels do the same arithmetic as the torch path in a fraction of the time.
    native = dev.type == "cpu" and settings.optimizer == "adam" and _native.usable(start)
    pyramid = _Pyramid(start, settings.pyramid_levels, native, colour_basis(settings, channels))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    jittered_steps = round(settings.iters * (1 - UNJITTERED_FRACTION))
    polish_rounds = polishing(rep, settings) if scheduled else 0
    total = settings.iters + polish_rounds
    flat = (
        FlatRegions.from_target(rep, target, batch, height, width)
        if settings.flat_regions and scheduled and mask is None
        else None
    )

    def view(x: Tensor) -> Tensor:
        """The image the objective sees and the caller gets: flat regions tied, RGB."""
        if flat is not None:
            x = flat.project(x)
        return x.expand(-1, 3, -1, -1) if channels == 1 else x

    def shifted(x: Tensor, step: int) -> Tensor:
        if not settings.jitter or step >= jittered_steps:
            return x
        dy, dx = torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))

    with torch.no_grad():
        last_good = view(pyramid.image())

    def check(values: dict[str, list[float]], step: int) -> None:
        if not all(math.isfinite(v) for per_image in values.values() for v in per_image):
            raise DivergenceError(step + 1, last_good.cpu())

    take_step: Stepper
    if native:
        # The kernels prepare the network's input themselves where the image reaches it unshifted.
        network = rep if channels == 3 and not settings.jitter else None
        take_step = _native_stepper(pyramid, objective, view, shifted, check, channels == 3, network, _betas(settings))
    else:
        take_step = _torch_stepper(pyramid, objective, settings, view, shifted, check)

    smoothed_backward = _native.smoothed_relu6_backward_for_run()
    feature_errors = _feature_errors(objective)
    history: dict[str, list[list[float]]] = {name: [] for name in objective.names}
    began = time.perf_counter()
    steps = 0
    stopped = False
    for step in range(settings.iters):
        if stop is not None and stop.is_set():
            stopped = True
            break
        tv_factor = _tv_factor(settings, step) if scheduled else 1.0
        smoothing, branch = _smoothing(settings, step) if scheduled else (0.0, 1.0)
        with rectifier_smoothing(smoothing, smoothed_backward, branch):
            last_good, values = take_step(step, _learning_rate(settings, step), tv_factor)
        steps = step + 1
        for name, per_image in values.items():
            history[name].append(per_image)
        if on_step is not None:
            on_step(
                Step(
                    step=steps,
                    total=total,
                    terms=values,
                    feature_error=feature_errors(values),
                    images=last_good,
                    seconds=time.perf_counter() - began,
                    rounds=polish_rounds,
                )
            )
    with torch.no_grad():
        images = view(pyramid.image()) if steps and not stopped else last_good
    polished = 0
    if polish_rounds and steps and not stopped:

        def on_round(done: int, polishing: Tensor, errors: list[float]) -> bool:
            if on_step is not None:
                seconds = time.perf_counter() - began
                on_step(Step(steps + done, total, {}, errors, polishing, seconds, polishing=True, rounds=polish_rounds))
            return stop is not None and stop.is_set()

        frozen = None if flat is None else (flat.ids > 0).view(-1, height, width)
        images, polished = polish(
            rep, images, target, polish_rounds, mask=mask, frozen=frozen, seed=settings.seed, on_round=on_round,
            grey=settings.grey,
        )
        stopped = polished < polish_rounds
    with torch.no_grad():
        error = feature_error_squared(rep(images), target, mask).sqrt().cpu().tolist()
    if not all(math.isfinite(e) for e in error):
        raise DivergenceError(steps, last_good.cpu())
    return InversionResult(
        images=images.cpu(),
        feature_error=error,
        history=history,
        settings=settings,
        seconds=time.perf_counter() - began,
        steps=steps,
        stopped=stopped,
        spec=rep.spec,
        polished=polished,
    )
