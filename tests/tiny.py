"""A hand-built tiny conv net with fixed weights, registered as a representation for tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from invviz.representations import Representation, Window, register_representation


@register_representation("tiny")
class TinyNet(Representation):
    """conv 3×3 (3→4, pad 1) → ReLU → conv 3×3 stride 2 (4→6, no pad); layers ``conv1``, ``relu1``, ``conv2``."""

    layers = ("conv1", "relu1", "conv2")
    native_size = 16

    def __init__(self, layer: str, seed: int = 0) -> None:
        super().__init__(layer)
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def windows(self) -> Sequence[Window]:
        chain = [Window(3, 1, 1), Window(3, 2, 0)]
        return chain[: 1 if self.layer in ("conv1", "relu1") else 2]

    @property
    def ends_in_rectifier(self) -> bool:
        return self.layer == "relu1"

    def pre_rectifier(self, images: Tensor) -> tuple[Tensor, float, float] | None:
        return (self.conv1(images * 2 - 1), 0.0, math.inf) if self.layer == "relu1" else None

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images * 2 - 1)
        if self.layer == "conv1":
            return x
        x = torch.relu(x)
        if self.layer == "relu1":
            return x
        return self.conv2(x)
