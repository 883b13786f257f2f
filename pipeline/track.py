"""Track stage: stable integer ids for the instances of consecutive frames.

Each frame's detections are matched to the live tracks by Hungarian assignment (scipy) on mask IoU
(masks shrunk to `mask_size` for speed; a pair where either mask is only a few shrunk cells, an object too small
for that grid, on box IoU) or box IoU, optionally only within one class. As in ByteTrack, confident detections
(score >= `birth_score`) are matched first, the weak ones only then against the tracks still unmatched, so a
weak duplicate or fragment can never take a track from the confident detection of the same object, yet a briefly
weak detection still continues its track. A track's last box (and mask) is moved forward by its constant-velocity
estimate before matching, so fast objects still overlap their track. A track found once has no estimate yet:
matching on masks, the confident detections and such young tracks left unmatched get a second round on box IoU
(before the weak detections' round), so a fast or thin object (a ring moved off its own mask) keeps its new
track, and its style. A track that finds no detection keeps its last box and mask for up to `max_misses`
frames, so a short occlusion or a missed detection does not change the object's id (or its style).

On a frame the segmenter skipped (`segment_every` > 1, `FrameRecord.propagated`), the tracker supplies the
instances: each track matched or begun on the last segmented frame, that frame's detection moved along the
track's velocity (`Instances.moved`), with the track's id. Such frames leave the tracks as they are, except that
their motion counts the frame; `max_misses` counts segmented frames. A frame that starts a new shot
(`FrameRecord.cut`) ends every track first.

The tracker works on the host. A batch's boxes, scores, labels and shrunk masks come from the model's device in
one copy (`_on_host`, pipeline/host_copy.py), so the stage waits for a GPU once per batch, not at each of the
dozen small reads and writes a frame's matching makes. Track ids stay on the host: each reader wants them as a list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_iou

from gpu.transfer import row_index, to_device
from common.settings import check_settings, flag, number, whole
from pipeline.errors import PipelineConfigError
from pipeline.host_copy import to_host
from pipeline.record import FrameRecord
from pipeline.stage_timing import timed
from segment.roi_masks import per_frame
from segment.structures import Instances

MATCH_ON = ("mask", "box")
# A shrunk mask of fewer cells is matched on its box (`Tracker._iou`): below 4x4 cells a one-cell step on the grid,
# which a pixel's motion can make, may take the IoU under the default min_iou (3x3 moved diagonally: 4/14 = 0.29).
COARSE_CELLS = 16


def match(iou: Tensor, min_iou: float) -> list[tuple[int, int]]:
    """(detection, track) pairs maximising the summed IoU over pairs with IoU >= min_iou (Hungarian)."""
    if iou.numel() == 0:
        return []
    values = iou.double().cpu().numpy()
    weights = np.where(values >= min_iou, values, 0.0)  # NaN (two empty boxes: 0 / 0) is no match either
    rows, cols = linear_sum_assignment(weights, maximize=True)
    # Pairs below min_iou weigh 0: matching them is the same as leaving both unmatched, so drop them.
    return [(int(r), int(c)) for r, c in zip(rows, cols) if weights[r, c] > 0]


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every mask in a (D, h, w) with every one in b (T, h, w), bool or 0/1 float → (D, T)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def _cells(masks: Tensor) -> Tensor:
    """(N,) cells in each of the (N, h, w) 0/1 shrunk masks."""
    return masks.flatten(1).sum(1)


def shrink_masks(masks: Tensor, size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """(N, H, W) probabilities or bools → (N, h, w) bool by area averaging (a pixel is in if most of it is;
    RoIMasks.shrunk does the same for RoIMasks)."""
    if masks.shape[-2:] == size:
        return masks >= threshold if masks.dtype != torch.bool else masks
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0] >= threshold


def translated(masks: Tensor, offsets: Tensor) -> Tensor:
    """(N, h, w) float masks, each moved by its (dx, dy) px of `offsets` (N, 2): bilinear, zero outside.

    One grid_sample on the grid of pixel centres, shifted per mask. kornia's `translate` ends in the same
    grid_sample, but first builds, checks and inverts a 3x3 matrix per call, then F.affine_grid multiplies out a
    grid that only moves: about half the tracker's host time (2 cores, 10 detections a frame against ~45 tracks:
    `_update` 1.6-2.5 ms per frame with kornia and bool masks, 1.0-1.5 with this and 0/1 float masks)."""
    n, h, w = masks.shape
    step = 2 * offsets / torch.tensor([w, h], device=offsets.device)  # normalised coordinates span 2 over w (h) px
    grid = _pixel_centres(h, w, masks.device) - step[:, None, None]
    return F.grid_sample(masks[:, None], grid.to(masks.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


@lru_cache(maxsize=8)
def _pixel_centres(h: int, w: int, device: torch.device) -> Tensor:
    """(h, w, 2) grid_sample coordinates (x, y) of every pixel's centre, align_corners=False."""
    ys, xs = ((torch.arange(n, dtype=torch.float32, device=device) * 2 + 1) / n - 1 for n in (h, w))
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)


