"""COCO dataset loading, transforms and batching, checked against pycocotools' own mask decoding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DistributedSampler, RandomSampler

from common.errors import UserError
from segment.data import (
    CocoDetection, DatasetError, GroupedBatchSampler, build_dataloader, build_dataset, build_transforms, collate,
)
from segment.data.sampler import aspect_ratio_groups


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major flattening, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _bbox(mask: np.ndarray) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))]


@pytest.fixture()
def tiny_coco(tmp_path):
    """Two images (landscape 40x60, portrait 60x40) with a polygon, a compressed RLE, an uncompressed RLE,
    a crowd region and a zero-width box, under non-contiguous category ids 3, 7, 12."""
    rng = np.random.default_rng(0)
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for name, (h, w) in (("a.png", (40, 60)), ("b.png", (60, 40))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images_dir / name)
    square = np.zeros((40, 60), bool)
    square[5:15, 8:20] = True
    blob = np.zeros((40, 60), bool)
    blob[20:35, 30:55] = True
    blob[25:30, 40:45] = False  # a hole
    ring = np.zeros((60, 40), bool)
    ring[10:50, 5:30] = True
    ring[20:40, 12:22] = False
    crowd = np.zeros((60, 40), bool)
    crowd[50:58, 30:39] = True
    polygon = [[2.5, 30.2, 18.7, 22.0, 22.1, 38.9, 4.0, 37.5]]
    poly_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 40, 60))).astype(bool)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": _rle(square), "bbox": _bbox(square),
         "area": float(square.sum())},
        {"id": 2, "image_id": 1, "category_id": 12, "iscrowd": 0, "segmentation": polygon, "bbox": _bbox(poly_mask),
         "area": float(poly_mask.sum())},
        {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": _uncompressed_rle(blob),
         "bbox": _bbox(blob), "area": float(blob.sum())},
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": _rle(square),
         "bbox": [8.0, 5.0, 0.0, 10.0], "area": 0.0},  # degenerate box: dropped
        {"id": 5, "image_id": 2, "category_id": 7, "iscrowd": 0, "segmentation": _rle(ring), "bbox": _bbox(ring),
         "area": float(ring.sum())},
        {"id": 6, "image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": _uncompressed_rle(crowd),
         "bbox": _bbox(crowd), "area": float(crowd.sum())},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "b.png", "height": 60, "width": 40}],
        "annotations": annotations,
        "categories": [{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(coco))
    return images_dir, ann_file


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Exclusive xyxy boxes of masks (what COCO's toBbox gives, as corners)."""
    boxes = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_masks_labels_and_crowds_match_pycocotools(tiny_coco):
    images_dir, ann_file = tiny_coco
    dataset = CocoDetection(images_dir, ann_file)
    assert dataset.class_names == ["three", "seven", "twelve"]
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 12}
    assert dataset.category_id_to_label == {3: 1, 7: 2, 12: 3}
    assert dataset.image_ids == [1, 2]
    assert [dataset.get_height_and_width(i) for i in range(2)] == [(40, 60), (60, 40)]

    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60) and 0 <= image.min() and image.max() <= 1
    expected = torch.from_numpy(np.array(Image.open(images_dir / "a.png"))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image, expected)
    # annotation 4 (zero-width box) is dropped; the others keep file order
    oracle = np.stack([dataset.coco.annToMask(dataset.coco.anns[i]) for i in (1, 2, 3)])
    assert target["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(target["masks"].numpy(), oracle)
    assert target["labels"].tolist() == [1, 3, 2]
    assert target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], _mask_boxes(target["masks"]))
    assert target["image_id"] == 1 and target["orig_size"] == (40, 60)
    assert target["crowd_boxes"].shape == (0, 4)

    _, target = dataset[1]
    np.testing.assert_array_equal(target["masks"].numpy(), dataset.coco.annToMask(dataset.coco.anns[5])[None])
    assert target["labels"].tolist() == [2]  # the crowd is not a training target ...
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[30.0, 50.0, 39.0, 58.0]]))  # ... but kept


