"""COCO files with quirks that real exports have: each is either read the way pycocotools reads it, for training and
COCOeval alike, or refused on load in one line naming the file and the entry."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
import pycocotools.mask as pycocotools_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segment.data import CocoDetection, DatasetError
from segment.data import coco as coco_module
from segment.evaluate import STAT_NAMES, category_map, evaluate, to_coco_results
from segment.structures import Instances
from stylize.content import read_image
from tests.test_data_coco import _rle, _uncompressed_rle

H, W = 40, 60
SQUARE = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]


def _ann(ann_id, image_id, category_id, segmentation, bbox, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": float(bbox[2] * bbox[3]), "bbox": bbox, **extra}


def _write(tmp_path, annotations, images=None, categories=None, name="instances.json"):
    """Images i.png of H x W, filled with 40 * i (so a fake model can tell them apart), and the COCO file."""
    images = images or [{"id": 1, "file_name": "1.png", "height": H, "width": W}]
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for image in images:
        path = folder / image["file_name"]
        if not path.exists():
            Image.fromarray(np.full((image["height"], image["width"], 3), 40 * (len(list(folder.iterdir())) + 1),
                                    np.uint8)).save(path)
    coco = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}
    ann_file = tmp_path / name
    ann_file.write_text(json.dumps(coco))
    return folder, ann_file


class _Fixed:
    """Stands in for a model: answers each image (known by its first pixel) with fixed detections."""

    def __init__(self, class_names, answers) -> None:
        self.class_names, self.answers, self.calls = class_names, answers, 0

    def predict(self, frames):
        self.calls += 1
        return [self.answers[int(f[0, 0, 0])] for f in frames]


def _detections(boxes, labels, scores, mask_boxes=None, size=(H, W)) -> Instances:
    """Detections whose masks fill `mask_boxes` (by default their own boxes) on an image of `size` (H, W)."""
    boxes = torch.tensor(boxes, dtype=torch.float32)
    masks = torch.zeros(len(boxes), *size)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist() if mask_boxes is None else mask_boxes):
        mask[y0:y1, x0:x1] = 1
    return Instances(size, boxes, torch.tensor(scores), torch.tensor(labels), masks)


def _cocoeval(gt_file, results, image_ids) -> dict[str, float]:
    """pycocotools on its own, as its README runs it: the oracle."""
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        for iou_type in ("bbox", "segm"):
            typed = [r if iou_type == "bbox" else {k: v for k, v in r.items() if k != "bbox"} for r in results]
            evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(typed)), iou_type)
            evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats.update({f"{iou_type}_{n}": float(v) for n, v in zip(STAT_NAMES, evaluator.stats)})
    return stats


def test_evaluation_ground_truth_is_what_the_dataset_reads(tmp_path):
    """Non-crowd annotations with no usable mask (an empty segmentation, a 2-point polygon, a zero-area polygon)
    and annotations without 'iscrowd' were read by training but crashed COCOeval (IndexError, TypeError 'bb',
    KeyError 'iscrowd') after every image had been run."""
    crowd = np.zeros((H, W), bool)
    crowd[20:35, 40:58] = True
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
    annotations = [
        _ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0]),  # no 'iscrowd': not a crowd
        _ann(2, 1, 2, [], [35.0, 5.0, 10.0, 10.0], iscrowd=0),  # nothing to segment: not an object
        _ann(3, 1, 1, [[1.0, 1.0, 5.0, 5.0]], [1.0, 1.0, 4.0, 4.0], iscrowd=0),  # 2 points
        _ann(4, 1, 2, _rle(crowd), [40.0, 20.0, 18.0, 15.0], iscrowd=1),
        _ann(5, 2, 2, [[5.0, 5.0, 25.0, 5.0, 25.0, 25.0, 5.0, 25.0]], [5.0, 5.0, 20.0, 20.0]),
        _ann(6, 2, 1, [[1.0, 1.0, 10.0, 10.0, 20.0, 20.0]], [1.0, 1.0, 19.0, 19.0], iscrowd=0),  # zero area
    ]
    folder, ann_file = _write(tmp_path, annotations, images)
    dataset = CocoDetection(folder, ann_file)
    # training's targets: annotations 1 and 5, and the crowd region
    targets = [dataset[i][1] for i in range(2)]
    assert [t["labels"].tolist() for t in targets] == [[1], [2]]
    assert [len(t["crowd_boxes"]) for t in targets] == [1, 0]

    answers = {40: _detections([[10, 10, 30, 30], [41, 20, 58, 35], [35, 5, 45, 15]], [1, 2, 2], [0.9, 0.8, 0.7]),
               80: _detections([[6, 5, 25, 25], [0, 0, 10, 10]], [2, 1], [0.6, 0.5])}
    model = _Fixed(["__background__", "one", "two"], answers)
    stats = evaluate(model, dataset, batch_size=1, progress=False)

    # the oracle: pycocotools on the same objects, written out as a clean file
    clean = [dict(a, iscrowd=a.get("iscrowd", 0)) for a in annotations if a["id"] in (1, 4, 5)]
    _, clean_file = _write(tmp_path, clean, images, name="clean.json")
    results = to_coco_results([answers[40], answers[80]], [1, 2], {1: 1, 2: 2})
    expected = _cocoeval(clean_file, results, [1, 2])
    assert stats == pytest.approx(expected, abs=1e-12)
    assert 0 < stats["bbox_AP"] < 1  # neither the crowd detection nor the missed annotations made it 0 or 1


def test_segm_files_a_detection_under_small_medium_large_by_its_mask_not_its_box(tmp_path):
    """COCO's segm protocol sizes a detection by its mask's area; pycocotools' loadRes takes the box's area instead
    whenever a result keeps its 'bbox'. A false positive with a small mask in a loose, medium box then cost APm
    instead of APs. The expected values are worked out by hand from COCO's definitions, not by pycocotools."""
    size = (64, 100)
    small, medium = [4, 4, 24, 24], [40, 4, 80, 44]  # x0 y0 x1 y1: 20x20 = 400 px < 32², 40x40 = 1600 px < 96²
    false_mask, false_box = [4, 40, 24, 60], [0, 30, 40, 64]  # 400 px (small) in a 40x34 = 1360 px box (medium)
    annotations = []
    for ann_id, (x0, y0, x1, y1) in enumerate((small, medium), 1):
        mask = np.zeros(size, np.uint8)
        mask[y0:y1, x0:x1] = 1
        annotations.append(_ann(ann_id, 1, 1, _rle(mask), [x0, y0, x1 - x0, y1 - y0], iscrowd=0))
    image = {"id": 1, "file_name": "1.png", "height": size[0], "width": size[1]}
    folder, ann_file = _write(tmp_path, annotations, [image])
    # the false positive scores highest, then the two exact hits; nothing overlaps anything else
    answer = _detections([false_box, small, medium], [1, 1, 1], [0.9, 0.8, 0.7],
                         mask_boxes=[false_mask, small, medium], size=size)
    stats = evaluate(_Fixed(["__background__", "one", "two"], {40: answer}), CocoDetection(folder, ann_file),
                     progress=False)

    # Over all sizes: a miss, then two hits: precision 0, 1/2, 2/3 at recall 0, 1/2, 1, so 2/3 at every recall.
    # Within a size range a detection of another size that matches nothing is ignored, and so is one matched to an
    # object of another size: in its own range the false positive comes first and halves the precision, elsewhere
    # the range's one object is found with nothing before it.
    assert stats["segm_AP"] == pytest.approx(2 / 3) and stats["bbox_AP"] == pytest.approx(2 / 3)
    assert (stats["segm_APs"], stats["segm_APm"]) == pytest.approx((0.5, 1.0))  # its mask: small
    assert (stats["bbox_APs"], stats["bbox_APm"]) == pytest.approx((1.0, 0.5))  # its box: medium