@dataclass
class _Detections:
    """One frame's detections on the host, as the tracker needs them."""

    boxes: Tensor                      # (N, 4) float32
    scores: Tensor                     # (N,) float32
    labels: Tensor                     # (N,) int64
    masks: Tensor | None               # (N, h, w) float 0/1, shrunk; None without masks or when matching on boxes

    def __len__(self) -> int:
        return self.boxes.shape[0]


@dataclass
class _Tracks:
    """Live tracks, aligned along dim 0: geometry in host tensors, bookkeeping in Python lists."""

    boxes: Tensor                      # (T, 4) last matched box
    velocity: Tensor                   # (T, 4) px per frame
    labels: Tensor                     # (T,)
    masks: Tensor | None               # (T, h, w) float 0/1, last matched mask (shrunk)
    ids: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)   # segmented frames since last matched
    gaps: list[int] = field(default_factory=list)     # frames since last matched, skipped ones included
    hits: list[int] = field(default_factory=list)     # frames matched so far
    shown: list[int] = field(default_factory=list)    # frames with its id: its hits, skipped frames it was moved onto

    def __len__(self) -> int:
        return len(self.ids)

    def extended(self, other: _Tracks) -> _Tracks:
        return _Tracks(boxes=torch.cat([self.boxes, other.boxes]), velocity=torch.cat([self.velocity, other.velocity]),
                       labels=torch.cat([self.labels, other.labels]),
                       masks=None if self.masks is None else torch.cat([self.masks, other.masks]),
                       ids=self.ids + other.ids, misses=self.misses + other.misses, gaps=self.gaps + other.gaps,
                       hits=self.hits + other.hits, shown=self.shown + other.shown)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        self.boxes, self.velocity, self.labels = self.boxes[index], self.velocity[index], self.labels[index]
        self.masks = None if self.masks is None else self.masks[index]
        self.ids = [self.ids[r] for r in rows]
        self.misses = [self.misses[r] for r in rows]
        self.gaps = [self.gaps[r] for r in rows]
        self.hits = [self.hits[r] for r in rows]
        self.shown = [self.shown[r] for r in rows]


