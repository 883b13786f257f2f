"""COCO evaluation (pycocotools COCOeval, bbox + segm) of a segmenter on a COCO-format dataset.

    python -m segment.evaluate --checkpoint models/demo_segmenter.pt \
        --images data/synthetic/val --annotations data/synthetic/annotations/instances_val.json
"""
from __future__ import annotations

from common.signals import STARTING, leaving, on_stop_signals  # light: what follows them is not

if __name__ == "__main__":  # a stop signal while torch loads: one line, not a traceback; main's own handlers follow
    on_stop_signals(leaving(STARTING))

import argparse
import contextlib
import copy
import io
import math
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from common.arguments import reports_user_errors, torch_device, whole_number
from segment.data.coco import CocoDetection
from segment.data.errors import DatasetError
from segment.structures import Instances
from segment.workers import quiet_worker, starting_workers

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def to_coco_results(
    instances_list: Sequence[Instances],
    image_ids: Sequence[int],
    label_to_category_id: dict[int, int],
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Detections -> COCO result dicts {image_id, category_id, score, bbox (xywh), segmentation (compressed RLE,
    counts as str) when masks are present}. Labels missing from the mapping (classes the dataset does not
    have) are left out."""
    if len(instances_list) != len(image_ids):
        raise ValueError(f"{len(instances_list)} results for {len(image_ids)} image ids")
    results = []
    for instances, image_id in zip(instances_list, image_ids):
        instances = instances.cpu()
        boxes = instances.boxes.float().clone()
        boxes[:, 2:] -= boxes[:, :2]
        rles = None
        if instances.masks is not None and len(instances):
            binary = (instances.masks >= mask_threshold) if instances.masks.is_floating_point() else instances.masks
            rles = mask_utils.encode(np.asfortranarray(binary.to(torch.uint8).permute(1, 2, 0).numpy()))
        rows = zip(boxes.tolist(), instances.scores.tolist(), instances.labels.tolist())
        for i, (box, score, label) in enumerate(rows):
            if label not in label_to_category_id:
                continue
            result = {"image_id": int(image_id), "category_id": int(label_to_category_id[label]),
                      "bbox": [round(v, 3) for v in box], "score": float(score)}
            if rles is not None:
                result["segmentation"] = {"size": list(rles[i]["size"]), "counts": rles[i]["counts"].decode("ascii")}
            results.append(result)
    return results


def coco_eval(
    coco_gt: COCO, results: list[dict], image_ids: Sequence[int], category_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, float]:
    """COCOeval over `image_ids` -> {"bbox_AP": ..., ..., "segm_ARl": ...} (the 12 summary stats per type).
    No detections at all is scored by COCOeval too: 0 where there is ground truth, -1 where there is none (an area
    range without objects)."""
    stats: dict[str, float] = {}
    for iou_type in iou_types:
        typed = [r for r in results if iou_type != "segm" or "segmentation" in r]
        if iou_type == "segm":
            # without the box, loadRes takes each detection's area from its mask, as COCO's segm protocol does
            typed = [{k: v for k, v in r.items() if k != "bbox"} for r in typed]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(typed)) if typed else _no_detections(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = list(image_ids)
            if category_ids is not None:
                evaluator.params.catIds = list(category_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        values = [float(v) for v in evaluator.stats]
        stats.update({f"{iou_type}_{name}": value for name, value in zip(STAT_NAMES, values)})
    return stats


def _no_detections(coco_gt: COCO) -> COCO:
    """An empty result set for COCOeval (loadRes refuses an empty list)."""
    empty = COCO()
    empty.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                     "annotations": []}
    empty.createIndex()
    return empty


def category_map(class_names: Sequence[str], dataset: CocoDetection) -> dict[int, int]:
    """Model label -> dataset category id (model class_names[0] is background). A model whose classes are the
    dataset's, in order (what segment.train makes of a dataset), maps label k to the dataset's label k: by id,
    even where two categories share a name. Another model maps by class name, and a name that several of the
    dataset's categories share is refused as ambiguous; a model with generic names but as many classes as the
    dataset maps by position."""
    if list(class_names[1:]) == list(dataset.class_names):
        return dict(dataset.label_to_category_id)
    ids_by_name = defaultdict(list)
    for name, category_id in zip(dataset.class_names, dataset.category_ids):
        ids_by_name[name].append(category_id)
    mapping = {}
    for label, name in enumerate(class_names):
        if label == 0 or name not in ids_by_name:
            continue
        if len(ids_by_name[name]) > 1:
            raise DatasetError(f"{dataset.annotation_file}: categories {ids_by_name[name]} share the name {name!r}, "
                               f"so which of them the model's label {label} is cannot be told by name")
        mapping[label] = ids_by_name[name][0]
    if mapping:
        return mapping
    if len(class_names) - 1 == len(dataset.category_ids):
        return dict(dataset.label_to_category_id)
    raise DatasetError(f"the model's classes {list(class_names[1:6])}... share no names with the dataset's "
                       f"categories {dataset.class_names[:5]}... and their counts differ")


def ground_truth(dataset: CocoDetection, count: int) -> COCO:
    """COCOeval's ground truth for the dataset's first `count` images: the objects and crowd regions the dataset
    reads (`CocoDetection.annotations`: what training uses), not the raw file, whose annotations with no usable
    mask and without 'iscrowd' pycocotools cannot score. Reading them all checks them before any image is run."""
    coco = COCO()  # given no file, it neither reads nor prints
    coco.dataset = {
        "images": [dataset.coco.imgs[i] for i in dataset.image_ids[:count]],
        "annotations": [ann for index in range(count) for ann in dataset.annotations(index)],
        "categories": [dataset.coco.cats[c] for c in dataset.category_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.inference_mode()
def evaluate(
    model,
    dataset: CocoDetection,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    max_images: int | None = None,
    label_to_category_id: dict[int, int] | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Runs `model.predict` on the dataset's images at their file resolution (the dataset's own transforms are
    not used) and scores them with COCOeval against `ground_truth(dataset, ...)`, checked before the model runs.
    Labels map to category ids by `label_to_category_id`, else by `category_map(model.class_names, dataset)`.
    Returns {"bbox_AP", "bbox_AP50", ..., "segm_AP", ...}."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count < 1:  # COCOeval would score nothing as zeros, which reads like a result
        raise DatasetError(f"no images to evaluate ({len(dataset)} in the dataset, max_images={max_images})")
    coco_gt = ground_truth(dataset, count)
    if device is not None:
        model = model.to(device)
    if label_to_category_id is None:
        label_to_category_id = category_map(model.class_names, dataset)
    # a generator of its own: without one, iterating the loader draws its workers' base seed from the global RNG
    # (with no workers too), which a training that evaluates on the way goes on sampling from
    loader = torch.utils.data.DataLoader(
        _Images(dataset), batch_size=batch_size, sampler=range(count), num_workers=num_workers,
        collate_fn=_unzip, generator=torch.Generator().manual_seed(0), worker_init_fn=quiet_worker,
    )
    # A dataset's images come in many sizes: CUDA graphs of the model's front would be captured (memory, time)
    # for sizes that seldom come back, so evaluation runs without them.
    graphs = getattr(model, "cuda_graphs", None)
    if graphs:
        model.set_inference_options(cuda_graphs=False)
    results, image_ids = [], []
    try:
        with starting_workers():  # a SIGTERM to the process group is the command's to report (segment/workers.py)
            batches = iter(loader)
        for images, ids in tqdm(batches, desc="evaluate", unit="batch", total=len(loader), disable=not progress):
            instances = model.predict(list(images))
            results += to_coco_results(instances, ids, label_to_category_id)
            image_ids += ids
    finally:
        if graphs:
            model.set_inference_options(cuda_graphs=graphs)
    return coco_eval(coco_gt, results, image_ids, dataset.category_ids)


def _unzip(batch: list[tuple]) -> tuple:
    return tuple(zip(*batch))


class _Images(torch.utils.data.Dataset):
    """(uint8 image, image id) pairs of a CocoDetection: no targets are built, no transforms run."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset.load_image(index), self.dataset.image_ids[index]


def format_table(stats: dict[str, float]) -> str:
    types = sorted({k.split("_", 1)[0] for k in stats}, key=lambda t: IOU_TYPES.index(t) if t in IOU_TYPES else 9)
    lines = [f"{'':6}" + "".join(f"{name:>7}" for name in STAT_NAMES)]
    for iou_type in types:
        lines.append(f"{iou_type:6}" + "".join(f"{stats[f'{iou_type}_{name}']:7.3f}" for name in STAT_NAMES))
    return "\n".join(lines)


def _fraction(text: str) -> float:
    """argparse type of --score-threshold: a number from 0 to 1, refused here, not by the model's config as
    segment.score_threshold, a setting this command does not have."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # nan too
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


@reports_user_errors  # a UserError or a stop signal: one line, exit 2 or 128 + n
def main(argv: Sequence[str] | None = None) -> int:
    from segment.config import PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m segment.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="our segmenter checkpoint or a torchvision state_dict")
    parser.add_argument("--images", required=True, help="folder of the dataset's images")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON file")
    parser.add_argument("--batch-size", type=whole_number(1), default=4)
    parser.add_argument("--device", type=torch_device, default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--max-images", type=whole_number(1), default=None, help="evaluate only the first N images")
    parser.add_argument("--num-workers", type=whole_number(0), default=2)
    parser.add_argument("--score-threshold", type=_fraction, default=None,
                        help="override the checkpoint's detection threshold (0 to 1)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="override the checkpoint's inference precision "
                             "(auto: bf16 where the device has it natively)")
    args = parser.parse_args(argv)

    from segment.checkpoint import load_checkpoint

    overrides = {key: value for key, value in (("score_threshold", args.score_threshold),
                                                ("precision", args.precision)) if value is not None}
    model = load_checkpoint(args.checkpoint, **overrides)
    dataset = CocoDetection(args.images, args.annotations)
    stats = evaluate(model, dataset, batch_size=args.batch_size, device=args.device,
                     max_images=args.max_images, num_workers=args.num_workers)
    print(format_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
