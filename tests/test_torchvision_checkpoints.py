"""torchvision's own Mask R-CNN files, as people have them: its COCO v1 weights and models fine-tuned from them,
models built without pretrained weights, its reference training scripts' checkpoints, DDP's, other class counts.
Each loads as torchvision would run it, with torchvision's outputs as the oracle."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from segment.checkpoint import load_checkpoint, load_segmenter, load_torchvision_checkpoint
from segment.config import SegmenterConfig
from segment.errors import CheckpointError
from segment.model import build_model
from segment.tv_reference import torchvision_reference

ROOT = Path(__file__).resolve().parents[1]
# small for CPU speed, identical on both sides (as tests/test_segment_parity.py)
SETTINGS = dict(min_size=192, max_size=288)
TV_SETTINGS = dict(SETTINGS, box_score_thresh=0.05, box_detections_per_img=40, rpn_post_nms_top_n_test=300)
OUR_SETTINGS = dict(SETTINGS, score_threshold=0.05, detections_per_img=40, rpn_post_nms_top_n_test=300,
                    channels_last=False)


@pytest.fixture(scope="module")
def files(real_photos, tmp_path_factory):
    """torchvision models and their files: `coco` as its COCO v1 weights run (FrozenBatchNorm eps 0, no BatchNorm
    step counters), `built` as maskrcnn_resnet50_fpn(weights=None, weights_backbone=None) builds it (trainable
    BatchNorm eps 1e-5, whose state_dict has step counters; the same statistics, calibrated on photos),
    `tuned`: the COCO model with new 2-class predictors, as torchvision's fine-tuning tutorial makes it."""
    folder = tmp_path_factory.mktemp("tv")
    coco = torchvision_reference([p.float() / 255 for p in real_photos.values()], seed=0, **TV_SETTINGS)
    built = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **TV_SETTINGS).eval()
    assert {type(m) for m in built.modules()} >= {nn.BatchNorm2d} and built.backbone.body.bn1.eps == 1e-5
    missing, unexpected = built.load_state_dict(coco.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    tuned = copy.deepcopy(coco)
    torch.manual_seed(2)
    tuned.roi_heads.box_predictor = FastRCNNPredictor(1024, 2)
    tuned.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, 2)
    models = {"coco": coco, "built": built, "tuned": tuned.eval()}
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(model.state_dict(), paths[name])
    return models, paths


def assert_same_detections(ours, theirs, frame):
    with torch.no_grad():
        want = theirs([frame.float() / 255])[0]
    got = ours.predict(frame)[0]
    assert len(want["labels"]) >= 10, "reference output is too trivial"
    assert torch.equal(got.labels, want["labels"])
    torch.testing.assert_close(got.boxes, want["boxes"], rtol=0, atol=5e-3)
    torch.testing.assert_close(got.scores, want["scores"], rtol=0, atol=2e-4)


@pytest.mark.parametrize("kind, eps", [("coco", 0.0), ("built", 1e-5)])
def test_bare_file_runs_with_the_batchnorm_eps_torchvision_built_it_with(files, real_photos, kind, eps):
    """A file with BatchNorm step counters comes from a model torchvision built with trainable BatchNorm, eps 1e-5;
    without them, from its COCO weights or a model fine-tuned from them, run with eps 0. It was always eps 0: the
    `built` model's detections came out with other labels and boxes 180 px away."""
    models, paths = files
    ours = load_torchvision_checkpoint(paths[kind], **OUR_SETTINGS)
    assert ours.config.bn_eps == eps
    assert_same_detections(ours, models[kind], real_photos["coffee"])


def test_an_explicit_bn_eps_wins(files):
    _, paths = files
    assert load_torchvision_checkpoint(paths["built"], bn_eps=0.0).config.bn_eps == 0.0
    assert load_torchvision_checkpoint(paths["coco"], bn_eps=1e-5).config.bn_eps == 1e-5
    group = OmegaConf.load(ROOT / "conf" / "segment" / "r50_fpn.yaml")
    group.checkpoint, group.device = str(paths["built"]), "cpu"
    assert load_segmenter(group).config.bn_eps == 1e-5  # segment=r50_fpn leaves it to the file
    group.bn_eps = 0.0
    assert load_segmenter(group).config.bn_eps == 0.0


def test_fine_tuned_class_count_is_read_from_the_file(files, real_photos):
    """torchvision's fine-tuning tutorial's model (2 classes): "shape mismatch ... (2, 1024) vs model (91, 1024)",
    with no word of segment.num_classes."""
    models, paths = files
    ours = load_torchvision_checkpoint(paths["tuned"], **OUR_SETTINGS)
    assert ours.config.num_classes == 2 and ours.class_names == ["__background__", "class_1"]
    assert ours.config.bn_eps == 0.0
    assert_same_detections(ours, models["tuned"], real_photos["coffee"])
    named = load_torchvision_checkpoint(paths["tuned"], class_names=["__background__", "pedestrian"])
    assert named.class_names == ["__background__", "pedestrian"]
    assert load_torchvision_checkpoint(paths["coco"]).class_names[:3] == ["__background__", "person", "bicycle"]