def test_evaluation_checks_the_ground_truth_before_running_the_model(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
    annotations = [_ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0),
                   _ann(7, 2, 1, [["a", "b", "c", "d", "e", "f"]], [10.0, 10.0, 20.0, 20.0], iscrowd=0)]
    folder, ann_file = _write(tmp_path, annotations, images)
    dataset = CocoDetection(folder, ann_file)
    model = _Fixed(["__background__", "one", "two"], {})
    with pytest.raises(DatasetError, match=r"instances.json: annotation 7 has a malformed segmentation") as error:
        evaluate(model, dataset, batch_size=1, progress=False)
    assert "\n" not in str(error.value) and model.calls == 0


@pytest.mark.parametrize("section, edit, message", [
    ("annotations", lambda coco: coco["annotations"][1].update(id=1), "annotation id 1 is used twice"),
    ("images", lambda coco: coco["images"][1].update(id=1), "image id 1 is used twice"),
    ("categories", lambda coco: coco["categories"][1].update(id=1), "category id 1 is used twice"),
    ("iscrowd", lambda coco: coco["annotations"][1].update(iscrowd="0"),
     r"annotation 2 has iscrowd '0' \(not 0 or 1\)"),
    ("iscrowd", lambda coco: coco["annotations"][0].update(iscrowd=2), r"annotation 1 has iscrowd 2 \(not 0 or 1\)"),
])
def test_duplicate_ids_and_bad_iscrowd_are_refused_on_load(tmp_path, section, edit, message):
    """Duplicates were accepted: two annotations with one id were both training targets while COCOeval kept one
    of them twice; two images with one id became one image with both images' annotations; two categories with one
    id became one class. iscrowd "0" was a crowd for training (a true string) and not for COCOeval."""
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
    annotations = [_ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0),
                   _ann(2, 2, 2, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0)]
    folder, ann_file = _write(tmp_path, annotations, images)
    coco = json.loads(ann_file.read_text())
    edit(coco)
    ann_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=rf"instances.json: {message}") as error:
        CocoDetection(folder, ann_file)
    assert "\n" not in str(error.value)


