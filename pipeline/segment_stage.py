"""Segment stage: one batched `model.predict` per batch of frames, low-score detections dropped; with `every` N > 1
only frames N apart (stream index 0, N, 2N, ...) are segmented, the tracker moving their objects over the others,
and any frame that starts a new shot (`scene_cut`): the objects of the shot before must not be moved onto it. At any
N such a frame is marked `cut`, where the tracker ends every track: an object of the new shot that happens to
overlap one of the last shot's is another object, and must take neither its id (its style) nor its velocity.

A cut is a change of the picture's structure, not of its light or of where the camera points: the edges (cell-to-cell
differences of grey and of colour) of the centre of a frame's thumbnail are compared by correlation with the frame
before's at every shift of up to a sixth of the frame in half-cell steps, and the best match counts; so are those of
each quarter of the centre, and the frame's change is the lesser of the whole's and the quarters' median. A flash, a
light switched on or an exposure change leaves a correlation near 1, and so does a pan of up to a sixth of the frame
per frame; they end no track (every object would change style) and cost no extra segmentation. So does a large object
moving or turning fast: it spoils the match of the whole centre, not of the quarters it leaves."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from common.settings import number, whole
from pipeline.errors import PipelineConfigError
from pipeline.record import FrameRecord
from pipeline.stage_timing import timed

# A cut: a frame's change from the frame before exceeds this (0: the same picture up to light and a shift; 1:
# unrelated; 2: inverted). The change of a region of the thumbnail's central cells is 1 - the best correlation of its
# edges with those of the same region of any equal window of the frame before's; the frame's is the lesser of the
# whole centre's and the median of its quarters' (REGION_SPANS). Within a shot the centre's change stays at most 0.38
# (556 clips of skimage.data's photos: pans of 2-15% of the frame a frame 0.26, over fine textures 0.12; a flash of
# +80 levels 0.36; noise of sigma 20 0.24; zooms 0.17; two discs crossing on a plain ground 0.38) unless large
# objects move or turn fast: the demo scene at 4 to 8 times its speed (scripts/make_demo_clip.py --frames 24 / 12)
# reached 0.63-0.72, 37 of 300 frames over 0.5, where the quarters they leave still match: the frame's change is at
# most 0.44 at 4 times, 0.60 at 8 times (4 frames over 0.5). Between unrelated photos (1140 ordered pairs of 20 of
# them at 3 frame sizes) it is 0.54 or more in 99%; 6 were 0.40-0.49, all a blurred low-contrast retina close-up
# (microaneurysms) against a page of text or cells, which the centre alone scored 0.69 or more. docs/benchmarks.md,
# 2026-11-28. A cut missed costs less than one made up: the new shot's objects may take an old id where they overlap
# one, where a cut in a shot restyles every object on screen.
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
SIDE = CELLS - 1 - 2 * SHIFT  # the centre's cells compared (edges need a cell's neighbour: CELLS - 1 of them a row)


# The regions of the centre compared: the whole, then its quarters (the middle row in the upper two, the middle
# column in the left two), as a range of rows and one of columns, in cells
SPANS = ((0, SIDE), (0, (SIDE + 1) // 2), ((SIDE + 1) // 2, SIDE))
REGION_SPANS = ((0, 0), (1, 1), (1, 2), (2, 1), (2, 2))


@functools.cache
def _regions(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On `device`, made there (a copy from the host would wait for the GPU): (R, SIDE * SIDE) 0/1, the cells of each
    region; and (R, L, K1) twice, each region's rows', then columns', band (`_window_sums`)."""
    cells = torch.arange(SIDE, device=device)
    inside = [(cells >= start) & (cells < stop) for start, stop in SPANS]
    masks = torch.stack([inside[rows][:, None] & inside[columns] for rows, columns in REGION_SPANS]).flatten(1)
    length = 2 * CELLS - 3  # the half-cell-offset cells of a thumbnail (`_features`)
    offsets = torch.arange(length, device=device)[:, None] - torch.arange(length - 2 * (SIDE - 1), device=device)
    bands = [(offsets >= 2 * start) & (offsets < 2 * stop) & (offsets % 2 == 0) for start, stop in SPANS]
    rows, columns = (torch.stack([bands[span[axis]] for span in REGION_SPANS]).float() for axis in (0, 1))
    return masks.float(), rows, columns


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
        self._last: torch.Tensor | None = None  # the thumbnail the next frame is compared with
        self._size: tuple[int, int] | None = None  # the last frame's size

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        # a frame of another size starts a shot whatever scene_cut says: the tracker starts over there, so skipping
        # frames, one not segmented would show no object until the next segmented frame
        for record, new_size in zip(batch, self._resized(batch)):
            record.cut = new_size
        changes = self._changes(batch) if self.scene_cut is not None and batch else None
        if self.every > 1 and changes is not None:  # which frames to segment depends on the cuts: read them now
            self._mark_cuts(batch, changes.tolist())
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
                self._mark_cuts(batch, read[len(results):])
            for record, instances, count in zip(segmented, results, counts):
                record.instances = instances[:count]
        return batch

    def _resized(self, batch: list[FrameRecord]) -> list[bool]:
        """Per frame, whether its size differs from the frame before's (the stream's first has none before it): sizes
        are the host's, no wait."""
        sizes = [record.size for record in batch]
        if not sizes:
            return []
        before = [self._size or sizes[0], *sizes[:-1]]
        self._size = sizes[-1]
        return [size != old for size, old in zip(sizes, before)]

    def _changes(self, batch: list[FrameRecord]) -> torch.Tensor:
        """Per frame: the change of its thumbnail's centre against the last earlier thumbnail whose centre had a
        picture (`_region_correlations`): the lesser of the whole centre's and the median of its quarters', 0 where its
        centre is near uniform or no window of the one before has a picture (on the frames' device)."""
        thumbnails = torch.stack([_thumbnail(record.image) for record in batch])
        first = self._last is None
        last = thumbnails[0] if first else self._last
        # the current frame's cells: every second row and column of its half-cell-offset cells, from 2 * SHIFT on
        centre = _features(thumbnails)[..., 2 * SHIFT::2, 2 * SHIFT::2][..., :SIDE, :SIDE]  # (B, 9, SIDE, SIDE)
        flat = _spread(centre[:, :3].flatten(2).var(-1, unbiased=False)) < FLAT
        bases = [last]  # what each frame is compared with, chosen on the device: no wait
        for thumbnail, is_flat in zip(thumbnails, flat):
            bases.append(torch.where(is_flat, bases[-1], thumbnail))
        correlations, no_picture = _region_correlations(centre, _features(torch.stack(bases[:-1])))
        whole = 1 - correlations[:, 0].nan_to_num(-1.0).amax(-1)
        # each quarter's best shift (a large object moving fast spoils some, a new shot every one), then their median;
        # a quarter without a picture (plain sky) says nothing, and with none left the whole centre's change counts
        quarters = correlations[:, 1:].nan_to_num(-2.0).amax(-1)
        median = 1 - quarters.masked_fill(quarters < -1.5, float("nan")).nanquantile(0.5, 1, interpolation="midpoint")
        # no window of the frame before with a picture: a near-uniform frame, which only the stream's first can be (a
        # later one is no base)
        flat |= no_picture[:, 0]
        self._last = bases[-1]
        changes = torch.minimum(whole, median.nan_to_num(2.0)).masked_fill_(flat, 0.0)
        # the stream's first frame: no shot before it (compared with itself, float noise). zero_(), not `= 0.0`: a
        # number set into a CUDA tensor is copied there from the host, a wait (GPU session 7)
        if first:
            changes[0].zero_()
        return changes

    def _mark_cuts(self, batch: list[FrameRecord], changes: list[float]) -> None:
        """`cut` also where the thumbnail changed more than `scene_cut` (a frame of another size is one already)."""
        for record, change in zip(batch, changes):
            record.cut = record.cut or change > self.scene_cut + CHANGE_NOISE


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


