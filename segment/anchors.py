"""Anchor boxes: one size and several aspect ratios (h/w) per FPN level, tiled at each level's stride."""
from __future__ import annotations

import torch
from torch import Tensor


def cell_anchors(size: float, ratios: list[float], dtype=torch.float32, device=None) -> Tensor:
    """Zero-centred (x1, y1, x2, y2) anchors of one level, rounded to whole pixels like Detectron/torchvision."""
    scales = torch.as_tensor([size], dtype=dtype, device=device)
    ratios_t = torch.as_tensor(ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator:
    """Anchors for all levels of a padded batch, concatenated level by level (location-major, anchor-minor).

    The result depends only on the padded batch size and the feature grid sizes, so it is cached.
    """

    def __init__(self, sizes: list[int], ratios: list[float]) -> None:
        self.sizes = list(sizes)
        self.ratios = list(ratios)
        self._cache: dict[tuple, tuple[Tensor, list[int]]] = {}
        self._cells: dict[tuple, Tensor] = {}  # kept for good (a few per device): a CUDA graph may read them

    def _cell(self, size: int, dtype, device) -> Tensor:
        key = (size, dtype, str(device))
        if key not in self._cells:  # made outside any capture (an eager call comes first): a host copy
            self._cells[key] = cell_anchors(size, self.ratios, dtype, device)
        return self._cells[key]

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.ratios)

    def __call__(self, image_size: tuple[int, int], grid_sizes: list[tuple[int, int]], dtype, device) -> tuple[Tensor, list[int]]:
        """-> (A, 4) anchors in padded-image pixels and the number of anchors on each level."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # inside a CUDA graph they are made by the graph itself: a cached tensor could be evicted and freed
            # while the graph still reads it
            return self._generate(image_size, grid_sizes, dtype, device)
        key = (tuple(image_size), tuple(map(tuple, grid_sizes)), dtype, str(device))
        if key not in self._cache:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = self._generate(image_size, grid_sizes, dtype, device)
        return self._cache[key]

    def _generate(self, image_size, grid_sizes, dtype, device) -> tuple[Tensor, list[int]]:
        levels = []
        for size, (gh, gw) in zip(self.sizes, grid_sizes):
            stride_h, stride_w = image_size[0] // gh, image_size[1] // gw
            base = self._cell(size, dtype, device)
            shift_y, shift_x = torch.meshgrid(
                torch.arange(gh, dtype=torch.int32, device=device) * stride_h,
                torch.arange(gw, dtype=torch.int32, device=device) * stride_w,
                indexing="ij",
            )
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            levels.append((shifts + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(levels), [len(a) for a in levels]