def test_category_subset_and_drop_empty(tiny_coco):
    images_dir, ann_file = tiny_coco
    dataset = CocoDetection(images_dir, ann_file, category_ids=[12, 3], drop_empty=True)
    assert dataset.class_names == ["twelve", "three"] and dataset.label_to_category_id == {1: 12, 2: 3}
    assert dataset.image_ids == [1]  # image 2 only has a 'seven' and a crowd
    _, target = dataset[0]
    assert target["labels"].tolist() == [2, 1]


def _data_config(tiny_coco, **settings):
    """A `data` group (conf/data/*.yaml) over the tiny COCO files."""
    images_dir, ann_file = tiny_coco
    return OmegaConf.create({"train": {"images": str(images_dir), "annotations": str(ann_file)}, **settings})


def test_data_config_reads_category_ids_and_drop_empty(tiny_coco):
    dataset = build_dataset(_data_config(tiny_coco, category_ids=[12, 3], drop_empty=True), "train")
    assert dataset.class_names == ["twelve", "three"] and dataset.image_ids == [1]
    assert build_dataset(_data_config(tiny_coco, category_ids=[12, 3], drop_empty=False), "train").image_ids == [1, 2]


@pytest.mark.parametrize("setting, value, message", [
    ("category_ids", "abc", "data.category_ids must be null or a list of category ids"),  # ids 'a', 'b' and 'c'
    ("category_ids", [3, "7"], "data.category_ids.1 must be a whole number"),
    ("drop_empty", "no", "data.drop_empty must be true or false"),  # text: read as true
    ("aspect_grouping", "off", "data.aspect_grouping must be true or false"),
    ("generate_if_missing", {"n_train": "abc", "n_val": 2, "size": 64, "seed": 0},
     "data.generate_if_missing.n_train must be a whole number"),  # int('abc'): a ValueError traceback
])
def test_data_settings_of_the_wrong_type_are_refused_in_one_line(tiny_coco, setting, value, message):
    with pytest.raises(UserError, match=message) as caught:
        build_dataloader(_data_config(tiny_coco, **{setting: value}), "train", batch_size=1)
    assert "\n" not in str(caught.value)


