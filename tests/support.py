"""Helpers shared by the tests (imported as ``from support import ...``)."""

from __future__ import annotations

import pytest
import torch

from invviz.cli import main
from invviz.representations import Box, Representation, representation


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``invviz ARGV...`` in this process: exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
    row_cells, col_cells = (slice(*r) if isinstance(r, tuple) else slice(r, r + 1) for r in (row, col))
    support = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(trials):
        x = torch.rand(1, 3, height, width, dtype=torch.float64, requires_grad=True)
        code = rep(x)
        code[0, :, row_cells, col_cells].sum().backward()
        assert x.grad is not None
        support |= x.grad[0].abs().sum(0) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)



def tiny_net(layer: str = "conv2") -> Representation:
    """The "tiny" test net (``tests/tiny.py``) through the factory: eval mode, frozen weights."""
    return representation(f"tiny:{layer}")
