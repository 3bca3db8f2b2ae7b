"""Flat regions: pixels a code says are flat, tied to one value per connected region.

HOG and SIFT normalize each cell's gradient histogram by its neighbourhood's energy, so the faintest
texture gives a full-strength code: a cell is all zero only where the original image is exactly
flat over the cell's receptive field (a clipped black border, a blown-out sky), and no gradient
step can make a textured reconstruction exactly flat there (the code of a texture does not shrink
with its contrast). The engine therefore optimizes those pixels as one value per connected flat
region: the image the objective sees is the optimized one with each region replaced by its mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..representations import Representation


class FlatRegions:
    """Per image of a batch, the regions to hold flat: ``ids`` ``(B, H·W)``, 0 for free pixels and
    ``1 … K`` for the region a pixel belongs to."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids
        self.regions = int(ids.max())
        counts = torch.zeros(ids.shape[0], self.regions + 1, dtype=torch.float32, device=ids.device)
        self._counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32)).clamp_min_(1)[:, None]

    @classmethod
    def from_target(cls, rep: Representation, target: Tensor, batch: int, height: int, width: int) -> FlatRegions | None:
        """Regions of the all-zero cells of ``target`` ``(B or 1, C, H', W')``; ``None`` if there are none."""
        if not rep.zero_means_flat or target.dim() != 4:
            return None
        zero = (target == 0).all(1).cpu()  # (B, H', W')
        if not bool(zero.any()):
            return None
        rows = [_region_ids(rep, cells, height, width) for cells in zero]
        ids = torch.stack(rows).expand(batch, -1) if len(rows) == 1 else torch.stack(rows)
        return cls(ids.contiguous().to(target.device))

    def project(self, images: Tensor) -> Tensor:
        """``images`` ``(B, C, H, W)`` with every region set to its mean (differentiable)."""
        batch, channels = images.shape[:2]
        flat = images.reshape(batch, channels, -1)
        index = self.ids[:, None, :].expand(batch, channels, -1)
        sums = flat.new_zeros(batch, channels, self.regions + 1).scatter_add(2, index, flat)
        means = sums / self._counts.to(flat.dtype)
        return torch.where(index > 0, means.gather(2, index), flat).reshape(images.shape)


def _region_ids(rep: Representation, zero: Tensor, height: int, width: int) -> Tensor:
    """``(H·W,)`` region ids of one image's all-zero cells ``zero`` ``(H', W')``: the union of their
    ``flat_support`` boxes, one region per group of overlapping boxes.

    The boxes lie on the code's grid (a cell's rows depend on its row only, its columns on its
    column), so overlaps are found between nearby cells by shifting the grid, and the groups by
    letting each cell take the smallest label among the cells it overlaps until nothing changes.
    """
    rows, cols = zero.shape
    ids = torch.zeros(height, width, dtype=torch.long)
    if not bool(zero.any()):
        return ids.flatten()
    row_boxes = [rep.flat_support(r, 0, height, width) for r in range(rows)]
    col_boxes = [rep.flat_support(0, c, height, width) for c in range(cols)]
    tops, bottoms = (torch.tensor([getattr(b, side) for b in row_boxes]) for side in ("top", "bottom"))
    lefts, rights = (torch.tensor([getattr(b, side) for b in col_boxes]) for side in ("left", "right"))

    def overlapping(starts: Tensor, stops: Tensor) -> list[tuple[int, Tensor]]:
        """Per offset ``d`` with any overlap: whether interval ``i`` overlaps interval ``i + d``."""
        found = []
        for d in range(-(len(starts) - 1), len(starts)):
            i = torch.arange(max(0, -d), min(len(starts), len(starts) - d))
            both = (starts[i] < stops[i + d]) & (starts[i + d] < stops[i])
            if bool(both.any()):
                found.append((d, torch.zeros(len(starts), dtype=torch.bool).index_put((i,), both)))
        return found

    pairs = [(dr, dc, row_ok[:, None] & col_ok[None]) for dr, row_ok in overlapping(tops, bottoms) for dc, col_ok in overlapping(lefts, rights)]
    unset = rows * cols
    label = torch.where(zero, torch.arange(unset).view(rows, cols), unset)
    while True:
        spread = label.clone()
        for dr, dc, ok in pairs:
            # The label of cell (r + dr, c + dc), where that cell exists, is zero and overlaps (r, c).
            neighbour = torch.full_like(label, unset)
            target = (slice(max(0, -dr), rows - max(0, dr)), slice(max(0, -dc), cols - max(0, dc)))
            source = (slice(max(0, dr), rows - max(0, -dr)), slice(max(0, dc), cols - max(0, -dc)))
            neighbour[target] = label[source]
            spread = torch.where(zero & ok, torch.minimum(spread, neighbour), spread)
        if torch.equal(spread, label):
            break
        label = spread
    region = torch.unique(label[zero], return_inverse=True)[1] + 1
    for (r, c), number in zip(zero.nonzero().tolist(), region.tolist()):
        ids[tops[r] : bottoms[r], lefts[c] : rights[c]] = number
    return ids.flatten()