def test_iscrowd_true_false_and_missing_read_as_one_and_zero(tmp_path):
    annotations = [_ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=True),
                   _ann(2, 1, 2, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=False),
                   _ann(3, 1, 2, SQUARE, [10.0, 10.0, 20.0, 20.0])]
    folder, ann_file = _write(tmp_path, annotations)
    target = CocoDetection(folder, ann_file)[0][1]
    assert target["labels"].tolist() == [2, 2] and len(target["crowd_boxes"]) == 1


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    """convert('RGB') clips 16-bit values at 255: a 0..60395 ramp loaded as [0, 255, 255, ...]."""
    ramp = np.tile(np.arange(W, dtype=np.uint16) * 4, (H, 1))  # 8-bit values 0..236
    folder, ann_file = _write(tmp_path, [])
    Image.fromarray(ramp * 257).save(folder / "1.png")  # the same picture over the full 16-bit range
    assert Image.open(folder / "1.png").mode == "I;16"
    image = CocoDetection(folder, ann_file).load_image(0)
    np.testing.assert_array_equal(image.numpy(), np.stack([ramp] * 3).astype(np.uint8))


def test_float_grey_tiff_is_read_as_stylize_reads_it(tmp_path):
    """A float TIFF (mode F, values 0..1) loaded black: convert('RGB') clipped its values to 0 and 1 of 255."""
    ramp = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))
    folder, ann_file = _write(tmp_path, [], [{"id": 1, "file_name": "1.tif", "height": H, "width": W}])
    Image.fromarray(ramp).save(folder / "1.tif")
    assert Image.open(folder / "1.tif").mode == "F"
    image = CocoDetection(folder, ann_file).load_image(0)
    np.testing.assert_array_equal(image.numpy(), np.stack([np.rint(ramp * 255).astype(np.uint8)] * 3))
    np.testing.assert_array_equal(image.numpy(), read_image(folder / "1.tif").numpy())