def test_missing_files_give_one_line_errors(tiny_coco, tmp_path):
    images_dir, ann_file = tiny_coco
    with pytest.raises(DatasetError, match="annotation file not found: .*nope.json"):
        CocoDetection(images_dir, tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="image directory not found: .*no_dir"):
        CocoDetection(tmp_path / "no_dir", ann_file)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json is not valid JSON"):
        CocoDetection(images_dir, broken)
    with pytest.raises(DatasetError, match=r"no categories with ids \[5\]"):
        CocoDetection(images_dir, ann_file, category_ids=[5])
    (images_dir / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode image .*a.png"):
        CocoDetection(images_dir, ann_file)[0]
    (images_dir / "b.png").unlink()
    with pytest.raises(DatasetError, match="image file not found: .*b.png"):
        CocoDetection(images_dir, ann_file)[1]


def test_missing_image_files_are_found_when_the_dataset_is_built(tiny_coco):
    """A missing image was found only when it was read: evaluation after some batches, training after some
    iterations (on COCO maybe hours in). Only the images the dataset reads count: drop_empty leaves b.png out."""
    images_dir, ann_file = tiny_coco
    (images_dir / "b.png").unlink()
    assert CocoDetection(images_dir, ann_file, category_ids=[12, 3], drop_empty=True).image_ids == [1]
    (images_dir / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"^image file not found: .*a\.png \(missing: 2 of the 2 images of "
                                           r".*instances\.json\)$") as error:
        CocoDetection(images_dir, ann_file)
    assert "\n" not in str(error.value)


def test_flip_and_resize_keep_boxes_on_masks(tiny_coco):
    images_dir, ann_file = tiny_coco
    plain = CocoDetection(images_dir, ann_file)
    image, target = plain[0]

    flipped = CocoDetection(images_dir, ann_file, transforms=build_transforms(True, hflip_prob=1.0))
    f_image, f_target = flipped[0]
    torch.testing.assert_close(f_image, image.flip(-1))
    torch.testing.assert_close(f_target["masks"], target["masks"].flip(-1))
    torch.testing.assert_close(f_target["boxes"], _mask_boxes(f_target["masks"]))
    assert f_target["labels"].tolist() == target["labels"].tolist()

    # exact 2x: nearest-neighbour masks stay exactly on the scaled boxes
    doubled = CocoDetection(images_dir, ann_file, transforms=build_transforms(False, min_size=80))
    d_image, d_target = doubled[0]
    assert d_image.shape == (3, 80, 120) and d_target["masks"].shape == (3, 80, 120)
    torch.testing.assert_close(d_target["boxes"], target["boxes"] * 2)
    torch.testing.assert_close(d_target["boxes"], _mask_boxes(d_target["masks"]))
    crowd_image_target = doubled[1][1]
    torch.testing.assert_close(crowd_image_target["crowd_boxes"], torch.tensor([[30.0, 50.0, 39.0, 58.0]]) * 2)

    # non-integer scale with flip, and a max_size cap: boxes within a pixel of the masks' boxes
    odd = CocoDetection(images_dir, ann_file, transforms=build_transforms(True, min_size=300, max_size=75,
                                                                          hflip_prob=1.0))
    for index, size in ((0, (50, 75)), (1, (75, 50))):
        o_image, o_target = odd[index]
        assert tuple(o_image.shape[1:]) == size and tuple(o_target["masks"].shape[1:]) == size
        assert (o_target["boxes"] - _mask_boxes(o_target["masks"])).abs().max() <= 1.0


def test_multiscale_picks_one_of_the_sizes(tiny_coco):
    images_dir, ann_file = tiny_coco
    dataset = CocoDetection(images_dir, ann_file, transforms=build_transforms(True, min_size=(30, 50), max_size=None))
    torch.manual_seed(0)
    shorter = {min(dataset[0][0].shape[1:]) for _ in range(20)}
    assert shorter == {30, 50}
    evaluation = build_transforms(False, min_size=(30, 50), max_size=None)  # the largest scale, no flip
    assert build_transforms(False) is None
    image, target = CocoDetection(images_dir, ann_file, transforms=evaluation)[0]
    assert image.shape[1:] == (50, 75)


class _Sizes:
    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def get_height_and_width(self, index):
        return self.sizes[index]


def test_grouped_batches_are_homogeneous_and_ranks_agree():
    rng = np.random.default_rng(1)
    sizes = [(100, 150) if rng.random() < 0.6 else (150, 100) for _ in range(53)]
    dataset = _Sizes(sizes)
    groups = aspect_ratio_groups(dataset)
    assert groups == [1 if h <= w else 0 for h, w in sizes]
    # a square image joins the landscape ones (torchvision's reference: bins=[1], width / height >= 1)
    assert aspect_ratio_groups(_Sizes([(480, 640), (640, 480), (512, 512)])) == [1, 0, 1]

    sampler = GroupedBatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), groups, 4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 53 // 4
    assert all(len(b) == 4 and len({groups[i] for i in b}) == 1 for b in batches)
    assert len({i for b in batches for i in b}) >= 53 - 2 * 4  # at most two partial leftovers wait

    counts = []
    for rank in range(2):
        distributed = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        grouped = GroupedBatchSampler(distributed, groups, 4)
        grouped.set_epoch(3)
        rank_batches = list(grouped)
        assert all(len({groups[i] for i in b}) == 1 for b in rank_batches)
        counts.append(len(rank_batches))
    assert counts[0] == counts[1] == len(grouped)

    # fewer images than a batch: one padded batch, not zero steps
    tiny = GroupedBatchSampler(range(3), [0, 1, 0], 4)
    assert list(tiny) == [[0, 2, 0, 2]] and len(tiny) == 1


def test_collate_keeps_sizes(tiny_coco):
    images_dir, ann_file = tiny_coco
    dataset = CocoDetection(images_dir, ann_file)
    images, targets = collate([dataset[0], dataset[1]])
    assert [tuple(i.shape) for i in images] == [(3, 40, 60), (3, 60, 40)]
    assert [t["image_id"] for t in targets] == [1, 2]


