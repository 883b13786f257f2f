"""Instance masks kept as the mask head gives them, a small probability grid per box, pasted only where asked.

Pasting every detection's mask into a full frame costs H·W floats per detection whether anything reads them or not:
a COCO R50-FPN keeps up to 100 detections per frame (score >= 0.05), 830 MB per 1080p frame, and the render holds
dozens of frames in flight. `RoIMasks` (Detectron2's ROIMasks) keeps each mask as its (M+2)² grid and its paste box
and computes the same pixels on demand: over each box's own window (`local`, `areas`), shrunk to a small grid
without the full-size image in between (`shrunk`), or whole (`paste`, torchvision's `paste_masks_in_image`).
Every form is the bilinear paste written as two matmuls: weights_y @ grid @ weights_xᵀ.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from gpu.transfer import row_index

Box = tuple[int, int, int, int]
LOCAL_CHUNK_PIXELS = 8 * 1024 * 1024  # windows pasted together (padded to the largest) hold at most this many
TENSORS = ("grids", "boxes", "clipped", "scale")  # RoIMasks' tensors, all aligned along dim 0
SHRINK_CHUNK = 64  # masks shrunk together (a batch of four frames of ten detections in one go)


@dataclass
class RoIMasks:
    """N masks of an image of `image_size`, each a grid of probabilities over a whole-pixel paste box.

    grids:   (N, S, S) float32, the mask head's M×M probabilities with torchvision's 1-px zero border (S = M + 2)
    boxes:   (N, 4) int64 paste boxes, x1 y1 x2 y2 inclusive (the detection box grown by S/M), may leave the image
    clipped: (N, 4) int64 the paste boxes clipped to the image, x2 y2 exclusive (empty boxes have x2 = x1)
    scale:   (N, 2) float32 grid cells per pixel along x and y (S / paste box width, height), kept for the weights
    padding: the grids' zero border in cells (S = M + 2·padding)
    """

    grids: Tensor
    boxes: Tensor
    clipped: Tensor
    scale: Tensor
    image_size: tuple[int, int]
    padding: int = 1
    _windows: list[Box] | None = field(default=None, repr=False, compare=False)  # `clipped` on the host, once read

    @classmethod
    def from_probs(cls, probs: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> RoIMasks:
        """(N, M, M) probabilities over (N, 4) float xyxy boxes in image pixels."""
        return cls._placed(F.pad(probs.float(), (padding,) * 4), boxes, image_size, padding)

    @classmethod
    def _placed(cls, grids: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int) -> RoIMasks:
        """Grids with their zero border over (N, 4) float xyxy detection boxes: the paste boxes grown from them."""
        source = grids.shape[-1]
        paste_boxes = _expanded_int_boxes(boxes.float(), float(source) / (source - 2 * padding))
        height, width = image_size
        x1, y1 = paste_boxes[:, 0].clamp(0, width), paste_boxes[:, 1].clamp(0, height)
        clipped = torch.stack([x1, y1, torch.maximum((paste_boxes[:, 2] + 1).clamp(max=width), x1),
                               torch.maximum((paste_boxes[:, 3] + 1).clamp(max=height), y1)], 1)
        scale = source / (paste_boxes[:, 2:] - paste_boxes[:, :2] + 1).clamp(min=1).to(torch.float32)
        return cls(grids, paste_boxes, clipped, scale, (int(height), int(width)), padding)

    def moved(self, boxes: Tensor) -> RoIMasks:
        """The same masks over other detection boxes ((N, 4) float xyxy, on the masks' device): what `from_probs`
        makes of their probabilities there (where a track's motion takes its object on a frame the segmenter
        skips). A box moved by whole pixels moves the pasted mask by as many; a larger one stretches it."""
        return self._placed(self.grids, boxes, self.image_size, self.padding)

    # -- a tensor-like container -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.grids.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape the pasted masks have, (N, H, W)."""
        return (len(self), *self.image_size)

    @property
    def device(self) -> torch.device:
        return self.grids.device

    def __getitem__(self, index: int | slice | Tensor) -> RoIMasks:
        if isinstance(index, int):
            index = one_row(index, len(self), "RoIMasks")
        windows = self._windows[index] if self._windows is not None and isinstance(index, slice) else None
        return replace(self, **{name: getattr(self, name)[index] for name in TENSORS}, _windows=windows)

    def to(self, device: torch.device | str) -> RoIMasks:
        return replace(self, **{name: getattr(self, name).to(device) for name in TENSORS})

    def take(self, rows: list[int]) -> RoIMasks:
        """The masks of `rows`, windows included when read."""
        windows = None if self._windows is None else [self._windows[r] for r in rows]
        return replace(self[row_index(rows, self.device)], _windows=windows)

    def split(self, counts: list[int]) -> list[RoIMasks]:
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [self[start:start + count] for start, count in zip(starts, counts)]

    @staticmethod
    def cat(items: list[RoIMasks]) -> RoIMasks:
        """The masks of `items` (at least one: nothing says the image size of none), all of one image size, one after
        the other."""
        if not items:
            raise ValueError("RoIMasks.cat: nothing to join (an empty list has no image size)")
        if len({m.image_size for m in items}) != 1:
            raise ValueError(f"RoIMasks.cat: different image sizes {sorted({m.image_size for m in items})}")
        joined = {name: torch.cat([getattr(m, name) for m in items]) for name in TENSORS}
        windows = [m._windows for m in items]
        return replace(items[0], **joined,
                       _windows=None if any(w is None for w in windows) else [b for w in windows for b in w])

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in TENSORS)

    # -- pixels ----------------------------------------------------------------------------------------------

    def paste(self, chunk_size: int = 16) -> Tensor:
        """(N, H, W) float32 full-image masks: torchvision's paste_masks_in_image, `chunk_size` masks per matmul."""
        height, width = self.image_size
        out = torch.empty((len(self), height, width), dtype=torch.float32, device=self.device)  # bmm fills it all
        rows_y = torch.arange(height, device=self.device)[None]
        rows_x = torch.arange(width, device=self.device)[None]
        for start in range(0, len(self), chunk_size):
            chunk = slice(start, start + chunk_size)
            torch.bmm(torch.bmm(self._weights(chunk, 1, rows_y), self.grids[chunk]),
                      self._weights(chunk, 0, rows_x).transpose(1, 2), out=out[chunk])
        return out

    def windows(self) -> list[Box]:
        """Each mask's window, its clipped paste box (x1, y1, x2, y2 exclusive), on the host: read once."""
        if self._windows is None:
            RoIMasks.read_windows([self])
        return self._windows

    @staticmethod
    def read_windows(items: list[RoIMasks]) -> None:
        """Reads the windows of several masks (a batch's frames) from their device in one copy."""
        unread = [m for m in items if m._windows is None]
        if unread:
            rows = torch.cat([m.clipped for m in unread]).tolist()
            for m in unread:
                m._windows, rows = [tuple(r) for r in rows[:len(m)]], rows[len(m):]

    def local(self, rows: list[int] | None = None) -> list[Tensor]:
        """The masks of `rows` (all by default), each (h, w) float32 over its window: the full paste's pixels
        there, and every pixel the full paste has above zero lies in it."""
        windows = self.windows()
        return [pasted[j, :y2 - y1, :x2 - x1] for members, pasted in self._pasted_chunks(rows)
                for j, (x1, y1, x2, y2) in enumerate(windows[r] for r in members)]

    def areas(self, threshold: float = 0.5, rows: list[int] | None = None) -> Tensor:
        """(N,) int64, or one per row of `rows`: pixels of each full-image mask at probability >= threshold,
        counted over its window."""
        if threshold <= 0:  # every pixel of the image counts, the zeros outside the window too
            return torch.full((len(self) if rows is None else len(rows),), self.image_size[0] * self.image_size[1],
                              dtype=torch.int64, device=self.device)
        # a window padded to its chunk's largest holds zeros beyond it (outside the box or the image)
        counts = [(pasted >= threshold).flatten(1).sum(1) for _, pasted in self._pasted_chunks(rows)]
        return torch.cat([torch.zeros((0,), dtype=torch.int64, device=self.device), *counts])

    def shrunk(self, size: tuple[int, int], threshold: float = 0.5) -> Tensor:
        """(N, h, w) bool: the full-image masks area-averaged to `size` (F.interpolate's "area"), then >= threshold,
        without the full-image masks: the averaging is one more matrix on each side of the paste, taken over each
        mask's window only."""
        height, width = self.image_size
        pool_y, pool_x = _pool_matrix(size[0], height, self.device).T, _pool_matrix(size[1], width, self.device).T
        windows = self.windows()
        out = torch.empty((len(self), *size), dtype=torch.bool, device=self.device)
        for start in range(0, len(self), SHRINK_CHUNK):  # no window-sized tensor: chunks need no pixel budget
            index = slice(start, start + SHRINK_CHUNK)
            (pixel_y, weights_y), (pixel_x, weights_x) = self._window_weights(index, *_extent(windows[index]))
            # each window pixel's share in the small pixels it falls in (beyond the image it has no weight anyway)
            weights_y = pool_y[pixel_y.clamp(max=height - 1)].transpose(1, 2) @ weights_y
            weights_x = pool_x[pixel_x.clamp(max=width - 1)].transpose(1, 2) @ weights_x
            out[index] = torch.bmm(torch.bmm(weights_y, self.grids[index]), weights_x.transpose(1, 2)) >= threshold
        return out

    def _pasted_chunks(self, rows: list[int] | None):
        """(rows, their masks) for `rows` (all by default) in chunks: each mask over the chunk's largest window,
        from the corner of its own."""
        windows = self.windows()
        rows = list(range(len(self))) if rows is None else list(rows)
        for chunk in chunks_within([windows[r] for r in rows]):
            members = [rows[k] for k in chunk]
            yield members, self._paste_windows(row_index(members, self.device), *_extent([windows[r] for r in members]))

    def _paste_windows(self, index: slice | Tensor, height: int, width: int) -> Tensor:
        """(k, height, width): the masks of `index`, each over height × width pixels from its window's corner;
        pixels outside the image are zero."""
        return self.at(index, *self._window_pixels(index, height, width))

    def at(self, index: slice | Tensor, pixel_y: Tensor, pixel_x: Tensor) -> Tensor:
        """(k, Ly, Lx): the masks of `index` at the pixel rows `pixel_y` (k, Ly) and columns `pixel_x` (k, Lx) of the
        image, each mask at its own, in any order and repeated at will: what the full paste holds at those pixels."""
        height, width = self.image_size
        return torch.bmm(torch.bmm(self._weights(index, 1, pixel_y, height), self.grids[index]),
                         self._weights(index, 0, pixel_x, width).transpose(1, 2))

    def _window_weights(self, index: slice | Tensor, height: int, width: int) -> tuple[tuple[Tensor, Tensor], ...]:
        """For the masks of `index`, along y then x: the pixels from each window's corner ((k, height), (k, width))
        and the masks' weights at them ((k, height, S), (k, width, S)); none outside the image."""
        pixel_y, pixel_x = self._window_pixels(index, height, width)
        return ((pixel_y, self._weights(index, 1, pixel_y, self.image_size[0])),
                (pixel_x, self._weights(index, 0, pixel_x, self.image_size[1])))

    def _window_pixels(self, index: slice | Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """For the masks of `index`, the pixel rows (k, height) and columns (k, width) from each window's corner."""
        origin = self.clipped[index]
        return (origin[:, 1:2] + torch.arange(height, device=self.device),
                origin[:, 0:1] + torch.arange(width, device=self.device))

    def _weights(self, index: slice | Tensor, axis: int, pixel: Tensor, limit: int | None = None) -> Tensor:
        """(k, L, S) bilinear weights along `axis` (0: x, 1: y) at `pixel` ((1 or k, L) positions) of the masks
        of `index`; pixels at or beyond `limit` get none."""
        boxes = self.boxes[index]
        return _resample_weights(boxes[:, axis], boxes[:, axis + 2], self.scale[index, axis], pixel,
                                 self.grids.shape[-1], limit)


def one_row(index: int, length: int, kind: str) -> slice:
    """The slice of row `index` of `length`, counted from the end when negative, as a list's; past either end an
    IndexError, as a list's (a slice there is empty, and an empty result looked like a frame without detections)."""
    if not -length <= index < length:
        raise IndexError(f"{kind} index {index} out of range for {length} rows")
    return slice(index, index + 1 or None)


def per_frame(items: list[RoIMasks | Tensor], run: Callable[[RoIMasks], Sequence],
              rows: list[list[int]] | None = None,
              full: Callable[[Tensor, list[int] | None], Sequence] | None = None) -> list[Sequence]:
    """`run(masks)` for each item (a frame's masks; only those of `rows[i]` for item i, when given), called once for
    all the RoIMasks of one image size, joined (a batch's frames share one): a few dozen kernel launches for a batch
    instead of for each of its frames. `run` gives a tensor or list along its masks; it is split back per item.
    The RoIMasks' windows are read first, in one copy, and stay with them for the stages after. An item that is a
    full-image mask tensor gets `full(masks, its rows)` instead."""
    roi = [i for i, item in enumerate(items) if isinstance(item, RoIMasks)]
    RoIMasks.read_windows([items[i] for i in roi])
    out: list[Sequence] = [()] * len(items)
    parts: dict[int, RoIMasks] = {}
    for i, item in enumerate(items):
        if isinstance(item, RoIMasks):
            parts[i] = item if rows is None else item.take(rows[i])
        else:
            out[i] = full(item, None if rows is None else rows[i])
    sizes: dict[tuple[int, int], list[int]] = {}
    for i, part in parts.items():
        sizes.setdefault(part.image_size, []).append(i)
    for members in sizes.values():
        result, start = run(RoIMasks.cat([parts[i] for i in members])), 0
        for i in members:
            out[i], start = result[start:start + len(parts[i])], start + len(parts[i])
    return out


def _expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow boxes about their centre by `scale` and truncate to whole pixels (torchvision's expand_boxes + int64)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1).to(torch.int64)


def _resample_weights(start: Tensor, end: Tensor, scale: Tensor, pixel: Tensor, source: int,
                      limit: int | None = None) -> Tensor:
    """(N, L, source) bilinear weights placing a `source`-long signal on pixels start..end (inclusive; `scale` =
    source / their number), taken at `pixel` ((1 or N, L) positions); zero elsewhere, and at or beyond `limit`.

    Same sampling as F.interpolate(bilinear, align_corners=False) to end - start + 1 pixels. Written as the tent
    max(0, 1 - |src - tap|) around the clamped source position: the same two weights as floor/frac/scatter, in a
    third of the kernel launches (they dominate on a GPU at batch 1).
    """
    offset = pixel - start[:, None]  # (N, L) position inside the pasted box
    inside = (offset >= 0) & (pixel <= end[:, None])
    if limit is not None:
        inside &= pixel < limit
    src = (scale[:, None] * (offset.to(torch.float32) + 0.5) - 0.5).clamp_(0, source - 1)
    return (1 - (src[..., None] - _taps(source, start.device)).abs_()).clamp_(min=0).mul_(inside[..., None])


@lru_cache(maxsize=8)
def _taps(source: int, device: torch.device) -> Tensor:
    """0, 1, …, source - 1 as float32 on `device`, made once: on the host and copied, which is complete on return,
    so a stage thread on another CUDA stream never reads it before it is written."""
    return torch.arange(source, dtype=torch.float32).to(device)


@lru_cache(maxsize=32)
def _pool_matrix(small: int, large: int, device: torch.device) -> Tensor:
    """(small, large): row i averages the pixels adaptive average pooling gives output i,
    [floor(i·large/small), ceil((i+1)·large/small))."""
    i = torch.arange(small)
    start, end = i * large // small, ((i + 1) * large + small - 1) // small
    pixel = torch.arange(large)
    inside = (pixel[None] >= start[:, None]) & (pixel[None] < end[:, None])
    return (inside.float() / (end - start)[:, None].float()).to(device)  # complete on return, as `_taps`


def chunks_within(windows: list[Box]) -> list[list[int]]:
    """Consecutive positions of `windows` grouped so that each group, padded to its largest window, holds at most
    LOCAL_CHUNK_PIXELS pixels (a larger window goes alone)."""
    chunks: list[list[int]] = []
    height = width = 0
    for k, (x1, y1, x2, y2) in enumerate(windows):
        h, w = max(height, y2 - y1), max(width, x2 - x1)
        if chunks and (len(chunks[-1]) + 1) * h * w <= LOCAL_CHUNK_PIXELS:
            chunks[-1].append(k)
            height, width = h, w
        else:
            chunks.append([k])
            height, width = y2 - y1, x2 - x1
    return chunks


def _extent(windows: list[Box]) -> tuple[int, int]:
    """(height, width) of the largest of the windows."""
    return max(y2 - y1 for _, y1, _, y2 in windows), max(x2 - x1 for x1, _, x2, _ in windows)
