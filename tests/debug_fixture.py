"""Hand-built FrameRecords for the debug dump and viewer tests: two moving discs (tracked, styled), one untracked square."""
from __future__ import annotations

from fractions import Fraction

import torch

from pipeline.record import FrameRecord, StylizedRegion
from segment.structures import Instances

CLASS_NAMES = ["__background__", "person", "dog", "car"]
TRACK_CLASSES = {0: "person", 1: "dog"}


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    return (r + 0.5 - dist).clamp(0, 1)    # soft edge: probabilities, not just 0/1


def _scene(h: int, w: int, masks: list[torch.Tensor], colors: list[tuple[int, int, int]], g: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = torch.stack([60 + 80 * xx, 90 + 60 * yy, 150 - 50 * xx]) + 6 * torch.randn(3, h, w, generator=g)
    for mask, color in zip(masks, colors):
        image = image * (1 - mask) + torch.tensor(color, dtype=torch.float32)[:, None, None] * mask
    return image.clamp(0, 255).to(torch.uint8)


def synthetic_records(n: int = 12, h: int = 90, w: int = 160, background: bool = False) -> list[FrameRecord]:
    """Track 0 (person) lives through every frame; track 1 (dog) frames 2..8 with a style switch
    (mosaic → left original) at 5; an untracked car square on even frames; odd frames marked as not segmented
    (`propagated`), track 0's stylized crop carried there (`style.propagate`); frame 6 marked as a new shot (`cut`,
    its ids kept: the viewer only labels it). Deterministic timings.

    `background`: as under a background style, every frame has a background frame under the crops; the dog left
    original is kept (an excluded class: a region of its own pixels, as the stylize stage gives it) and the car,
    not kept, is painted by the background."""
    records = []
    g = torch.Generator().manual_seed(0)
    sy, sx = h / 90, w / 160
    for i in range(n):
        masks, boxes, labels, scores, tracks, styles, colors = [], [], [], [], [], [], []
        cx, cy, r = (30 + 5 * i) * sx, 45 * sy, 18 * sy
        masks.append(_disc(h, w, cy, cx, r)); boxes.append([cx - r, cy - r, cx + r, cy + r]); labels.append(1)
        scores.append(0.9); tracks.append(0); styles.append("candy"); colors.append((230, 200, 170))
        if 2 <= i <= 8:
            cx, cy, r = 120 * sx, 30 * sy, 12 * sy
            masks.append(_disc(h, w, cy, cx, r)); boxes.append([cx - r, cy - r, cx + r, cy + r]); labels.append(2)
            scores.append(0.75); tracks.append(1); styles.append("mosaic" if i < 5 else None); colors.append((120, 80, 40))
        if i % 2 == 0:
            square = torch.zeros(h, w); square[int(70 * sy):int(85 * sy), int(5 * sx):int(25 * sx)] = 1.0
            masks.append(square); boxes.append([5 * sx, 70 * sy, 25 * sx, 85 * sy]); labels.append(3)
            scores.append(0.55); tracks.append(-1); styles.append(None); colors.append((200, 30, 30))
        image = _scene(h, w, masks, colors, g)
        keep = [s is not None or (background and label == 2) for s, label in zip(styles, labels)]
        inst = Instances(image_size=(h, w), boxes=torch.tensor(boxes, dtype=torch.float32),
                         scores=torch.tensor(scores), labels=torch.tensor(labels), masks=torch.stack(masks))
        backdrop = None
        if background:
            yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
            backdrop = torch.stack([0.2 + 0.6 * yy, 0.8 - 0.6 * xx, 0.5 + 0.3 * xx * yy]).float()
        stylized, output = [], image.float() / 255 if backdrop is None else backdrop.clone()
        for k, style in enumerate(styles):
            if style is None and not (backdrop is not None and keep[k]):
                continue
            x1, y1, x2, y2 = (int(v) for v in boxes[k])
            phase = 0.0 if style == "candy" else 2.0
            yy, xx = torch.meshgrid(torch.arange(y2 - y1), torch.arange(x2 - x1), indexing="ij")
            pixels = torch.stack([(0.5 + 0.5 * torch.sin(0.5 * xx + phase + c)) * (0.5 + 0.5 * torch.cos(0.4 * yy))
                                  for c in range(3)]).float()
            if style is None:   # kept, left original under the background: its own pixels
                pixels = image[:, y1:y2, x1:x2].float() / 255
            stylized.append(StylizedRegion(instance=k, style=style or "original", box=(x1, y1, x2, y2),
                                           pixels=pixels, carried=i % 2 == 1 and style == "candy"))
            alpha = masks[k][y1:y2, x1:x2]
            output[:, y1:y2, x1:x2] = output[:, y1:y2, x1:x2] * (1 - alpha) + pixels * alpha
        records.append(FrameRecord(
            index=i, pts=i * 512, time_base=Fraction(1, 12800), image=image, instances=inst, propagated=i % 2 == 1,
            cut=i == 6,
            track_ids=torch.tensor(tracks), styles=styles, keep=torch.tensor(keep),
            stylized=stylized, background=backdrop, output=(output * 255).round().to(torch.uint8),
            timings={"decode": 0.001 * (1 + i % 3), "segment": 0.02 + 0.001 * i, "track": 0.0005, "composite": 0.004}))
    return records


def write_dump(directory, n: int = 12, every: int = 1, max_side: int = 640, batch: int = 4, size=(90, 160),
               background: bool = False, records: list[FrameRecord] | None = None, **kwargs):
    """Dumps `records` (default: `synthetic_records`) through DebugDumper in batches, as the render does; returns
    the records. `kwargs` go to DebugDumper (overwrite, mask_threshold, background_style...)."""
    from pipeline.debug import DebugDumper
    records = synthetic_records(n, *size, background=background) if records is None else records
    dumper = DebugDumper(directory, CLASS_NAMES, every=every, max_side=max_side, **kwargs)
    for start in range(0, len(records), batch):
        dumper.write(records[start:start + batch])
    dumper.close()
    return records