def _rewrite(ann_file, edit) -> None:
    coco = json.loads(ann_file.read_text())
    edit(coco)
    ann_file.write_text(json.dumps(coco))


@pytest.mark.parametrize("section, entry, key", [("annotations", 2, "bbox"), ("annotations", 5, "area"),
                                                 ("annotations", 3, "segmentation"), ("images", 2, "height")])
def test_malformed_entries_are_named_on_load(tiny_coco, section, entry, key):
    """Found on load, before training or evaluation reads the entry (they were KeyError tracebacks then)."""
    images_dir, ann_file = tiny_coco
    _rewrite(ann_file, lambda coco: next(e for e in coco[section] if e["id"] == entry).pop(key))
    kind = section[:-1]
    with pytest.raises(DatasetError, match=rf"instances.json: {kind} {entry} has no '{key}'$") as error:
        CocoDetection(images_dir, ann_file)
    assert "\n" not in str(error.value)


def test_empty_files_and_selections_say_what_is_missing(tiny_coco, tmp_path):
    """Each of these became 'the training set has 0 images, fewer than the 1 processes' in training."""
    images_dir, ann_file = tiny_coco
    with pytest.raises(DatasetError, match=r"category_ids is an empty list: .* list at least one of \[3, 7, 12\]"):
        CocoDetection(images_dir, ann_file, category_ids=[])
    _rewrite(ann_file, lambda coco: coco["categories"].append({"id": 20, "name": "unused"}))
    with pytest.raises(DatasetError, match="none of the 2 images of .*instances.json has an annotation"):
        CocoDetection(images_dir, ann_file, category_ids=[20], drop_empty=True)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(DatasetError, match="empty.json has no images"):
        CocoDetection(images_dir, empty)
    _rewrite(ann_file, lambda coco: coco.pop("categories"))
    with pytest.raises(DatasetError, match="instances.json has no categories"):
        CocoDetection(images_dir, ann_file)


def test_error_in_a_loader_worker_keeps_its_one_line_message(tiny_coco):
    """DataLoader re-raises a worker's error around the worker's whole traceback; training and evaluation print
    the message, which was then 17 lines long."""
    images_dir, ann_file = tiny_coco
    dataset = CocoDetection(images_dir, ann_file)
    (images_dir / "b.png").unlink()  # gone since the dataset was built
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate)
    with pytest.raises(DatasetError) as error:
        next(iter(loader))
    assert str(error.value) == f"image file not found: {images_dir / 'b.png'}"
    assert "Traceback" in error.value.worker_traceback


def test_data_config_hflip_prob_flips_training_images_masks_and_boxes(tiny_coco):
    images_dir, ann_file = tiny_coco
    image, target = CocoDetection(images_dir, ann_file)[0]
    f_image, f_target = build_dataset(_data_config(tiny_coco, hflip_prob=1.0), "train")[0]
    torch.testing.assert_close(f_image, image.flip(-1))
    torch.testing.assert_close(f_target["masks"], target["masks"].flip(-1))
    width = image.shape[-1]
    x1, y1, x2, y2 = target["boxes"].unbind(1)
    torch.testing.assert_close(f_target["boxes"], torch.stack([width - x2, y1, width - x1, y2], 1))


def test_grouped_batches_follow_the_distributed_samplers_epoch():
    """Each epoch must reshuffle: without set_epoch reaching the DistributedSampler every epoch repeats epoch 0's
    order. Oracle: the DistributedSampler's own order for that epoch, cut into batches (one group, no leftover)."""
    distributed = DistributedSampler(range(16), num_replicas=1, rank=0, shuffle=True, seed=0)
    grouped = GroupedBatchSampler(distributed, [0] * 16, 4)
    orders = []
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        oracle = DistributedSampler(range(16), num_replicas=1, rank=0, shuffle=True, seed=0)
        oracle.set_epoch(epoch)
        order = list(oracle)
        assert list(grouped) == [order[i:i + 4] for i in range(0, 16, 4)]
        orders.append(order)
    assert orders[0] != orders[1]
