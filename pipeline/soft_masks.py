"""The composite's blending weights: the stylized regions of a batch of frames at once, in batches padded to their
largest crop.

A region's alpha is its instance's mask over the region's crop, binarized at `threshold`, averaged with the same
track's soft mask of the frame before (moved by the shift of the detection box's centre, or of its unclipped side
at the frame's edge, and only within SMOOTH_REACH_PX of the current mask; weight `smooth`: it calms the boundary
flicker of per-frame masks), then blurred by a
Gaussian that fades the edge over `feather_px` pixels, with replicate borders at the crop's edges (a mask running off the frame stays opaque at the frame's edge).

Made region by region, that was a dozen small tensor operations per region, each a kernel launch on a GPU, where
launches bound the stylize thread. Here every region is taken at the pixels of its crop grown by the feather's
radius, the grown border's pixels clamped to the crop's edge, which is what a replicate pad holds there. So the
masks of all the regions of a batch of frames come from one pair of matmuls (`RoIMasks.at`), and per frame the
previous soft masks from one gather and the blur from one separable filter, whatever the number of regions. Where
to read each pixel is worked out on the host (numpy) and copied once per batch. Each pixel's arithmetic is the
one region by region: on a CPU the same values (a GPU's batched matmuls may round differently, by ~1e-7).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from torch import Tensor

from gpu.transfer import to_device_all
from pipeline.record import FrameRecord, StylizedRegion
from segment.roi_masks import RoIMasks, chunks_within


def blur_padded(padded: Tensor, feather_px: int) -> Tensor:
    """(..., h + 2r, w + 2r) masks already padded by r = feather_px → (..., h, w): their edges softened over
    ±feather_px px (values change only within that chessboard distance of them: the kernel is square).

    The Gaussian's σ is feather_px / 2 and its kernel is cut at ±feather_px. The padding is the caller's: a
    replicate pad keeps a mask that runs off the frame fully opaque at the frame's edge.
    """
    if padded.is_cuda:
        return _separable_by_matmul(padded, _gaussian_kernel(feather_px, padded.device, padded.dtype)[0])
    return _separable_by_shifts(padded, _gaussian_taps(feather_px))


def _separable_by_shifts(padded: Tensor, taps: tuple[float, ...]) -> Tensor:
    """kornia's filter2d_separable (replicate borders) as shifted, scaled adds over the padded masks, one pass per
    tap and axis.

    On a CPU, oneDNN's one-channel convolutions that kornia runs are slow, and for some sizes very slow (2-core
    CPU, a 7-tap kernel: 0.67 -> 0.21 ms at 150x200, 1.8 -> 0.32 at 300x400, 50 -> 2.7 at 1000x700); the result
    was bit-identical on every size measured. On a GPU each add would be a kernel launch: the matmuls do it there.
    """
    r = len(taps) // 2
    height, width = padded.shape[-2] - 2 * r, padded.shape[-1] - 2 * r
    return _taps_along(_taps_along(padded, taps, -1, width), taps, -2, height)


def _taps_along(x: Tensor, taps: tuple[float, ...], dim: int, length: int) -> Tensor:
    """Σ_i taps[i] · x shifted by i along `dim`, `length` long there (a new tensor, summed in tap order)."""
    out = x.narrow(dim, 0, length) * taps[0]
    for i, tap in enumerate(taps[1:], 1):
        out.add_(x.narrow(dim, i, length), alpha=tap)
    return out


def _separable_by_matmul(padded: Tensor, kernel: Tensor) -> Tensor:
    """filter2d_separable's result as two window-by-kernel matmuls over the padded masks.

    On a GPU every crop has a new size, and cuDNN spends about a millisecond of host time choosing a
    convolution algorithm for each new shape (pytorch/pytorch#187212 measures 1.27 ms per cold conv): two convs
    per instance made that most of the composite's time with a detector whose boxes change every frame. A
    matmul needs no such choice; the sums differ from the conv's in float rounding only (~2e-7).
    """
    rows = padded.unfold(-1, kernel.shape[0], 1) @ kernel      # (..., h + 2r, w)
    return rows.unfold(-2, kernel.shape[0], 1) @ kernel         # (..., h, w)


@lru_cache(maxsize=16)
def _gaussian_taps(feather_px: int) -> tuple[float, ...]:
    return tuple(_gaussian_kernel(feather_px, torch.device("cpu"), torch.float32)[0].tolist())


@lru_cache(maxsize=16)
def _gaussian_kernel(feather_px: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 2·feather_px + 1) Gaussian, σ = feather_px / 2; built once, not per instance and frame as
    gaussian_blur2d does (three quarters of the composite stage's kernel launches with ten instances)."""
    return get_gaussian_kernel1d(2 * feather_px + 1, feather_px / 2).to(device, dtype)


@dataclass(frozen=True)
class Frame:
    """One frame's share: its record, its stylized regions in depth order, and its instances' boxes and track ids
    (-1: untracked) on the host."""

    record: FrameRecord
    regions: list[StylizedRegion]
    boxes: list[list[float]]
    tracks: list[int]


# On a CPU a part is blurred at once when padding its regions to its largest crop at most this many times their
# pixels: its 4r + 2 operators instead of as many per region (14 at feather_px 3; 100 objects in 256x144 frames, one
# thread: 7.6 -> 1.0 ms a frame)
CPU_PART_BLUR_PADDING = 2
SMOOTH_REACH_PX = 2  # the previous soft mask counts only this close to the current mask (`_near`)
EDGE_PX = 0.5  # a box side this close to the frame's edge was clipped there (torchvision clips boxes to the image)


@dataclass(frozen=True)
class _Kept:
    """The tracks' soft masks for the next frame, per track: its region's row `row` of its frame's part `part`, over
    the region's crop there. Arrays, so that the next frame's regions find theirs at once."""

    entry: dict[int, int]  # track -> its index in the arrays
    part: np.ndarray       # (T,)
    row: np.ndarray        # (T,)
    crop: np.ndarray       # (T, 4) the region's crop box x1 y1 x2 y2
    box: np.ndarray        # (T, 4) its detection box x1 y1 x2 y2 (float64)

    @staticmethod
    def tracked(tracks: np.ndarray, part: np.ndarray, row: np.ndarray, crops: np.ndarray, boxes: np.ndarray) -> _Kept:
        """Those of the regions given that have a track (>= 0); a track given twice (the tracker never does) keeps
        its last."""
        keep = tracks >= 0
        return _Kept(dict(zip(tracks[keep].tolist(), range(int(keep.sum())))), part[keep], row[keep], crops[keep],
                     boxes[keep])

    def entries(self, tracks: np.ndarray) -> np.ndarray:
        """Each track's index in the arrays, -1 for none."""
        return np.array([self.entry.get(track, -1) for track in tracks.tolist()], dtype=np.int64)


_NOTHING_KEPT = _Kept({}, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64), np.zeros((0, 4)))