def _region_correlations(centre: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`centre` (B, 9, SIDE, SIDE), the current frames' cells, and `before` (B, 9, L, L), the half-cell-offset cells of
    the frames they are compared with -> per region of the centre (REGION_SPANS: the whole, its quarters), (B, R, K):
    the correlation of its edges with those of the same region of each window of `before` (K = (4 * SHIFT + 1) ** 2
    windows of SIDE x SIDE cells a cell apart), NaN where either has no picture (near uniform); and (B, R) whether a
    region has no picture in the centre or in every window.

    Matrix products of the unfolded windows, not convolutions: cuDNN's may round to TF32, and identical frames must
    correlate to within 1e-5."""
    regions, row_bands, column_bands = _regions(centre.device)  # (R, n), n = SIDE * SIDE; (R, L, K1) twice
    sizes = regions.sum(1, keepdim=True)                       # (R, 1)
    before = before - before.mean((-2, -1), keepdim=True)      # less rounding in mean square less squared mean
    means, squares = (_window_sums(values, row_bands, column_bands) / sizes
                      for values in (before, before.square()))
    variances = squares - means.square()                       # (B, 9, R, K)
    cells = centre.flatten(2)                                  # (B, 9, n)
    centre_means = cells @ regions.T / sizes.T                 # (B, 9, R)
    centre_variances = cells.square() @ regions.T / sizes.T - centre_means.square()
    # each region's edges less their means there (the window's means then drop out of the products), 0 elsewhere
    edges = (cells[:, None, 3:] - centre_means[:, 3:].transpose(1, 2)[..., None]) * regions[:, None]  # (B, R, 6, n)
    products = torch.bmm(edges.flatten(2), F.unfold(before[:, 3:], SIDE, dilation=2))  # (B, R, K)
    norms = (variances[:, 3:].sum(1) * sizes * edges.square().sum((2, 3))[..., None]).sqrt()
    correlation = products / norms.clamp_min(1e-6)
    flat_windows = _spread(variances[:, :3].permute(0, 2, 3, 1)) < FLAT          # (B, R, K)
    no_picture = (_spread(centre_variances[:, :3].transpose(1, 2)) < FLAT)[..., None] | flat_windows
    return correlation.masked_fill(no_picture, float("nan")), no_picture.all(-1)


def _window_sums(cells: torch.Tensor, row_bands: torch.Tensor, column_bands: torch.Tensor) -> torch.Tensor:
    """(B, C, L, L) half-cell-offset cells -> (B, C, R, K): each channel's sum over each region of the window of
    SIDE x SIDE cells a cell apart (every second row and column) at each half-cell offset, K = K1 * K1 of them
    (row-major, as F.unfold's). A box filter's passes along the columns and the rows, as matrix products with the
    regions' bands (`_regions`; cuDNN's convolutions may round to TF32)."""
    return (row_bands.transpose(1, 2) @ cells[:, :, None] @ column_bands).flatten(-2)
