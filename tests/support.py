"""Helpers shared by the tests (imported as ``from support import ...``)."""

from __future__ import annotations

import torch

from torch import Tensor, nn

from invviz.representations import Box, Representation, Window


def gradient_support(
    rep: Representation,
    row: int | tuple[int, int],
    col: int | tuple[int, int],
    height: int,
    width: int,
    trials: int = 3,
) -> Box:
    """Bounding box of the input pixels with a non-zero gradient of code cell ``(row, col)``
    (or of a window of cells: half-open ranges ``(start, stop)``, as ``receptive_field`` takes).

    The union over a few random inputs, so that a pixel whose path is gated off (ReLU) for one
    input still counts. float64 so that tiny contributions are not lost to rounding.
    """
    rep = rep.double()
    torch.manual_seed(0)
    rows, cols = (slice(*r) if isinstance(r, tuple) else slice(r, r + 1) for r in (row, col))
    support = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(trials):
        x = torch.rand(1, 3, height, width, dtype=torch.float64, requires_grad=True)
        code = rep(x)
        code[0, :, rows, cols].sum().backward()
        assert x.grad is not None
        support |= x.grad[0].abs().sum(0) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


class TinyNet(Representation):
    """A two-conv net with fixed seeded weights: code ``(B, 6, ⌈H/2⌉, ⌈W/2⌉)`` in a millisecond."""

    model = "tiny"
    layers = ("conv2",)

    def __init__(self) -> None:
        super().__init__("conv2")
        generator = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
            parameter.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(torch.relu(self.conv1(x)))

    def windows(self) -> list[Window]:
        return [Window(3, 2, 1), Window(3, 1, 1)]