@dataclass
class _Part:
    """A frame's regions that lie in one padded chunk: its rows start..start + len(regions)."""

    frame: int
    chunk: int
    start: int
    regions: list[StylizedRegion]
    shape: tuple[int, int]                 # the chunk's padded height and width
    placed: int                            # its first region's position among the group's (a frame's are together)
    sources: list[np.ndarray] | None = None  # smoothing: see `_sources`
    previous: list[int] | None = None        # the parts of the frame before that hold them


class SoftMasks:
    """`soft_masks(frames)` gives, frame by frame, each region's alpha and binarized mask over its crop, and keeps
    the tracks' soft masks for the next frame's smoothing (`reset` forgets them)."""

    def __init__(self, feather_px: int, smooth: float, threshold: float) -> None:
        self.feather_px, self.smooth, self.threshold = feather_px, smooth, threshold
        self.reset()

    def reset(self) -> None:
        self._kept = _NOTHING_KEPT
        self._stored: list[Tensor] = []  # the last frame's soft parts, each with a row and a column of zeros added

    def __call__(self, frames: list[Frame]) -> list[list[tuple[Tensor, Tensor]]]:
        """Per frame, per region: its alpha (h, w) float over its crop, and its binarized mask there (h, w) bool.
        A track absent from a frame starts afresh when it returns."""
        out: list[list[tuple[Tensor, Tensor]]] = []
        for group in _joinable(frames):
            out += self._group(group)
        return out

    def _group(self, frames: list[Frame]) -> list[list[tuple[Tensor, Tensor]]]:
        """Frames whose masks one call reads (`_joinable`), in order."""
        r = self.feather_px
        placed = [(f, region) for f, frame in enumerate(frames) for region in frame.regions]
        if not placed:
            self._kept, self._stored = _NOTHING_KEPT, []
            return [[] for _ in frames]
        crops = np.array([region.box for _, region in placed], dtype=np.int64)
        chunks = chunks_within([(x1 - r, y1 - r, x2 + r, y2 + r) for x1, y1, x2, y2 in crops.tolist()])
        extents = [(int((crops[c, 3] - crops[c, 1]).max()), int((crops[c, 2] - crops[c, 0]).max())) for c in chunks]
        # each region's pixels grown by r on every side and clamped to its crop: a replicate pad of its crop
        pixels = [(_clamped(crops[c, 1], crops[c, 3], h + 2 * r, r), _clamped(crops[c, 0], crops[c, 2], w + 2 * r, r))
                  for c, (h, w) in zip(chunks, extents)]
        parts = _parts(placed, chunks, [(h + 2 * r, w + 2 * r) for h, w in extents])
        by_frame = [[part for part in parts if part.frame == f] for f in range(len(frames))]
        kept = self._plan_sources(frames, by_frame, pixels, crops,
                                  np.array([region.instance for _, region in placed], dtype=np.int64))
        masks, rows = _joined_masks(frames, placed)
        host = [array for c, (pixel_y, pixel_x) in zip(chunks, pixels) for array in (rows[c], pixel_y, pixel_x)]
        if masks is None:
            host.append(np.array([[round(v) for v in frames[f].boxes[region.instance]] for f, region in placed]))
        host += [array for part in parts for array in part.sources or []]
        device = iter(to_device_all([torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in host],
                                    frames[0].record.image.device))
        where = [tuple(next(device) for _ in range(3)) for _ in chunks]
        bounds = next(device) if masks is None else None
        hard = [self._hard(masks, *at, None if bounds is None else bounds[c[0]:c[-1] + 1])
                for at, c in zip(where, chunks)]
        out = []
        for f in range(len(frames)):
            stored, masks_of_frame = [], []
            for part in by_frame[f]:
                soft = hard[part.chunk][part.start:part.start + len(part.regions)]
                binary = soft[:, r:, r:].bool()
                if part.sources:
                    has, row, rows, columns, origin = (next(device) for _ in part.sources)
                    _, pixel_y, pixel_x = (a[part.start:part.start + len(part.regions)] for a in where[part.chunk])
                    near = _near_replicated(soft, pixel_y, pixel_x, r)
                    before = torch.minimum(self._gather(part.previous, origin, row, rows, columns), near)
                    soft = torch.where(has.bool()[:, None, None], torch.lerp(soft, before, self.smooth), soft)
                if self.smooth > 0:
                    stored.append(F.pad(soft, (0, 1, 0, 1)))
                masks_of_frame += [(alpha, binary[j, :alpha.shape[0], :alpha.shape[1]])
                                   for j, alpha in enumerate(self._blur(soft, part.regions))]
            self._stored = stored
            out.append(masks_of_frame)
        self._kept = kept
        return out

    def _hard(self, masks: RoIMasks | Tensor | None, rows: Tensor, pixel_y: Tensor, pixel_x: Tensor,
              bounds: Tensor | None) -> Tensor:
        """(k, Ly, Lx) 0/1 floats: the masks of `rows` at their pixels, binarized; without masks, 1 inside each of
        the `bounds` (k, 4), the rounded boxes x1 y1 x2 y2."""
        if masks is None:
            inside_y = (pixel_y >= bounds[:, 1:2]) & (pixel_y < bounds[:, 3:4])
            inside_x = (pixel_x >= bounds[:, 0:1]) & (pixel_x < bounds[:, 2:3])
            return (inside_y[:, :, None] & inside_x[:, None, :]).float()
        if isinstance(masks, RoIMasks):
            probs = masks.at(rows, pixel_y, pixel_x)
        else:
            probs = masks[rows[:, None, None], pixel_y[:, :, None], pixel_x[:, None, :]]
        return (probs >= self.threshold).float()

    def _blur(self, soft: Tensor, regions: list[StylizedRegion]) -> list[Tensor]:
        """Each region's alpha (h, w) from its padded soft mask: the part in one filter, each region's alpha its
        top-left corner, whose filter reads only the region's own padded crop (the same pixels as region by region).
        On a CPU, where an operator costs its pixels, a part whose padding to its largest crop more than doubles the
        pixels filters each region over its own crop."""
        r = self.feather_px
        sizes = [(y2 - y1, x2 - x1) for x1, y1, x2, y2 in (region.box for region in regions)]
        if r == 0:
            return [soft[j, :h, :w] for j, (h, w) in enumerate(sizes)]
        own_pixels = sum((h + 2 * r) * (w + 2 * r) for h, w in sizes)
        if soft.is_cuda or soft.numel() <= CPU_PART_BLUR_PADDING * own_pixels:
            alpha = blur_padded(soft, r)
            return [alpha[j, :h, :w] for j, (h, w) in enumerate(sizes)]
        return [blur_padded(soft[j, :h + 2 * r, :w + 2 * r], r) for j, (h, w) in enumerate(sizes)]

    def _plan_sources(self, frames: list[Frame], by_frame: list[list[_Part]],
                      pixels: list[tuple[np.ndarray, np.ndarray]], crops: np.ndarray, instances: np.ndarray) -> _Kept:
        """With smoothing, frame by frame: where each part's regions read their previous soft masks (`_sources`),
        and the tracks kept for the frame after; returns those of the last frame. `crops` and `instances`: each of
        the group's regions' crop box and instance, in order."""
        if self.smooth <= 0:
            return _NOTHING_KEPT
        kept = self._kept
        shapes = np.array([t.shape[1:] for t in self._stored], dtype=np.int64).reshape(-1, 2)  # the stored parts
        for frame, parts in zip(frames, by_frame):
            if not parts:
                kept = _NOTHING_KEPT
                continue
            first, count = parts[0].placed, sum(len(part.regions) for part in parts)
            own = instances[first:first + count]
            tracks, boxes = np.asarray(frame.tracks, dtype=np.int64)[own], np.asarray(frame.boxes, np.float64)[own]
            entries = kept.entries(tracks)
            for part in parts:
                at = slice(part.placed - first, part.placed - first + len(part.regions))
                pixel_y, pixel_x = (axis[part.start:part.start + len(part.regions)] for axis in pixels[part.chunk])
                self._sources(part, kept, entries[at], boxes[at], pixel_y, pixel_x, shapes,
                              tuple(frame.record.image.shape[-2:]))
            lengths = [len(part.regions) for part in parts]
            kept = _Kept.tracked(tracks, np.repeat(np.arange(len(parts)), lengths),
                                 np.concatenate([np.arange(length) for length in lengths]), crops[first:first + count],
                                 boxes)
            shapes = np.array([part.shape for part in parts], dtype=np.int64) + 1
        return kept

    def _sources(self, part: _Part, kept: _Kept, entries: np.ndarray, boxes: np.ndarray, pixel_y: np.ndarray,
                 pixel_x: np.ndarray, shapes: np.ndarray, size: tuple[int, int]) -> None:
        """Sets `part.sources`: per region whether it has a previous soft mask (its `entries` in `kept`, -1: none),
        its row in its stored part, the rows and columns there at which the region's pixels read it, moved by the
        box's shift (the stored part's appended zeros where the moved mask does not reach), and that part (-1: none);
        and `part.previous`, the stored parts read. None where no region has one. `shapes`: the stored parts'."""
        has = entries >= 0
        if not has.any():
            return
        source = np.where(has, entries, 0)  # the regions without one read nothing: any entry will do
        origin = np.where(has, kept.part[source], -1)
        used = np.unique(origin[has])
        zeros = shapes[np.where(has, origin, used[0])] - 1  # (k, 2); no source: the first part's zeros
        crop = kept.crop[source]
        # pixel p of this crop lies at p - (corner + shift) in the source's crop, r further on in its part
        corner = crop[:, :2] + _shifts(kept.box[source], boxes, size)
        extent = crop[:, 2:] - crop[:, :2]
        rows, columns = (np.where(has[:, None] & (inside >= 0) & (inside < extent[:, axis, None]),
                                  inside + self.feather_px, zeros[:, 1 - axis, None])
                         for axis, inside in ((1, pixel_y - corner[:, 1, None]), (0, pixel_x - corner[:, 0, None])))
        part.sources = [has.astype(np.int64), np.where(has, kept.row[source], 0), rows, columns, origin]
        part.previous = used.tolist()

    def _gather(self, used: list[int], origin: Tensor, row: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
        """(k, Ly, Lx): each region's previous soft mask at its `rows` and `columns` of its stored part `origin`
        (zeros for a region with none)."""
        if len(used) == 1:  # the usual case: one stored part holds every source
            return self._stored[used[0]][row[:, None, None], rows[:, :, None], columns[:, None, :]]
        out = self._stored[used[0]].new_zeros((len(row), rows.shape[1], columns.shape[1]))
        for u in used:  # the frame before's crops were too large for one padded part (chunks_within)
            stored = self._stored[u]  # indexed by every region (clamped into it), kept for its own: no boolean index
            last = stored.shape
            read = stored[row.clamp(max=last[0] - 1)[:, None, None], rows.clamp(max=last[1] - 1)[:, :, None],
                          columns.clamp(max=last[2] - 1)[:, None, :]]
            out = torch.where((origin == u)[:, None, None], read, out)  # (a GPU would wait to count its True rows)
        return out


def _joinable(frames: list[Frame]) -> list[list[Frame]]:
    """Consecutive frames whose masks one `RoIMasks.at` call reads: RoIMasks of one image size (frames without
    regions go along); a frame with full-image masks or none goes alone."""
    groups: list[list[Frame]] = []
    keys: list[object] = []  # per group: None (no regions yet), ("roi", image size), or "alone"
    for frame in frames:
        masks = frame.record.instances.masks if frame.regions else None
        key = None if not frame.regions else ("roi", masks.image_size) if isinstance(masks, RoIMasks) else "alone"
        if groups and "alone" not in (key, keys[-1]) and (key is None or keys[-1] in (None, key)):
            groups[-1].append(frame)
            keys[-1] = keys[-1] if key is None else key
        else:
            groups.append([frame])
            keys.append(key)
    return groups


def _joined_masks(frames: list[Frame], placed: list[tuple[int, StylizedRegion]]
                  ) -> tuple[RoIMasks | Tensor | None, np.ndarray]:
    """The masks of the frames with regions as one (RoIMasks joined), and each placed region's row in them."""
    users = sorted({f for f, _ in placed})
    all_masks = [frames[f].record.instances.masks for f in users]
    masks = all_masks[0] if len(all_masks) == 1 else RoIMasks.cat(all_masks)
    offsets = dict(zip(users, np.cumsum([0] + [len(m) for m in all_masks[:-1]]).tolist())) if masks is not None \
        else dict.fromkeys(users, 0)
    return masks, np.array([offsets[f] + region.instance for f, region in placed], dtype=np.int64)


def _parts(placed: list[tuple[int, StylizedRegion]], chunks: list[list[int]],
           shapes: list[tuple[int, int]]) -> list[_Part]:
    """Each chunk's regions split by frame, in order."""
    parts: list[_Part] = []
    for c, chunk in enumerate(chunks):
        for j, k in enumerate(chunk):
            f, region = placed[k]
            if j and parts[-1].frame == f:
                parts[-1].regions.append(region)
            else:
                parts.append(_Part(f, c, j, [region], shapes[c], k))
    return parts


def _clamped(start: np.ndarray, end: np.ndarray, length: int, r: int) -> np.ndarray:
    """(k, length): pixels start - r, start - r + 1, ... of each of k crops [start, end), clamped into it."""
    pixels = start[:, None] - r + np.arange(length)
    return np.minimum(np.maximum(pixels, start[:, None]), end[:, None] - 1)


def _near(hard: Tensor) -> Tensor:
    """1 within SMOOTH_REACH_PX of each mask (k, h, w), else 0: how far the previous soft mask may reach past the
    current one. Mask flicker is a pixel or two; an object that shrank or changed shape faster left its old
    outline around it, faded by `smooth` each frame, out to the crop's edge (a ring 19 px wide on the demo clip).

    On a CPU max_pool2d is slow (one thread: 4.5 ms for (100, 40, 40), 15 for (8, 200, 300), against 0.8 and 0.7 for
    shifted maxima); as the masks are 0/1, the zero padding of the shifts is max_pool2d's -inf padding."""
    if hard.is_cuda:
        return F.max_pool2d(hard[:, None], 2 * SMOOTH_REACH_PX + 1, stride=1, padding=SMOOTH_REACH_PX)[:, 0]
    padded = F.pad(hard, (SMOOTH_REACH_PX,) * 4)
    return _max_along(_max_along(padded, -1, hard.shape[-1]), -2, hard.shape[-2])


def _near_replicated(hard: Tensor, pixel_y: Tensor, pixel_x: Tensor, r: int) -> Tensor:
    """`_near` of each crop, then replicate-padded as `hard` (k, Ly, Lx) is: each crop grown by reading its pixels
    clamped into it (`pixel_y` (k, Ly), `pixel_x` (k, Lx): the frame rows and columns read; the crop starts at r).
    Over the padded masks alone, a pixel of the padding would reach fewer of the crop's pixels than the crop's edge
    pixel it copies; region by region the reach is the crop's, padded after."""
    local_y = pixel_y - pixel_y[:, r:r + 1] + r  # where in `hard` each pixel's crop pixel lies
    local_x = pixel_x - pixel_x[:, r:r + 1] + r
    near = _near(hard)
    near = near.gather(1, local_y[:, :, None].expand(-1, -1, near.shape[2]))
    return near.gather(2, local_x[:, None, :].expand(-1, near.shape[1], -1))


def _max_along(x: Tensor, dim: int, length: int) -> Tensor:
    """The maximum of x shifted by 0, 1, ... along `dim`, `length` long there (a new tensor)."""
    out = x.narrow(dim, 0, length).clone()
    for shift in range(1, x.shape[dim] - length + 1):
        torch.maximum(out, x.narrow(dim, shift, length), out=out)
    return out


def _shifts(before: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(k, 2): whole pixels (x, y) each object moved since its box was `before` (k, 4), now `boxes`, in a frame of
    `size` (height, width): the mask follows the object and keeps its outline."""
    return np.stack([_axis_shifts(before[:, 0], before[:, 2], boxes[:, 0], boxes[:, 2], size[1]),
                     _axis_shifts(before[:, 1], before[:, 3], boxes[:, 1], boxes[:, 3], size[0])], 1)


def _axis_shifts(low_before: np.ndarray, high_before: np.ndarray, low: np.ndarray, high: np.ndarray,
                 extent: int) -> np.ndarray:
    """Along one axis, each box centre's shift, rounded (half to even); where the box meets the frame's edge in
    either frame, the other side's: there the clipping, not the object, placed that side, and the centre moves at
    half the object's speed (an object leaving the frame left its old mask behind, a ghost up to its speed per frame
    wide)."""
    clipped_low = np.minimum(low_before, low) <= EDGE_PX
    clipped_high = np.maximum(high_before, high) >= extent - EDGE_PX
    shift = np.where(clipped_high & ~clipped_low, low - low_before,
                     np.where(clipped_low & ~clipped_high, high - high_before,
                              (low + high - low_before - high_before) / 2))
    return np.round(shift).astype(np.int64)