def test_an_image_over_the_decompression_bomb_limit_is_read_or_refused_in_one_line(tmp_path, monkeypatch):
    """It was PIL's DecompressionBombError traceback (e.g. a 14000x13000 mode '1' PNG): the dataset's own files are
    read up to MAX_PIXELS, as stylize reads content images. PIL's limit lowered to 1000 px stands in for its 89
    megapixels (it refuses at twice that), MAX_PIXELS lowered to 2000 px for its 268."""
    pixels = np.zeros((H, W), bool)
    pixels[:, W // 2:] = True
    folder, ann_file = _write(tmp_path, [])
    Image.fromarray(pixels).save(folder / "1.png")
    assert Image.open(folder / "1.png").mode == "1"
    dataset = CocoDetection(folder, ann_file)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    np.testing.assert_array_equal(dataset.load_image(0).numpy(), np.stack([pixels * np.uint8(255)] * 3))
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's limit is back as it was

    monkeypatch.setattr(coco_module, "MAX_PIXELS", 2000)
    with pytest.raises(DatasetError, match=rf"^image .*1\.png is {W}x{H} pixels, more than the 2,000 this reads: "
                                           r"shrink it \(and its annotations\) first$"):
        dataset.load_image(0)


def _exif_jpeg(path, orientation: int, pixels: np.ndarray) -> None:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_not_applied_but_is_said(tmp_path):
    """Pixels are read as stored (torchvision and pycocotools do the same), so annotations made on the turned
    picture do not fit: say so once, and name the orientation when the sizes disagree."""
    images = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2, 3)]
    folder, ann_file = _write(tmp_path, [], images)
    stored = np.zeros((H, W, 3), np.uint8)
    stored[H // 2:, W // 2:] = 255
    for i in (1, 2):
        _exif_jpeg(folder / f"{i}.jpg", 3, stored)
    dataset = CocoDetection(folder, ann_file)
    with pytest.warns(UserWarning, match=r"1.jpg .*EXIF orientation 3.* read as stored") as caught:
        image = dataset.load_image(0)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.array(Image.open(folder / "1.jpg")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.load_image(1)  # once per dataset
        dataset.load_image(2)
    assert len(caught) == 1

    _exif_jpeg(folder / "4.jpg", 6, stored)  # shown turned a quarter: its annotation has the shown size
    _, turned = _write(tmp_path, [], [{"id": 4, "file_name": "4.jpg", "height": W, "width": H}], name="turned.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match=r"4.jpg is \(40, 60\) \(H, W\) but its annotation says \(60, 40\).*"
                                               r"EXIF orientation 6"):
            CocoDetection(folder, turned).load_image(0)


def test_annotation_of_a_category_the_file_lacks_is_refused_on_load(tmp_path):
    """It was dropped without a word: training read the object as background and COCOeval scored it under no
    category, so AP fell silently."""
    annotations = [_ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0),
                   _ann(2, 1, "5", SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0)]
    folder, ann_file = _write(tmp_path, annotations)
    with pytest.raises(DatasetError, match=r"instances.json: annotation 2 has category_id 5, which is not among the "
                                           r"file's categories$") as error:
        CocoDetection(folder, ann_file)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("uncompressed", [False, True])
def test_rle_of_another_size_is_refused(tmp_path, uncompressed):
    """An RLE of W x H on an H x W image gave a (1, W, H) mask; with a polygon before it, a (2, H, W) one."""
    mask = np.zeros((W, H), np.uint8)
    mask[2:10, 3:30] = 1
    rle = _uncompressed_rle(mask) if uncompressed else _rle(mask)
    annotations = [_ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0),
                   _ann(2, 1, 1, rle, [3.0, 2.0, 27.0, 8.0], iscrowd=0)]
    folder, ann_file = _write(tmp_path, annotations)
    with pytest.raises(DatasetError, match=r"instances.json: annotation 2 has an RLE of size \[60, 40\] on image 1, "
                                           r"which is \[40, 60\]"):
        CocoDetection(folder, ann_file)


def test_drop_empty_drops_images_without_a_usable_annotation(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)]
    annotations = [
        _ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0),
        _ann(3, 2, 1, [], [5.0, 5.0, 10.0, 10.0], iscrowd=0),  # nothing to segment
        _ann(4, 2, 1, [[1.0, 1.0, 10.0, 10.0, 20.0, 20.0]], [1.0, 1.0, 19.0, 19.0], iscrowd=0),  # zero area
        _ann(5, 2, 1, SQUARE, [5.0, 5.0, 0.0, 0.0], iscrowd=0),  # zero-size box
        _ann(6, 2, 1, SQUARE, [70.0, 5.0, 10.0, 10.0], iscrowd=0),  # box outside the image
        _ann(7, 3, 2, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0),
    ]
    folder, ann_file = _write(tmp_path, annotations, images)
    dataset = CocoDetection(folder, ann_file, drop_empty=True)
    assert dataset.image_ids == [1, 3]
    assert all(len(dataset[i][1]["labels"]) == 1 for i in range(len(dataset)))
    assert CocoDetection(folder, ann_file).image_ids == [1, 2, 3]
    coco = json.loads(ann_file.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 2]
    ann_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="none of the 3 images of .*instances.json has an annotation"):
        CocoDetection(folder, ann_file, drop_empty=True)