class Tracker:
    """Sets `record.track_ids` ((N,) int64, -1 = untracked); `summary()` describes the tracks so far."""

    name = "track"

    def __init__(self, match_on: str = "mask", min_iou: float = 0.3, same_class: bool = True,
                 birth_score: float = 0.5, max_misses: int = 5, motion: bool = True,
                 velocity_momentum: float = 0.5, mask_size: int = 64):
        if match_on not in MATCH_ON:
            raise PipelineConfigError(f"track.match_on must be one of {', '.join(MATCH_ON)}, got {match_on!r}")
        self.match_on, self.same_class = match_on, flag(same_class, "track.same_class")
        self.min_iou, self.birth_score, self.momentum = (number(value, f"track.{key}", 0.0, 1.0) for key, value in (
            ("min_iou", min_iou), ("birth_score", birth_score), ("velocity_momentum", velocity_momentum)))
        self.max_misses, self.mask_size = whole(max_misses, "track.max_misses"), whole(mask_size, "track.mask_size", 4)
        self.motion = flag(motion, "track.motion")
        self.reset()

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> Tracker:
        keys = ("match_on", "min_iou", "same_class", "birth_score", "max_misses", "motion", "velocity_momentum",
                "mask_size")
        check_settings(cfg, keys, "track")
        return cls(**{key: cfg[key] for key in keys if key in cfg})

    def reset(self) -> None:
        self._tracks: _Tracks | None = None
        self._image_size: tuple[int, int] | None = None
        # the last segmented frame's instances and their track ids: what `_propagate` moves on the frames after it
        self._last: Instances | None = None
        self._last_ids: list[int] = []
        self._next_id = 1
        self._finished, self._finished_frames, self._longest = 0, 0, 0
        self._cuts = 0  # new shots, where every track ended

    # -- stage -------------------------------------------------------------------------------------

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        if batch:
            with timed(batch, self.name):
                segmented = [record for record in batch if not record.propagated]
                frames = iter(self._on_host([(record.instances, record.size) for record in segmented]))
                for record in batch:  # frames depend on each other: strictly in order
                    if record.propagated:
                        record.instances, record.track_ids = self._propagate(record.size)
                    else:
                        if record.cut:
                            self._end_all()
                            self._cuts += 1
                        record.track_ids = self._update(next(frames), record.size, record.instances)
        return batch

    def update(self, instances: Instances | None, image_size: tuple[int, int]) -> Tensor:
        """Matches one frame's detections to the tracks; returns their track ids ((N,) int64 on the CPU,
        -1 = untracked)."""
        return self._update(self._on_host([(instances, image_size)])[0], image_size, instances)

    def _on_host(self, frames: list[tuple[Instances | None, tuple[int, int]]]) -> list[_Detections]:
        """Each frame's boxes, scores, labels and (matching on masks) its masks shrunk on their device, brought to
        the host in one copy (pipeline/host_copy.py), packed as float32: labels are small integers and masks 0 or 1,
        so exactly."""
        pieces = []  # per frame: its table, then its shrunk masks (None where there are none)
        for (instances, _), masks in zip(frames, self._shrunk_masks(frames)):
            found = instances is not None and len(instances) > 0
            pieces.append(torch.cat([instances.boxes.float(), instances.scores.float()[:, None],
                                     instances.labels.float()[:, None]], 1) if found else None)
            pieces.append(None if masks is None else masks.float())
        host = to_host(pieces)
        detections = []
        for table, masks in zip(host[0::2], host[1::2]):
            table = torch.zeros((0, 6)) if table is None else table
            detections.append(_Detections(boxes=table[:, :4], scores=table[:, 4], labels=table[:, 5].long(),
                                          masks=masks))  # 0/1 floats, as mask_iou's product wants them
        return detections

    def _shrunk_masks(self, frames: list[tuple[Instances | None, tuple[int, int]]]) -> list[Tensor | None]:
        """Each frame's masks shrunk on their device (None where there are none to match on); the RoIMasks of a
        batch's frames in one call, which reads their windows for the stages after (one copy)."""
        shrunk: list[Tensor | None] = [None] * len(frames)
        masked = [f for f, (instances, _) in enumerate(frames) if self.match_on == "mask" and instances is not None
                  and len(instances) and instances.masks is not None]
        for f, masks in zip(masked, per_frame(
                [frames[f][0].masks for f in masked], lambda roi: roi.shrunk(self._small_size(roi.image_size)),
                full=lambda masks, _: shrink_masks(masks, self._small_size(masks.shape[-2:])))):
            shrunk[f] = masks
        return shrunk

    def _update(self, detections: _Detections, image_size: tuple[int, int], instances: Instances | None) -> Tensor:
        if self._image_size != tuple(image_size):
            self._end_all()
            self._image_size = tuple(image_size)
        tracks = self._tracks
        if len(detections) and tracks is not None and (tracks.masks is None) == (detections.masks is not None):
            self._end_all()  # the model lost (or gained) its mask branch: start over
            tracks = None
        pairs = self._match(detections, tracks) if tracks and len(detections) else []
        ids = [-1] * len(detections)  # a list, made a tensor once: a tensor's elements are written one operator each
        if tracks is not None:
            self._update_matched(tracks, detections, pairs)
            for d, t in pairs:
                ids[d] = tracks.ids[t]
            self._age_unmatched(tracks, {t for _, t in pairs})
        self._start_tracks(detections, ids, {d for d, _ in pairs})
        self._last, self._last_ids = instances, ids
        return torch.tensor(ids, dtype=torch.long)

    def _propagate(self, image_size: tuple[int, int]) -> tuple[Instances, Tensor]:
        """A frame the segmenter skipped: its instances and their track ids (see the module's docstring)."""
        tracks, last = self._tracks, self._last
        usable = tracks is not None and last is not None and tuple(image_size) == self._image_size
        pairs = []  # (track row, detection) for each tracked detection, in the detections' order (by score)
        if usable:
            row_of = {track_id: row for row, track_id in enumerate(tracks.ids)}  # all alive: nothing aged since
            pairs = [(row_of[track_id], d) for d, track_id in enumerate(self._last_ids) if track_id >= 0]
        if pairs:
            rows = [row for row, _ in pairs]
            steps = torch.tensor([tracks.gaps[row] + 1 for row in rows], dtype=torch.float32)[:, None]
            boxes = tracks.boxes[rows] + (tracks.velocity[rows] * steps if self.motion else 0)
            height, width = image_size
            inside = (boxes[:, 2] > 0) & (boxes[:, 0] < width) & (boxes[:, 3] > 0) & (boxes[:, 1] < height)
            # each side moves on its own: a shrinking box can close up or turn inside out, an empty mask
            inside &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            pairs = [pair for pair, keep in zip(pairs, inside.tolist()) if keep]  # gone from the frame: not drawn
            boxes = boxes[inside]
            for row, _ in pairs:
                tracks.shown[row] += 1
        if tracks is not None:
            tracks.gaps = [gap + 1 for gap in tracks.gaps]
        ids = torch.tensor([tracks.ids[row] for row, _ in pairs], dtype=torch.long)
        if not pairs:
            return (last[:0] if usable else Instances.empty(image_size, with_masks=False)), ids
        detections = last[row_index([d for _, d in pairs], last.device)]
        return detections.moved(to_device(boxes, last.device)), ids

    # -- matching ----------------------------------------------------------------------------------

    def _match(self, detections: _Detections, tracks: _Tracks) -> list[tuple[int, int]]:
        """(detection, track) pairs: the confident detections first, on `_iou` and then (matching on masks) on box IoU
        with the young tracks (`_young_by_box`), before the weak ones get the tracks still free; so a weak fragment
        left where a young track's object was cannot take the track its object's box round would give it."""
        iou = self._iou(detections)
        confident = (detections.scores >= self.birth_score).tolist()
        strong = [d for d, sure in enumerate(confident) if sure]
        weak = [d for d, sure in enumerate(confident) if not sure]
        pairs = [(strong[r], t) for r, t in match(iou[strong], self.min_iou)]
        if detections.masks is not None:
            pairs += self._young_by_box(detections, tracks, pairs, confident)
        free = sorted(set(range(len(tracks))) - {t for _, t in pairs})
        if weak and free:
            pairs += [(weak[r], free[c]) for r, c in match(iou[weak][:, free], self.min_iou)]
        return pairs

    def _small_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        scale = min(1.0, self.mask_size / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _iou(self, detections: _Detections) -> Tensor:
        tracks = self._tracks
        steps = torch.tensor(tracks.gaps, dtype=torch.float32)[:, None] + 1
        shift = tracks.velocity * steps if self.motion else torch.zeros_like(tracks.velocity)
        iou = box_iou(detections.boxes, tracks.boxes + shift)
        if detections.masks is not None:
            moved = self._moved_masks(tracks.masks, shift)
            # An object of a few shrunk cells (at 1080p one is 30 px square) has none, or gains and loses whole
            # cells as it moves a pixel: its mask IoU is noise, so such pairs keep the box IoU.
            coarse = _cells(detections.masks)[:, None] < COARSE_CELLS
            coarse = coarse | (_cells(moved)[None, :] < COARSE_CELLS)
            iou = torch.where(coarse, iou, mask_iou(detections.masks, moved))
        return self._same_class(iou, detections.labels, tracks.labels)

    def _same_class(self, iou: Tensor, detection_labels: Tensor, track_labels: Tensor) -> Tensor:
        """`iou` (D, T) zeroed between different classes when matching only within one."""
        return iou * (detection_labels[:, None] == track_labels[None, :]) if self.same_class else iou

    def _young_by_box(self, detections: _Detections, tracks: _Tracks, pairs: list[tuple[int, int]],
                      confident: list[bool]) -> list[tuple[int, int]]:
        """The confident detections and the young tracks (one hit: no motion estimate yet) that mask matching left
        unmatched, matched on box IoU. A young track's mask stays where it was found, so an object that moved far
        (a fast one, or any after the frames `segment_every` skips) overlaps it little, and a thin one (a ring) may
        not overlap it at all, while its box still does."""
        taken_d, taken_t = {d for d, _ in pairs}, {t for _, t in pairs}
        free_d = [d for d, sure in enumerate(confident) if sure and d not in taken_d]
        free_t = [t for t in range(len(tracks)) if tracks.hits[t] == 1 and t not in taken_t]
        if not free_d or not free_t:
            return []
        iou = self._same_class(box_iou(detections.boxes[free_d], tracks.boxes[free_t]), detections.labels[free_d],
                               tracks.labels[free_t])
        return [(free_d[r], free_t[c]) for r, c in match(iou, self.min_iou)]

    def _moved_masks(self, masks: Tensor, shift: Tensor) -> Tensor:
        """Track masks translated by their predicted box motion (centre shift, in shrunk-mask pixels)."""
        if not self.motion or not bool(shift.abs().max() >= 0.5 * self._image_size[0] / masks.shape[-2]):
            return masks
        scale = torch.tensor([masks.shape[-1] / self._image_size[1], masks.shape[-2] / self._image_size[0]])
        centre_shift = (shift[:, :2] + shift[:, 2:]) / 2 * scale
        return (translated(masks, centre_shift) >= 0.5).to(masks.dtype)

    # -- track bookkeeping -------------------------------------------------------------------------

    def _update_matched(self, tracks: _Tracks, detections: _Detections, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        d = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        t = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        gap = torch.tensor([tracks.gaps[p[1]] + 1 for p in pairs], dtype=torch.float32)[:, None]
        observed = (detections.boxes[d] - tracks.boxes[t]) / gap
        # A track's first motion estimate is the observed step; later ones are smoothed against box jitter.
        momentum = torch.tensor([self.momentum if tracks.hits[row] > 1 else 0.0 for _, row in pairs])[:, None]
        tracks.velocity[t] = momentum * tracks.velocity[t] + (1 - momentum) * observed
        tracks.boxes[t] = detections.boxes[d]
        tracks.labels[t] = detections.labels[d]
        if detections.masks is not None:
            tracks.masks[t] = detections.masks[d]
        for _, row in pairs:
            tracks.misses[row] = tracks.gaps[row] = 0
            tracks.hits[row] += 1
            tracks.shown[row] += 1

    def _age_unmatched(self, tracks: _Tracks, matched: set[int]) -> None:
        alive = []
        for row in range(len(tracks)):
            if row not in matched:
                tracks.misses[row] += 1
                tracks.gaps[row] += 1
            if tracks.misses[row] <= self.max_misses:
                alive.append(row)
            else:
                self._finish(tracks.shown[row])
        if len(alive) < len(tracks):
            tracks.keep(alive)

    def _start_tracks(self, detections: _Detections, ids: list[int], matched: set[int]) -> None:
        scores = detections.scores.tolist()
        born = [d for d in range(len(detections)) if d not in matched and scores[d] >= self.birth_score]
        if not born:
            return
        index = torch.tensor(born, dtype=torch.long)
        masks = None if detections.masks is None else detections.masks[index]
        new = _Tracks(boxes=detections.boxes[index], velocity=torch.zeros((len(born), 4)),
                      labels=detections.labels[index], masks=masks,
                      ids=list(range(self._next_id, self._next_id + len(born))),
                      misses=[0] * len(born), gaps=[0] * len(born), hits=[1] * len(born), shown=[1] * len(born))
        self._next_id += len(born)
        for d, track_id in zip(born, new.ids):
            ids[d] = track_id
        self._tracks = new if not self._tracks else self._tracks.extended(new)

    def _finish(self, shown: int) -> None:
        self._finished += 1
        self._finished_frames += shown
        self._longest = max(self._longest, shown)

    def _end_all(self) -> None:
        if self._tracks is not None:
            for shown in self._tracks.shown:
                self._finish(shown)
        self._tracks = None

    # -- report ------------------------------------------------------------------------------------

    def horizon(self, segment_every: int = 1) -> int:
        """Frames a live track can go unseen (in no frame's track ids) and still come back: missed on `max_misses`
        segmented frames, each up to `segment_every` apart. A track unseen for longer has ended."""
        return (self.max_misses + 1) * segment_every

    @property
    def active_ids(self) -> list[int]:
        return [] if self._tracks is None else list(self._tracks.ids)

    def summary(self) -> dict[str, float | int]:
        """tracks started, tracks still alive, mean and longest track length in video frames shown with the track's
        id (with `segment_every` > 1 the skipped frames it was moved onto count too), cuts to a new shot (where every
        track ended)."""
        live = [] if self._tracks is None else self._tracks.shown
        count = self._finished + len(live)
        total = self._finished_frames + sum(live)
        return {"tracks": count, "active": len(live), "mean_length": round(total / count, 1) if count else 0.0,
                "longest": max([self._longest, *live]), "cuts": self._cuts}
