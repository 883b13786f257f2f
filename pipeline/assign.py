"""Assign stage: which instances get stylized, and with which style.

Policies: `by_class` (a class → style map, other classes take `default_style`) and `per_instance` (each new
track takes the next palette style, round robin, and keeps it for its whole life, short misses included). A new
track skips styles held by tracks seen in the last `palette_memory` frames, so an object that reappears from
behind another (and so gets a new track) does not come back in the style of the object still on screen.
Instances of `exclude_classes`, below `min_score`, or with fewer than `min_area` mask pixels stay original.
A track unseen for longer than the tracker keeps a missed track (`track_horizon`) has ended: its style is
forgotten, so what the assigner holds, and its work per frame, stay flat over a long video however many objects
come and go (a COCO model's busy scene starts several tracks a frame).
Every style spec and class name the policy uses is checked against the bank and the model when the assigner is
built, so a typo fails before the first frame is decoded.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import one_line
from common.settings import check_settings, number, whole
from pipeline.errors import PipelineConfigError
from pipeline.host_copy import to_host
from pipeline.record import FrameRecord
from pipeline.stage_timing import timed
from segment.config import real_class_names
from segment.roi_masks import RoIMasks, per_frame
from segment.structures import mask_areas
from stylize.bank import ORIGINAL
from stylize.errors import StyleError

POLICIES = ("by_class", "per_instance")
# conf/style keys: the assigner's, plus those the stylize stage and the render read (bank, margin, region, precision...).
STYLE_KEYS = ("assign", "palette", "palette_memory", "class_styles", "default_style", "background", "exclude_classes",
              "min_score", "min_area", "margin", "region", "downsample", "max_side", "propagate", "crop_bucket",
              "cuda_graphs", "bank", "extra_styles", "precision")


def is_original(spec) -> bool:
    return spec is None or str(spec).strip().lower() == ORIGINAL


def listed(value) -> list:
    """A setting that takes a list, given as one item (style.palette=style_03 on the command line): that item alone,
    not its characters."""
    if value is None:
        return []
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


class StyleAssigner:
    """Sets `record.keep` ((N,) bool on the CPU: the instances that are objects, score and area enough) and
    `record.styles` (per instance: a style spec, None = original)."""

    name = "assign"

    def __init__(self, bank, class_names: list[str], policy: str = "per_instance", palette: list | None = None,
                 palette_memory: int = 48, class_styles: dict | None = None, default_style=None, background=ORIGINAL,
                 exclude_classes: list[str] | None = None, min_score: float = 0.5, min_area: int = 64,
                 track_horizon: int | None = None):
        if policy not in POLICIES:
            raise PipelineConfigError(f"style.assign must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.class_names = list(class_names)
        self.policy = policy
        self.palette = [self._style(s, "style.palette") for s in listed(palette)]
        if policy == "per_instance" and not any(s is not None for s in self.palette):
            raise PipelineConfigError("style.assign=per_instance needs a style.palette with at least one style")
        self.palette_memory = whole(palette_memory, "style.palette_memory")
        # The class map is checked against the model only where it is used, so the default config (written for
        # the demo segmenter's classes) still runs per_instance with a COCO model.
        check = self._class if policy == "by_class" else (lambda name, key: str(name))
        class_styles = {} if class_styles is None else class_styles
        if not isinstance(class_styles, Mapping):  # style.class_styles=abc: text, which has no classes
            raise PipelineConfigError("style.class_styles must be a map of class to style (style.class_styles.CLASS="
                                      f"STYLE), got {class_styles!r}")
        self.class_styles = {check(c, "style.class_styles"): self._style(s, f"style.class_styles.{c}")
                             for c, s in class_styles.items()}
        self.default_style = self._style(default_style, "style.default_style")
        self.background = self._style(background, "style.background")
        self.excluded = {self._class(c, "style.exclude_classes") for c in listed(exclude_classes)}
        self.min_score = number(min_score, "style.min_score", 0.0, 1.0)
        self.min_area = whole(min_area, "style.min_area")
        # frames after which an unseen track is forgotten (None: never); the palette's memory needs that long too
        self.horizon = None if track_horizon is None else max(int(track_horizon), self.palette_memory)
        self._validate_specs(bank)
        self._track_styles: dict[int, str | None] = {}
        self._last_seen: dict[int, int] = {}   # track id -> index of the last frame it was in, for every track held
        self._next_palette = 0
        self._bank_names = bank.names
        self.styles_used: set[str] = set()  # an index spec by the bank's name for it: "styles used: 3" meant nothing

    @classmethod
    def from_config(cls, cfg: DictConfig, bank, class_names: list[str], track_horizon: int | None = None
                    ) -> StyleAssigner:
        cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        check_settings(cfg, STYLE_KEYS, "style")
        return cls(bank, class_names, policy=cfg.get("assign", "per_instance"), palette=cfg.get("palette"),
                   palette_memory=cfg.get("palette_memory", 48),
                   class_styles=cfg.get("class_styles"), default_style=cfg.get("default_style"),
                   background=cfg.get("background", ORIGINAL), exclude_classes=cfg.get("exclude_classes"),
                   min_score=cfg.get("min_score", 0.5), min_area=cfg.get("min_area", 64), track_horizon=track_horizon)

    # -- validation --------------------------------------------------------------------------------

    def _style(self, spec, key: str) -> str | None:
        if isinstance(spec, (list, dict)):
            raise PipelineConfigError(f"{key} must be a style name, index or blend, got {spec!r}")
        return None if is_original(spec) else str(spec).strip()

    def _class(self, name, key: str) -> str:
        known = real_class_names(self.class_names)  # COCO's 'N/A' gaps are no classes
        if name not in known:
            raise PipelineConfigError(f"unknown class {name!r} in {key}; the model's classes: {', '.join(known)}")
        return name

    def _validate_specs(self, bank) -> None:
        """Each style spec the policy uses must name styles of the bank; the error names the setting. The class map
        and default style are by_class's alone: under per_instance the defaults (names of the 26 imported styles)
        stopped every render with a bank of other names."""
        settings = [*(("style.palette", spec) for spec in self.palette), ("style.background", self.background)]
        if self.policy == "by_class":
            settings += [(f"style.class_styles.{name}", spec) for name, spec in self.class_styles.items()]
            settings.append(("style.default_style", self.default_style))
        checked: set[str] = set()
        for key, spec in settings:
            if spec is None or spec in checked:
                continue
            checked.add(spec)
            try:
                bank.weights_for(spec)
            except StyleError as error:  # it names the bad style and the bank's; the setting is what to fix
                raise StyleError(f"{key}: {one_line(error)}") from None

    # -- stage -------------------------------------------------------------------------------------

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        if not batch:
            return batch
        with timed(batch, self.name):
            for record, (labels, passes) in zip(batch, self._on_host(batch)):
                self._assign(record, labels, passes)
            if self.background is not None:
                self._count_used([self.background])
        return batch

    def _on_host(self, batch: list[FrameRecord]) -> list[tuple[list[int], list[bool]]]:
        """Per frame, its instances' labels and whether each passes the score and area filters.

        The labels and score filter come back for the whole batch in one copy (pipeline/host_copy.py), then the mask
        areas of the instances that passed it in a second: an area pastes a mask over its box, and most of a COCO
        model's hundred detections a frame score below min_score."""
        frames = [([], []) if piece is None else piece.tolist() for piece in to_host([
            None if record.instances is None or not len(record.instances) else
            torch.stack([record.instances.labels, (record.instances.scores >= self.min_score).long()])
            for record in batch])]
        passes = [[bool(k) for k in scored] for _, scored in frames]
        rows = [[i for i, k in enumerate(scored) if k] for scored in passes]
        masked = [b for b, record in enumerate(batch) if rows[b] and record.instances.masks is not None]
        # the RoIMasks of all frames counted in one call (their windows read in one copy, if the tracker has not)
        areas = per_frame([batch[b].instances.masks for b in masked], RoIMasks.areas, [rows[b] for b in masked],
                          full=lambda masks, masks_rows: mask_areas(masks, rows=masks_rows))
        for b, counted in zip(masked, to_host(list(areas))):
            for i, area in zip(rows[b], counted.tolist()):
                passes[b][i] = area >= self.min_area
        return [(labels, scored) for (labels, _), scored in zip(frames, passes)]

    def _assign(self, record: FrameRecord, labels: list[int], passes: list[bool]) -> None:
        shown = [k and self.class_names[lab] not in self.excluded for k, lab in zip(passes, labels)]
        styles = self._styles(labels, record, shown) if labels else []
        record.styles = [s if k else None for s, k in zip(styles, shown)]
        # on the host, as its readers want it (a list each); an object left original is kept too: under a
        # background style the stylize stage keeps it as it is
        record.keep = torch.tensor(passes, dtype=torch.bool)
        self._count_used(s for s in record.styles if s is not None)

    def _count_used(self, specs: Iterable[str]) -> None:
        """Into styles_used, each index (checked when built: in the bank's range) by its style's name."""
        self.styles_used.update(self._bank_names[int(spec)] if spec.isdigit() else spec for spec in specs)

    def _styles(self, labels: list[int], record: FrameRecord, shown: list[bool]) -> list[str | None]:
        """Per instance, its style; a track takes a palette style on the first frame it is `shown` (drawn: its
        class not excluded, its score and area enough): one never drawn would hold a style that none shows, and
        the drawn ones would share the rest."""
        if self.policy == "by_class":
            return [self.class_styles.get(self.class_names[lab], self.default_style) for lab in labels]
        if record.track_ids is None:
            raise ValueError("style.assign=per_instance needs track ids: run the tracker before the assigner")
        ids = record.track_ids.tolist()
        tracked = set(ids) - {-1}
        self._forget(record.index)
        self._last_seen.update((track_id, record.index) for track_id in tracked & self._track_styles.keys())
        drawn = {track_id for track_id, k in zip(ids, shown) if k} - {-1}
        for track_id in sorted(drawn - self._track_styles.keys()):  # new tracks, in birth order
            self._track_styles[track_id] = self._palette_style_for_new_track(record.index)
            self._last_seen[track_id] = record.index
        # Untracked instances (too weak to start a track) have no stable identity, so no stable style.
        return [self._track_styles.get(track_id) for track_id in ids]

    def _forget(self, now: int) -> None:
        """Drops the tracks unseen for more than `horizon` frames: ended, and past the palette's memory."""
        if self.horizon is None:
            return
        for track_id in [t for t, seen in self._last_seen.items() if now - seen > self.horizon]:
            del self._last_seen[track_id], self._track_styles[track_id]

    def _palette_style_for_new_track(self, now: int) -> str | None:
        """The next palette style (round robin) not held by a recently seen track; when every style is held,
        the one whose holders were seen longest ago."""
        last_held: dict[str | None, int] = {}
        for track_id, seen in self._last_seen.items():
            if now - seen <= self.palette_memory:
                style = self._track_styles[track_id]
                last_held[style] = max(last_held.get(style, seen), seen)
        order = [(self._next_palette + k) % len(self.palette) for k in range(len(self.palette))]
        pick = min(order, key=lambda i: last_held.get(self.palette[i], -1))  # ties keep round-robin order
        self._next_palette = pick + 1
        return self.palette[pick]
