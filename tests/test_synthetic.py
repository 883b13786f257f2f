"""Synthetic shapes: deterministic, exact visible-part masks, valid COCO files, and the Hydra data config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pycocotools.coco import COCO

from segment.data import CocoDetection, DatasetError, build_dataloader, build_dataset
from segment.data import synthetic as syn
from tests.helpers_process import stop_after

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "synthetic.yaml"


@pytest.fixture(scope="module")
def assets():
    return syn.load_textures(0), syn.load_backgrounds()


@pytest.fixture(scope="module")
def split(tmp_path_factory, assets):
    out = tmp_path_factory.mktemp("synthetic")
    return out, syn.write_coco_split(out, "train", 12, size=96, seed=3, progress=False)


def test_generation_is_deterministic(split, tmp_path):
    out, ann_file = split
    again = syn.write_coco_split(tmp_path / "again", "train", 12, size=96, seed=3, progress=False)
    assert again.read_bytes() == ann_file.read_bytes()
    for image in sorted((out / "train").iterdir()):
        assert (tmp_path / "again" / "train" / image.name).read_bytes() == image.read_bytes()
    other = syn.write_coco_split(tmp_path / "other", "train", 12, size=96, seed=4, progress=False)
    assert other.read_bytes() != ann_file.read_bytes()
    # regenerating a split replaces it and leaves no temp folders behind
    syn.write_coco_split(tmp_path / "again", "train", 5, size=96, seed=3, progress=False)
    assert len(list((tmp_path / "again" / "train").glob("*.jpg"))) == 5
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["annotations", "train"]


def test_coco_file_is_consistent(split):
    out, ann_file = split
    coco = COCO(str(ann_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == syn.CLASS_NAMES
    assert len(coco.imgs) == 12 and len(coco.anns) >= 12
    for image_id in coco.imgs:
        anns = coco.imgToAnns[image_id]
        assert anns, "every scene has at least one object"
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        assert masks.sum(axis=0).max() == 1, "visible parts never overlap"
        for ann, mask in zip(anns, masks):
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == mask.sum() >= 64 and ann["iscrowd"] == 0
    dataset = CocoDetection(out / "train", ann_file)
    image, target = dataset[0]
    assert image.shape == (3, 96, 96) and dataset.class_names == syn.CLASS_NAMES
    assert target["labels"].min() >= 1 and target["labels"].max() <= len(syn.CLASS_NAMES)


def _disk(cx, cy, r, h, w):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_masks_are_exact_visible_parts(assets):
    textures, _ = assets
    h, w = 60, 80
    background = np.full((h, w, 3), 128, np.uint8)
    circle = syn.SceneObject(label=1, center=(30.3, 28.6), size=30.0, angle=17.0, texture=0)
    # angle 0 puts the square's corners at 45 degrees: an axis-aligned square of half-side r / sqrt(2)
    square = syn.SceneObject(label=2, center=(45.2, 35.4), size=24.0 * np.sqrt(2), angle=0.0, texture=5)
    ring = syn.SceneObject(label=5, center=(65.0, 15.0), size=20.0, angle=0.0, texture=9)
    image, masks = syn.render_scene(background, [circle, square, ring], textures)
    yy, xx = np.mgrid[:h, :w]
    square_full = (np.abs(xx - 45.2) <= 12) & (np.abs(yy - 35.4) <= 12)
    ring_full = _disk(65.0, 15.0, 10, h, w) & ~_disk(65.0, 15.0, 10 * syn.RING_INNER, h, w)
    circle_full = _disk(30.3, 28.6, 15, h, w)
    np.testing.assert_array_equal(masks[2], ring_full)
    np.testing.assert_array_equal(masks[1], square_full & ~ring_full)
    np.testing.assert_array_equal(masks[0], circle_full & ~square_full & ~ring_full)
    assert masks[0].sum() < circle_full.sum()  # really occluded
    untouched = ~(circle_full | square_full | ring_full)
    assert (image[untouched] == 128).all() and (image[~untouched] != 128).any(axis=-1).mean() > 0.9


def test_random_scenes_keep_only_visible_enough_objects(assets):
    textures, backgrounds = assets
    for seed in range(15):
        rng = np.random.default_rng(seed)
        image, objects, masks = syn.random_scene(rng, 128, 128, textures, backgrounds, max_objects=8)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert len(objects) == len(masks) >= 1
        full = np.stack([syn.shape_mask(o, 128, 128) for o in objects])
        for i in range(len(objects)):
            above = full[i + 1:].any(axis=0)
            np.testing.assert_array_equal(masks[i], full[i] & ~above)
            assert masks[i].sum() >= 0.5 * full[i].sum() and masks[i].sum() >= 64
        sizes = [o.size / 128 for o in objects]
        assert all(0.12 <= s <= 0.45 for s in sizes)
    # the same rng state gives the same scene
    a = syn.random_scene(np.random.default_rng(7), 64, 64, textures, backgrounds)
    b = syn.random_scene(np.random.default_rng(7), 64, 64, textures, backgrounds)
    assert a[1] == b[1] and np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])


def test_bad_settings_fail_clearly(tmp_path):
    with pytest.raises(DatasetError, match="unknown synthetic classes \\['blob'\\]"):
        syn.write_coco_split(tmp_path, "train", 2, classes=["blob"])
    with pytest.raises(DatasetError, match="size >= 32"):
        syn.write_coco_split(tmp_path, "train", 2, size=8)


def test_data_config_generates_on_first_use_and_loads(tmp_path):
    cfg = OmegaConf.load(CONF)
    cfg.root = str(tmp_path / "synthetic")
    cfg.generate_if_missing.update(n_train=6, n_val=3, size=64)
    cfg.num_workers = 0
    train = build_dataset(cfg, "train")
    assert len(train) == 6 and (tmp_path / "synthetic" / "annotations" / "instances_train.json").is_file()
    val = build_dataset(cfg, "val")
    assert len(val) == 3 and val.transforms is None
    coco = json.loads(Path(cfg.val.annotations).read_text())
    assert coco["info"]["split"] == "val" and coco["info"]["size"] == 64

    cfg.resize.min_size = [32, 48]
    loader = build_dataloader(cfg, "train", batch_size=2)
    batches = list(loader)
    assert len(batches) == 3
    for images, targets in batches:
        assert len(images) == len(targets) == 2
        for image, target in zip(images, targets):
            assert min(image.shape[1:]) in (32, 48) and target["masks"].shape[1:] == image.shape[1:]
            assert target["labels"].dtype == torch.int64
    val_loader = build_dataloader(cfg, "val", batch_size=2)
    assert [len(images) for images, _ in val_loader] == [2, 1]
    with pytest.raises(DatasetError, match="unknown data split 'test'"):
        build_dataset(cfg, "test")


def _synthetic_cfg(root: Path):
    cfg = OmegaConf.load(CONF)
    cfg.root = str(root)
    cfg.generate_if_missing.update(n_train=2, n_val=2, size=32)
    return cfg


def test_generation_never_replaces_files_it_did_not_write(tmp_path):
    """A split folder of the user's (no annotation file yet) was moved aside and deleted by generation."""
    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    (root / "train" / "my_photo.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match=r"mine/train exists and was not written by .*: refusing") as error:
        build_dataset(_synthetic_cfg(root), "train")
    assert "\n" not in str(error.value)
    assert (root / "train" / "my_photo.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in root.iterdir()) == ["train"]  # no annotations folder or temp folder left

    # an annotation file of the user's under the generated name is not replaced either
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text("{}")
    with pytest.raises(DatasetError, match="instances_val.json exists and was not written by"):
        syn.write_coco_split(root, "val", 2, size=32, progress=False)
    assert (root / "annotations" / "instances_val.json").read_text() == "{}" and not (root / "val").exists()

    # a split it wrote is replaced, unless the user has put files of their own in it since
    syn.write_coco_split(tmp_path / "ours", "train", 2, size=32, progress=False)
    syn.write_coco_split(tmp_path / "ours", "train", 3, size=32, progress=False)
    assert len(list((tmp_path / "ours" / "train").glob("*.jpg"))) == 3
    (tmp_path / "ours" / "train" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"ours/train holds notes.txt, which the synthetic generator did not write"):
        syn.write_coco_split(tmp_path / "ours", "train", 2, size=32, progress=False)
    assert len(list((tmp_path / "ours" / "train").glob("*.jpg"))) == 3


def test_script_checks_both_splits_before_writing(tmp_path, capsys):
    from scripts.make_synthetic_dataset import main

    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "keep.png").write_bytes(b"x")
    assert main(["--out", str(tmp_path), "--train", "2", "--val", "2", "--size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "val exists" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]  # train was not generated either



def test_script_passes_its_seed_classes_and_object_limit_to_the_generator(tmp_path):
    """--seed, --classes and --max-objects reach the files: the written split equals write_coco_split's own with the
    same values (read with pycocotools), and each setting shows in it."""
    from scripts.make_synthetic_dataset import main

    assert main(["--out", str(tmp_path / "cli"), "--train", "6", "--val", "0", "--size", "48", "--seed", "7",
                 "--classes", "circle", "star", "--max-objects", "1"]) == 0
    direct = syn.write_coco_split(tmp_path / "direct", "train", 6, 48, 7, classes=["circle", "star"], max_objects=1,
                                  progress=False)
    cli = tmp_path / "cli" / "annotations" / "instances_train.json"
    assert json.loads(cli.read_text()) == json.loads(direct.read_text())
    coco = COCO(str(cli))
    assert json.loads(cli.read_text())["info"]["seed"] == 7
    assert {coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"]} <= {"circle", "star"}
    assert all(len(coco.getAnnIds(imgIds=[i], iscrowd=None)) <= 1 for i in coco.getImgIds())
    assert coco.dataset["annotations"]


def _split_seed(root: Path) -> tuple[int, list[bytes]]:
    """The seed the annotation file records, and the split's images."""
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    return coco["info"]["seed"], [p.read_bytes() for p in sorted((root / "train").glob("*.jpg"))]


def test_a_stop_signal_as_the_new_images_move_in_never_pairs_them_with_the_old_annotations(tmp_path, monkeypatch):
    """Ctrl-C right after the new images folder was renamed into place: the clean-up deleted the old images and the
    new annotation file alike, leaving the new images beside the old annotations."""
    syn.write_coco_split(tmp_path / "fresh", "train", 2, size=32, seed=1, progress=False)
    syn.write_coco_split(tmp_path / "data", "train", 2, size=32, seed=0, progress=False)
    stop_after(monkeypatch, Path, "rename", lambda source, target: Path(target).name == "train")
    with pytest.raises(KeyboardInterrupt):
        syn.write_coco_split(tmp_path / "data", "train", 2, size=32, seed=1, progress=False)
    assert _split_seed(tmp_path / "data") == _split_seed(tmp_path / "fresh")  # the swap completed first
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["annotations", "train"]


def test_a_failed_swap_puts_the_old_split_back(tmp_path, monkeypatch):
    """The annotation file not replaced (a full disk, say): the old images come back beside the old annotations."""
    syn.write_coco_split(tmp_path, "train", 2, size=32, seed=0, progress=False)
    before = _split_seed(tmp_path)

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(syn.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        syn.write_coco_split(tmp_path, "train", 2, size=32, seed=1, progress=False)
    assert _split_seed(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations", "train"]


def test_a_stop_signal_during_generation_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """Ctrl-C while the images were drawn left the dataset folder with an empty annotations/ in it."""
    stop_after(monkeypatch, syn, "random_scene")
    with pytest.raises(KeyboardInterrupt):
        syn.write_coco_split(tmp_path / "new" / "data", "train", 2, size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_shape_cut_by_the_frame_has_no_outline_along_the_frame():
    """The outline marks the shape's own edge: where the frame cuts it, the shape goes on out of view. A disk of
    radius 20 centred on the left edge (rows 12..52 in column 0): with a 1-px band (size 40 / 40), column 0 is
    outlined only in its first and last row, whose upper / lower neighbour is outside the disk."""
    bright = [np.full((128, 128, 3), 200, np.uint8)]  # a bright texture gets a dark (20) outline
    background = np.full((64, 64, 3), 128, np.uint8)
    disk = syn.SceneObject(label=syn.CLASS_NAMES.index("circle") + 1, center=(0.0, 32.0), size=40, angle=0, texture=0)
    image, masks = syn.render_scene(background, [disk], bright)
    assert np.flatnonzero(masks[0][:, 0]).tolist() == list(range(12, 53))
    column = image[12:53, 0, 0]
    assert column[0] == column[-1] == 20 and (column[1:-1] == 200).all()
    assert image[32, 20, 0] == 20 and image[32, 19, 0] == 200  # the disk's own right edge is outlined


def test_random_scenes_put_some_objects_partly_out_of_frame(assets):
    """Up to a quarter of a shape may lie off-frame (centres at least size / 4 inside): a detector trained on the
    split must see objects cut by the frame, as in video. Cut: fewer pixels in frame than the same shape drawn on
    a canvas with room around it."""
    import dataclasses

    textures, backgrounds = assets
    cut = 0
    for seed in range(20):
        _, objects, _ = syn.random_scene(np.random.default_rng(seed), 96, 96, textures[:4], backgrounds[:2])
        for obj in objects:
            x, y, quarter = obj.center[0], obj.center[1], obj.size / 4
            assert quarter <= min(x, y) and max(x, y) <= 96 - quarter
            pad = int(obj.size) + 1  # whole pixels: the same grid, shifted
            roomy = dataclasses.replace(obj, center=(x + pad, y + pad))
            whole = syn.shape_mask(roomy, 96 + 2 * pad, 96 + 2 * pad).sum()
            cut += int(syn.shape_mask(obj, 96, 96).sum() < whole)
    assert cut >= 5