def test_category_map_with_repeated_names(tmp_path):
    """Categories 1 'car', 2 'car', 3 'dog' mapped {1: 2, 2: 2, 3: 3}: both cars scored as category 2."""
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "car"}, {"id": 3, "name": "dog"}]
    folder, ann_file = _write(tmp_path, [], categories=categories)
    dataset = CocoDetection(folder, ann_file)
    # a model trained on this file (segment.train names its classes after the dataset's): label k is category k
    assert category_map(["__background__", "car", "car", "dog"], dataset) == {1: 1, 2: 2, 3: 3}
    # any other model: which 'car' it means is unknown
    with pytest.raises(DatasetError, match=r"instances.json: categories \[1, 2\] share the name .car."):
        category_map(["__background__", "dog", "car"], dataset)
    assert category_map(["__background__", "dog", "cat"], dataset) == {1: 3}  # no car: nothing ambiguous


def test_image_ids_that_are_not_numbers_are_refused(tmp_path):
    images = [{"id": "img_1", "file_name": "1.png", "height": H, "width": W}]
    annotations = [_ann(1, "img_1", 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0)]
    folder, ann_file = _write(tmp_path, annotations, images)
    with pytest.raises(DatasetError, match=r"instances.json: image 'img_1' has an id that is not a whole number$"):
        CocoDetection(folder, ann_file)
    images[0]["id"] = 1
    _write(tmp_path, annotations, images)
    with pytest.raises(DatasetError, match=r"instances.json: annotation 1 has image_id 'img_1', not a whole number$"):
        CocoDetection(folder, ann_file)


def test_numeric_string_ids_are_numbers_for_training_and_evaluation(tmp_path):
    """A numeric string id was the number 7 in training's targets and the string '7' in COCOeval's ground truth,
    which then refused the results ('Results do not correspond to current coco set')."""
    images = [{"id": "7", "file_name": "1.png", "height": H, "width": W}]
    annotations = [_ann("1", "7", "1", SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0)]
    folder, ann_file = _write(tmp_path, annotations, images)
    dataset = CocoDetection(folder, ann_file)
    _, target = dataset[0]
    assert dataset.image_ids == [7] and target["image_id"] == 7 and target["labels"].tolist() == [1]
    model = _Fixed(["__background__", "one", "two"], {40: _detections([[10, 10, 30, 30]], [1], [0.9])})
    assert evaluate(model, dataset, progress=False)["segm_AP"] == pytest.approx(1.0)


def test_16_bit_grey_between_8_bit_levels_rounds_to_the_nearest(tmp_path):
    """Truncating v / 257 darkens every value off a multiple of 257 (a 16-bit scan's real content) by a level."""
    values = np.array([0, 128, 129, 385, 386, 400, 1000, 65407, 65535], dtype=np.uint16)
    pixels = np.resize(values, (H, W)).astype(np.uint16)
    folder, ann_file = _write(tmp_path, [])
    Image.fromarray(pixels).save(folder / "1.png")
    assert Image.open(folder / "1.png").mode == "I;16"
    image = CocoDetection(folder, ann_file).load_image(0).numpy()
    want = np.rint(pixels / 257).astype(np.uint8)
    assert want[0, :7].tolist() == [0, 0, 1, 1, 2, 2, 4]
    np.testing.assert_array_equal(image, np.stack([want] * 3))


def test_uncompressed_rle_whose_runs_do_not_fill_the_mask_is_refused(tmp_path):
    """Runs adding up to more (or less) than height * width describe no mask of that size."""
    for counts in ([2, 100], [2, H * W - 3]):
        annotations = [_ann(1, 1, 1, {"size": [H, W], "counts": counts}, [0.0, 0.0, 2.0, 2.0], iscrowd=0)]
        folder, ann_file = _write(tmp_path, annotations)
        with pytest.raises(DatasetError) as error:
            CocoDetection(folder, ann_file)
        assert str(error.value).endswith("instances.json: annotation 1 has an RLE whose counts are not run lengths "
                                         f"adding up to its size [{H}, {W}]")


def test_compressed_rle_whose_runs_overrun_the_mask_is_refused(tmp_path):
    """The compressed RLE of an all-ones 1000x1000 mask relabelled 128x128 passed the load: COCOeval's rleIou then
    looped for ever, deaf to Ctrl-C and SIGTERM (training: a ValueError traceback from pycocotools' decode)."""
    overrun = pycocotools_mask.encode(np.ones((1000, 1000, 1), dtype=np.uint8, order="F"))[0]["counts"].decode()
    annotations = [_ann(1, 1, 1, {"size": [H, W], "counts": overrun}, [0.0, 0.0, 2.0, 2.0], iscrowd=1)]
    folder, ann_file = _write(tmp_path, annotations)
    with pytest.raises(DatasetError) as error:
        CocoDetection(folder, ann_file)
    assert str(error.value).endswith(f"annotation 1 has an RLE whose counts are not run lengths adding up to its "
                                     f"size [{H}, {W}]")