@pytest.mark.parametrize("setting, fragment", [
    ({"num_classes": 91}, "has 2 classes (background included), not segment.num_classes=91: set "
                          "segment.num_classes=2"),
    ({"class_names": ["__background__", "cat", "dog"]}, "has 2 classes (background included) but segment.class_names "
                                                        "has 3 names"),
])
def test_a_class_setting_the_file_contradicts_says_what_to_set(files, setting, fragment):
    _, paths = files
    with pytest.raises(CheckpointError) as error:
        load_torchvision_checkpoint(paths["tuned"], **setting)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_export_writes_a_fine_tuned_torchvision_file(files, tmp_path, capsys):
    from scripts.export_segmenter import main

    _, paths = files
    out = tmp_path / "tuned.pt"
    assert main([str(paths["tuned"]), str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(", 1 class (class_1)")
    exported = load_checkpoint(out)
    assert exported.config.num_classes == 2 and exported.config.bn_eps == 0.0


def reference_script_checkpoint(model: nn.Module) -> dict:
    """What torchvision's references/detection/train.py saves each epoch (model_{epoch}.pth, checkpoint.pth)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16, 22], gamma=0.1)
    args = argparse.Namespace(data_path="/datasets01/COCO/022719/", dataset="coco", model="maskrcnn_resnet50_fpn",
                              epochs=26, lr=0.02, lr_steps=[16, 22], weights=None, amp=False, output_dir=".")
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "args": args, "epoch": 3}


@pytest.mark.parametrize("wrapping", ["reference_script", "ddp", "reference_script_of_ddp"])
def test_training_wrappers_load(files, tmp_path, wrapping):
    """The reference scripts' {'model', 'optimizer', 'lr_scheduler', 'args', 'epoch'} and DDP's 'module.' keys (a
    DataParallel model's state_dict has them too) were refused: "neither an instyle-segment-v1 checkpoint nor ..."."""
    models, _ = files
    model = models["built"]
    wrapped = model if wrapping == "reference_script" else nn.DataParallel(model)
    content = wrapped.state_dict() if wrapping == "ddp" else reference_script_checkpoint(wrapped)
    path = tmp_path / "model_3.pth"
    torch.save(content, path)
    ours = load_checkpoint(path)
    assert ours.config.bn_eps == 1e-5
    loaded = ours.state_dict()
    for name, value in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(loaded[name], value), name


def test_a_file_of_another_backbone_names_the_config_to_use(files, tmp_path):
    """The README's COCO command without segment=r50_fpn read the file into the demo's resnet18 config: "does not
    fit the resnet18 model ... unexpected ... (205); shape mismatch ... (57)"."""
    from hydra import compose, initialize_config_dir

    _, paths = files
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        group = compose(config_name="render", overrides=[f"segment.checkpoint={paths['coco']}"]).segment
    with pytest.raises(CheckpointError) as error:
        load_segmenter(group)
    message = str(error.value)
    assert "holds a resnet50 backbone (6 bottleneck blocks in layer3)" in message and "\n" not in message
    assert message.endswith("add segment=r50_fpn to the command (or the segment config it was trained with)")

    torch.manual_seed(0)
    small = build_model(SegmenterConfig(backbone="resnet18", norm="gn", fpn_channels=64, representation_size=128,
                                        mask_head_channels=64))
    torch.save(small.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"holds a resnet18 backbone \(2 basic blocks in layer3\) but the "
                                              r"segment config is for resnet50: add segment=r18_fpn"):
        load_torchvision_checkpoint(tmp_path / "r18.pth")


def test_a_resnext_file_loads_as_resnext(tmp_path):
    """ResNeXt-50 has ResNet-50's block counts: only its grouped conv2 tells them apart. Random weights in
    torchvision's own Mask R-CNN on a resnext50_32x4d body, every one read into our model by name."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    theirs = MaskRCNN(resnet_fpn_backbone(backbone_name="resnext50_32x4d", weights=None), num_classes=3)
    state = theirs.state_dict()
    torch.save(state, tmp_path / "resnext50.pth")
    ours = load_torchvision_checkpoint(tmp_path / "resnext50.pth", backbone="resnext50_32x4d")
    assert ours.config.backbone == "resnext50_32x4d" and ours.config.num_classes == 3
    loaded = ours.state_dict()
    for name, value in state.items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(loaded[name], value), name
    with pytest.raises(CheckpointError, match=r"holds a resnext50_32x4d backbone .* segment config is for resnet50"):
        load_torchvision_checkpoint(tmp_path / "resnext50.pth")
