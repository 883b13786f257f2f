"""Segment stage: one batched `model.predict` per batch of frames, low-score detections dropped; with `every` N > 1
only frames N apart (stream index 0, N, 2N, ...) are segmented, the tracker moving their objects over the others,
and any frame that starts a new shot (`scene_cut`): the objects of the shot before must not be moved onto it. At any
N such a frame is marked `cut`, where the tracker ends every track: an object of the new shot that happens to
overlap one of the last shot's is another object, and must take neither its id (its style) nor its velocity.

A cut is a change of the picture's structure, not of its light or of where the camera points: the edges (cell-to-cell
differences of grey and of colour) of the centre of a frame's thumbnail are compared by correlation with the frame
before's at every shift of up to a sixth of the frame in half-cell steps, and the best match counts. A flash, a light
switched on or an exposure change leaves a correlation near 1, and so does a pan of up to a sixth of the frame per
frame; they end no track (every object would change style) and cost no extra segmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.settings import number, whole
from pipeline.errors import PipelineConfigError
from pipeline.record import FrameRecord
from pipeline.stage_timing import timed

# A cut: 1 - the best correlation of the edges of a frame's thumbnail's central cells with those of any equal window of
# the frame before's exceeds this (0: the same picture up to light and a shift; 1: unrelated; 2: inverted). Over
# skimage.data's photos: at cuts between two unrelated ones 0.59-1.0, 99% over 0.71 (1032 ordered pairs of 26 photos,
# at 2 or 3 frame sizes); within a shot at most 0.38 (556 clips: pans of 2-15% of the frame a frame 0.26, over fine
# textures 0.12; a flash of +80 levels 0.36; the demo clip's scene 0.33; two discs crossing on a plain ground 0.38;
# noise of sigma 20 0.24; zooms 0.17): 0.5 lies between. The 8x8 grey-level measure before scored 22% of those cuts
# 0.5 or less (0 where a window of the frame before was near uniform), and 14 of those clips over 0.5 (up to 1.04).
SCENE_CUT = 0.5
# A thumbnail whose central cells spread less than this (grey levels, standard deviation, colour counted in) is near
# uniform (a black or white frame, a fade's end): its correlation says nothing, so it starts no shot, and the next
# frame is compared with the last one that had a picture (a cut through a fade to black is still a cut; a black frame
# within a shot is not). A near-uniform window of the frame before (plain sky) is no match either: its edges are
# noise, which could correlate with anything; the other windows still count.
FLAT = 4.0
# The thumbnail's side in cells. Finer than 8: the central 6x6 cells of an 8x8 one were too few, best of 9 shifts, to
# tell two photos apart (a chance correlation over 0.5 was common); edges rather than levels, for the same reason: a
# photo's levels are mostly its broad shading (bright top, dark bottom), alike in many photos.
CELLS = 24
# The farthest shift tried, in cells: pans of up to a sixth of the frame a frame. The frame before's cells are taken
# at every half-cell offset too: edges at a fine scale decorrelate at a shift of half a cell (a pan over gravel or
# brick), at a quarter they hold.
SHIFT = 4
CHANGE_NOISE = 1e-5  # float32 rounding of 1 - correlation between identical thumbnails (up to 2e-6): no change at all
GREY = (0.299, 0.587, 0.114)


class SegmentStage:
    """Fills `record.instances` (on the model's device) with the detections scoring >= `score_threshold`, their masks
    as `RoIMasks` (segment/roi_masks.py): each stage pastes what it reads, nothing holds a full-frame mask."""

    name = "segment"

    def __init__(self, model, score_threshold: float = 0.5, every: int = 1, scene_cut: float | None = SCENE_CUT):
        number(score_threshold, "segment.score_threshold", 0.0, 1.0)
        whole(every, "segment_every", 1)
        if scene_cut is not None and (isinstance(scene_cut, bool) or not isinstance(scene_cut, (int, float))
                                      or not 0 <= scene_cut <= 2):
            raise PipelineConfigError(f"scene_cut must be null or a number in [0, 2], got {scene_cut!r}")
        self.model = model
        self.score_threshold = float(score_threshold)
        self.every = every
        self.scene_cut = scene_cut
        self._last: tuple[torch.Tensor, tuple[int, int]] | None = None  # the last frame's thumbnail and size

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        changes, resized = self._changes(batch) if self.scene_cut is not None and batch else (None, [])
        if self.every > 1 and changes is not None:  # which frames to segment depends on the cuts: read them now
            self._mark_cuts(batch, changes.tolist(), resized)
            changes = None
        for record in batch:
            record.propagated = record.index % self.every != 0 and not record.cut
        segmented = [record for record in batch if not record.propagated]
        if not segmented:
            return batch
        with timed(segmented, self.name):
            images = [record.image for record in segmented]
            same_size = len({tuple(image.shape) for image in images}) == 1
            results = self.model.predict(torch.stack(images) if same_size else images, full_masks=False)
            # detections come highest score first, so the kept ones are a prefix of each frame's: one host sync
            # for the whole batch's counts (and, segmenting every frame, its changes), where a boolean index per
            # frame would make the host wait per frame
            counts = torch.stack([(r.scores >= self.score_threshold).sum() for r in results])
            if changes is None:
                counts = counts.tolist()
            else:
                read = torch.cat([counts.float(), changes.to(counts.device)]).tolist()
                counts = [int(count) for count in read[:len(results)]]
                self._mark_cuts(batch, read[len(results):], resized)
            for record, instances, count in zip(segmented, results, counts):
                record.instances = instances[:count]
        return batch

    def _changes(self, batch: list[FrameRecord]) -> tuple[torch.Tensor, list[bool]]:
        """Per frame: 1 - the best correlation of its thumbnail's centre with a window that has a picture of the last
        earlier thumbnail whose centre had one, 0 where its centre is near uniform or every such window is (on the
        frames' device), and whether its size changed."""
        thumbnails = torch.stack([_thumbnail(record.image) for record in batch])
        sizes = [record.size for record in batch]
        first = self._last is None
        last = self._last or (thumbnails[0], sizes[0])
        side = CELLS - 1 - 2 * SHIFT  # the centre's cells (edges need a cell's neighbour: CELLS - 1 of them a row)
        # the current frame's cells: every second row and column of its half-cell-offset cells, from 2 * SHIFT on
        centre = _features(thumbnails)[..., 2 * SHIFT::2, 2 * SHIFT::2][..., :side, :side]  # (B, 9, side, side)
        flat = _spread(centre[:, :3].flatten(2).var(-1, unbiased=False)) < FLAT
        bases = [last[0]]  # what each frame is compared with, chosen on the device: no wait
        for thumbnail, is_flat in zip(thumbnails, flat):
            bases.append(torch.where(is_flat, bases[-1], thumbnail))
        before = _features(torch.stack(bases[:-1]))
        before = before - before.mean((-2, -1), keepdim=True)  # less rounding in mean square less squared mean
        means, squares = _window_means(torch.cat([before, before.square()], 1), side).flatten(2).chunk(2, 1)
        variances = squares - means.square()  # (B, 9, K): in every window of `before`, K = (4 * SHIFT + 1) ** 2
        flat_windows = _spread(variances[:, :3].transpose(1, 2)) < FLAT
        edges = (centre[:, 3:] - centre[:, 3:].mean((-2, -1), keepdim=True)).flatten(1)  # (B, 6n)
        # each window's edges times the centre's, both less their means (the centre's sum to 0: no need for theirs);
        # a matrix product of the unfolded windows, not a convolution: cuDNN's may round to TF32, and identical
        # frames must correlate to within 1e-5
        windows = F.unfold(before[:, 3:], side, dilation=2)  # (B, 6n, K)
        products = torch.bmm(edges[:, None], windows)[:, 0]
        norms = (variances[:, 3:].sum(1) * side * side * edges.square().sum(1, keepdim=True)).sqrt()
        correlation = products / norms.clamp_min(1e-6)     # (B, K)
        # no window of `before` with a picture: a near-uniform frame, which only the stream's first can be (a later
        # one is no base)
        flat |= flat_windows.all(1)
        self._last = (bases[-1], sizes[-1])
        resized = [size != old for size, old in zip(sizes, [last[1], *sizes[:-1]])]
        changes = (1 - correlation.masked_fill(flat_windows, -1.0).amax(1)).masked_fill_(flat, 0.0)
        # the stream's first frame: no shot before it (compared with itself, float noise). zero_(), not `= 0.0`: a
        # number set into a CUDA tensor is copied there from the host, a wait (GPU session 7)
        if first:
            changes[0].zero_()
        return changes, resized

    def _mark_cuts(self, batch: list[FrameRecord], changes: list[float], resized: list[bool]) -> None:
        """`cut` where a new shot starts: the thumbnail changed more than `scene_cut`, or the frame's size did."""
        for record, change, new_size in zip(batch, changes, resized):
            record.cut = change > self.scene_cut + CHANGE_NOISE or new_size


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, 2 * CELLS, 2 * CELLS) float: grey (0-255), blue - grey and red - grey, each half-cell the
    average of all its pixels. Averaged, not sampled every k-th pixel: a fine texture's samples alias into a pattern
    that a pan reshuffles (a pan over brick made cuts); grey and colour are taken after it (linear: the same)."""
    rgb = F.interpolate(image[None].float(), size=(2 * CELLS, 2 * CELLS), mode="area")[0]
    grey = sum(weight * channel for weight, channel in zip(GREY, rgb))
    return torch.stack([grey, rgb[2] - grey, rgb[0] - grey])


def _spread(variances: torch.Tensor) -> torch.Tensor:
    """(..., 3) variances of cells' grey, blue - grey and red - grey -> (...): the root of their sum. Colour counts: a
    picture of one grey level (a red ball on a green lawn) is not uniform."""
    return variances.sum(-1).clamp_min(0).sqrt()


def _features(thumbnails: torch.Tensor) -> torch.Tensor:
    """(B, 3, 2 * CELLS, 2 * CELLS) half-cell thumbnails -> (B, 9, 2 * CELLS - 3, same): at every half-cell offset, a
    cell's 3 channels, then their differences to the cell on the right, then to the cell below. Differences: light
    added or scaled leaves their correlation as it was, and they tell photos apart."""
    cells = F.avg_pool2d(thumbnails, 2, stride=1)
    return torch.cat([cells[..., :-2, :-2], cells[..., :-2, 2:] - cells[..., :-2, :-2],
                      cells[..., 2:, :-2] - cells[..., :-2, :-2]], 1)


def _window_means(cells: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, L, L) half-cell-offset cells -> (B, C, K, K), K = L - 2 * (side - 1): each channel's mean over the window
    of side x side cells a cell apart (every second row and column) at each half-cell offset. A box filter's passes
    along the columns and the rows, as matrix products (cuDNN's convolutions may round to TF32)."""
    offsets = torch.arange(cells.shape[-1], device=cells.device)[:, None] - torch.arange(
        cells.shape[-1] - 2 * (side - 1), device=cells.device)
    band = ((offsets >= 0) & (offsets < 2 * side) & (offsets % 2 == 0)).to(cells.dtype) / side  # (L, K)
    return band.T @ cells @ band
