import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: F401  (registers the "tiny" test representation)

TINY_SIZE = 16


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny nets run fastest on one thread; with two, every op waits for a core on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image() -> Tensor:
    """A seeded random ``(3, 16, 16)`` image for the tiny net."""
    return torch.rand(3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