def test_compressed_runs_are_pycocotools_runs():
    """The runs read from a compressed counts string against those of the masks pycocotools encoded."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        mask = (rng.random(tuple(rng.integers(1, 30, 2))) < rng.random()).astype(np.uint8)
        flat = mask.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        runs = ([0] if flat[0] else []) + runs  # the first run counts zeros
        counts = pycocotools_mask.encode(np.asfortranarray(mask))["counts"].decode()
        assert coco_module.compressed_runs(counts) == runs, trial
    assert coco_module.compressed_runs(counts[:-1] + chr(48 + 0x20)) is None  # cut mid-run


@pytest.mark.parametrize("polygon, said", [
    ([1e30, 2, 50, 4, 5, 30, 7, 8], "point more than the image's size (60x40) beyond it"),
    ([1, 2, float("nan"), 4, 5, 30, 7, 8], "that is not a flat list of finite x, y numbers"),
    ([[1, 2], [30, 4], [5, 30]], "that is not a flat list of finite x, y numbers"),
])
def test_a_polygon_pycocotools_cannot_rasterise_is_refused_in_one_line(tmp_path, polygon, said):
    """A point at 1e30 px took 23 GB before the kernel killed the process (NaN crashed pycocotools); three points as
    nested pairs were dropped without a word (three elements, fewer than six)."""
    folder, ann_file = _write(tmp_path, [_ann(1, 1, 1, [polygon], [0.0, 0.0, 2.0, 2.0], iscrowd=0)])
    with pytest.raises(DatasetError) as error:
        CocoDetection(folder, ann_file)[0]
    assert str(error.value).endswith(f"annotation 1 has a malformed segmentation (a polygon {said})")


@pytest.mark.parametrize("section, edit, message", [
    ("images", {"file_name": 5}, "image 1 has file_name 5, not a file name"),
    ("images", {"file_name": None}, "image 1 has file_name None, not a file name"),
    ("images", {"height": None}, "image 1 has height None, not a whole number of pixels"),
    ("images", {"width": 0}, "image 1 has width 0, not a whole number of pixels"),
    ("categories", {"name": ["x"]}, r"category 1 has name \['x'\], not text"),
])
def test_image_and_category_values_of_the_wrong_type_are_refused_on_load(tmp_path, section, edit, message):
    """Only the keys were checked: a number as file_name was a TypeError when the image was read, a null height
    one when its empty target was made, a list as a category's name one when classes were mapped by name."""
    folder, ann_file = _write(tmp_path, [_ann(1, 1, 1, SQUARE, [10.0, 10.0, 20.0, 20.0], iscrowd=0)])
    coco = json.loads(ann_file.read_text())
    coco[section][0].update(edit)
    ann_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=rf"instances.json: {message}$") as error:
        CocoDetection(folder, ann_file)
    assert "\n" not in str(error.value)


def test_image_sizes_written_as_digits_are_numbers_as_ids_are(tmp_path):
    """"height": "40" was compared with an RLE's size [40, 60] as text: "an RLE of size [40, 60] on image 1, which is
    [40, 60]"."""
    rle = pycocotools_mask.encode(np.asfortranarray(np.ones((H, W), dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode()
    folder, ann_file = _write(tmp_path, [_ann(1, 1, 1, rle, [0.0, 0.0, float(W), float(H)], iscrowd=0)])
    coco = json.loads(ann_file.read_text())
    coco["images"][0].update(height=str(H), width=str(W))
    ann_file.write_text(json.dumps(coco))
    dataset = CocoDetection(folder, ann_file)
    assert dataset.get_height_and_width(0) == (H, W) and dataset[0][1]["masks"].shape == (1, H, W)


def test_json_nested_too_deep_is_refused_in_one_line(tmp_path):
    folder, ann_file = _write(tmp_path, [])
    ann_file.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DatasetError, match=r"instances.json is not a COCO instances file \(its JSON is nested too "
                                           r"deep to read\)$"):
        CocoDetection(folder, ann_file)
