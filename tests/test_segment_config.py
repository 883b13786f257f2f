"""SegmenterConfig refuses a setting of the wrong type or out of range when it is built, in one line naming it."""
from __future__ import annotations

from dataclasses import fields

import pytest

from segment.config import SegmenterConfig
from segment.errors import ConfigError


def refused(**settings) -> str:
    with pytest.raises(ConfigError) as error:
        SegmenterConfig.from_dict(settings)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", [f.name for f in fields(SegmenterConfig)])
def test_every_setting_is_type_checked(name):
    """Text where a number, a flag or a list of them belongs: each is named, none reaches the model."""
    assert f"segment.{name}" in refused(**{name: "oops" if name != "backbone" else 50})


@pytest.mark.parametrize("settings, fragment", [
    # found by hand: 620 detections a frame (a render at 0.06 fps); a deep RuntimeError in F.interpolate
    ({"detections_per_img": -1}, "segment.detections_per_img must be a whole number >= 1, got -1"),
    ({"min_size": 0}, "segment.min_size must be a whole number >= 1, got 0"),
    ({"min_size": [640, 0]}, "segment.min_size must be a whole number >= 1, got 0"),
    ({"min_size": []}, "segment.min_size must be a whole number >= 1 or a non-empty list of them, got []"),
    ({"max_size": 1333.5}, "segment.max_size must be a whole number >= 1, got 1333.5"),
    ({"detections_per_img": True}, "segment.detections_per_img must be a whole number >= 1, got True"),
    ({"score_threshold": 1.5}, "segment.score_threshold must be a number in [0, 1], got 1.5"),
    ({"nms_threshold": float("nan")}, "segment.nms_threshold must be a number in [0, 1], got nan"),
    ({"bn_eps": -1e-5}, "segment.bn_eps must be a finite number >= 0, got -1e-05"),
    ({"trainable_layers": 6}, "segment.trainable_layers must be a whole number from 0 to 5, got 6"),
    ({"num_classes": 1}, "segment.num_classes must be a whole number >= 2, got 1"),
    ({"paste_chunk_size": 0}, "segment.paste_chunk_size must be a whole number >= 1, got 0"),
    ({"rpn_post_nms_top_n_test": 0}, "segment.rpn_post_nms_top_n_test must be a whole number >= 1, got 0"),
    ({"box_min_size": -1}, "segment.box_min_size must be a finite number >= 0, got -1"),
    ({"image_std": [0.229, 0.0, 0.225]}, "segment.image_std must be a finite number > 0, got 0.0"),
    ({"image_mean": [0.5, 0.5]}, "segment.image_mean needs 3 values (R, G, B), got [0.5, 0.5]"),
    ({"anchor_ratios": []}, "segment.anchor_ratios needs at least one value, got []"),
    ({"anchor_sizes": [32, 64, 128, 256, -512]}, "segment.anchor_sizes must be a finite number > 0, got -512"),
    ({"rpn_bg_iou_thresh": 0.8}, "segment.rpn_bg_iou_thresh (0.8) must not exceed segment.rpn_fg_iou_thresh (0.7)"),
    ({"channels_last": "no"}, "segment.channels_last must be true or false, got 'no'"),
    ({"class_names": "__background__"}, "segment.class_names must be a list of names, got '__background__'"),
])
def test_out_of_range_settings_are_refused(settings, fragment):
    assert fragment in refused(**settings)


def test_accepted_values_are_kept_as_given():
    config = SegmenterConfig.from_dict({"min_size": [640, 672], "score_threshold": 0, "num_classes": None,
                                        "bn_eps": None, "anchor_sizes": (16, 32, 64, 128, 256)})
    assert config.min_sizes == (640, 672) and config.score_threshold == 0.0 and config.num_classes == 91
    assert config.bn_eps == 1e-5 and config.anchor_sizes == [16, 32, 64, 128, 256]
    assert SegmenterConfig.from_dict(config.to_dict()) == config


def test_group_norm_leaves_the_fpn_and_head_widths_free():
    """norm=gn refused FPN and mask-head widths that are not multiples of 32, though GroupNorm is only in the ResNet
    body: 40 channels build, and predict and train like any width."""
    import torch

    from segment.model import build_model

    torch.manual_seed(0)
    model = build_model(SegmenterConfig(backbone="resnet18", norm="gn", fpn_channels=40, mask_head_channels=40,
                                        representation_size=32, num_classes=3, min_size=64, max_size=64))
    assert not any(isinstance(m, torch.nn.GroupNorm) for name, m in model.named_modules() if "body" not in name)
    images = [torch.rand(3, 64, 64)]
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    target["masks"][0, 8:40, 8:40] = 1
    losses = model.train()(images, [target])
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert len(model.eval().predict([(images[0] * 255).to(torch.uint8)])) == 1


@pytest.mark.parametrize("stage", ["rpn", "box"])
def test_a_background_threshold_above_the_foreground_one_is_refused(stage):
    # torchvision's Matcher would assert deep inside training; here the config names both settings
    message = refused(**{f"{stage}_bg_iou_thresh": 0.7, f"{stage}_fg_iou_thresh": 0.5})
    assert message == f"segment.{stage}_bg_iou_thresh (0.7) must not exceed segment.{stage}_fg_iou_thresh (0.5)"


@pytest.mark.parametrize("num_classes", [2, 92])
def test_class_counts_other_than_cocos_get_numbered_names(num_classes):
    """COCO's names belong to exactly 91 classes: one more is another data set, not COCO with an extra class."""
    names = SegmenterConfig(num_classes=num_classes).class_names
    assert names == ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
