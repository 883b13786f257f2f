"""Each stage of our Mask R-CNN against torchvision's equivalent on identical inputs."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TvBoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads as TvRoIHeads
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from segment.anchors import AnchorGenerator
from segment.box_coder import BoxCoder
from segment.config import SegmenterConfig
from segment.fpn import FeaturePyramid
from segment.postprocess import paste_masks, select_detections
from segment.roi_masks import RoIMasks
from segment.roi_pool import MultiLevelRoIAlign, map_levels
from segment.structures import Instances
from segment.transform import ImageTransform, rescale_boxes

SIZES, RATIOS = [32, 64, 128, 256, 512], [0.5, 1.0, 2.0]


def boxes_in(n: int, width: float, height: float, g: torch.Generator, min_side: float = 2.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) / 2 + min_side
    return torch.cat([xy, xy + wh], dim=1)


def test_rescale_boxes_equals_torchvision(device):
    g = torch.Generator().manual_seed(6)
    boxes = boxes_in(40, 640, 480, g).to(device)
    for from_size, to_size in [((480, 640), (800, 1067)), ((481, 643), (799, 1061)), ((1080, 1920), (750, 1333))]:
        assert torch.equal(rescale_boxes(boxes, from_size, to_size), resize_boxes(boxes, from_size, to_size))


def test_anchors_equal_torchvision():
    padded = torch.zeros(2, 3, 224, 320)
    grids = [(56, 80), (28, 40), (14, 20), (7, 10), (4, 5)]
    features = [torch.zeros(2, 8, h, w) for h, w in grids]
    want = TvAnchorGenerator(tuple((s,) for s in SIZES), (tuple(RATIOS),) * 5)(ImageList(padded, [(224, 300), (200, 320)]), features)
    got, per_level = AnchorGenerator(SIZES, RATIOS)((224, 320), grids, torch.float32, "cpu")
    assert per_level == [h * w * 3 for h, w in grids]
    for image_anchors in want:
        assert torch.equal(got, image_anchors)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_equals_torchvision(weights, device):
    g = torch.Generator().manual_seed(0)
    references, targets = boxes_in(50, 300, 200, g), boxes_in(50, 300, 200, g)
    ours, theirs = BoxCoder(weights), TvBoxCoder(weights)
    deltas = ours.encode(targets, references)
    assert torch.equal(deltas, theirs.encode_single(targets, references))
    # a batch of images' targets against one set of references, in one call, on the device under test
    batch = torch.stack([targets, boxes_in(50, 300, 200, g)]).to(device)
    batched = ours.encode(batch, references.to(device))
    for image_targets, image_deltas in zip(batch, batched):
        assert torch.equal(image_deltas, theirs.encode_single(image_targets, references.to(device)))
    codes = torch.randn(50, 12, generator=g)
    codes[0, 2] = 50.0  # clamped before exp
    codes[1, 3] = 50.0  # the height's delta too: unclamped it stays finite (exp(50) px), but is not torchvision's
    decoded = ours.decode(codes, references)
    assert torch.equal(decoded, theirs.decode(codes, [references]))
    assert torch.isfinite(decoded).all()
    torch.testing.assert_close(ours.decode(deltas, references)[:, 0], targets, rtol=0, atol=1e-3)


def test_level_mapping_and_multilevel_roi_align_equal_torchvision():
    g = torch.Generator().manual_seed(1)
    boxes = [boxes_in(40, 400, 300, g, min_side=1.0), boxes_in(25, 400, 300, g, min_side=100.0)]
    boxes[1][:3] = torch.tensor([[0.0, 0.0, 400.0, 300.0], [0.0, 0.0, 520.0, 460.0], [0.0, 0.0, 3.0, 2.0]])
    want_levels = initLevelMapper(2, 5)(boxes)
    got_levels = map_levels(torch.cat(boxes))
    assert torch.equal(got_levels, want_levels) and len(got_levels.unique()) == 4
    # a hair under each level's boundary (sqrt(area) 112, 224, 448): FPN eq. 1's eps keeps them on the upper level
    near = torch.tensor([[0.0, 0.0, 112.0, 111.9999], [0.0, 0.0, 224.0, 223.9998], [0.0, 0.0, 448.0, 447.9996]])
    assert torch.equal(map_levels(near), initLevelMapper(2, 5)([near])) and map_levels(near).tolist() == [1, 2, 3]
    names = ["0", "1", "2", "3"]
    features = {n: torch.randn(2, 4, 304 // 2**i // 4, 416 // 2**i // 4, generator=g) for i, n in enumerate(names)}
    want = MultiScaleRoIAlign(names, 7, 2)(features, boxes, [(300, 400), (290, 410)])
    got = MultiLevelRoIAlign(7, 2)(list(features.values()), boxes)
    assert torch.equal(got, want)
    # a NaN box (a diverged model's) belongs to no level: its row stays zero, as in torchvision
    boxes[0][5, 0] = float("nan")
    want = MultiScaleRoIAlign(names, 7, 2)(features, boxes, [(300, 400), (290, 410)])
    got = MultiLevelRoIAlign(7, 2)(list(features.values()), boxes)
    assert torch.equal(got, want) and not got[5].any()


def test_fpn_equals_torchvision():
    g = torch.Generator().manual_seed(2)
    channels = [64, 128, 256, 512]
    theirs = FeaturePyramidNetwork(channels, 96, extra_blocks=LastLevelMaxPool())
    ours = FeaturePyramid(channels, 96)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    stages = [torch.randn(1, c, 64 // 2**i, 96 // 2**i, generator=g) for i, c in enumerate(channels)]
    want = theirs(OrderedDict((str(i), s) for i, s in enumerate(stages)))
    got = ours(stages)
    assert list(got) == list(want) == ["0", "1", "2", "3", "pool"]
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("height, width", [(1080, 1920), (333, 517), (481, 300), (241, 1001)])
def test_shrinking_uint8_frames_equal_torchvision(height, width):
    # A frame that shrinks is resized from the input rows that bilinear reads (a CPU): whole, fractional and
    # max_size-bound scales, against torchvision on the whole frame in float. Noise makes an ulp's error in a
    # source row's coordinate show (1.6e-5 at 241x1001 when it was rounded twice); float rounding stays below 1e-6.
    g = torch.Generator().manual_seed(height)
    frames = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=g)
    config = SegmenterConfig(min_size=216, max_size=384)
    want, _ = GeneralizedRCNNTransform(216, 384, config.image_mean, config.image_std).eval()(
        [frame.float() / 255 for frame in frames])
    got = ImageTransform(config).uint8_batch(frames)
    assert got.image_sizes == want.image_sizes
    torch.testing.assert_close(got.tensors, want.tensors, rtol=0, atol=2e-6)


def test_transform_equals_torchvision():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 171, 256, generator=g), torch.rand(3, 300, 200, generator=g)]
    targets = [
        {"boxes": boxes_in(3, 200, 150, g), "labels": torch.tensor([1, 2, 3]), "masks": (torch.rand(3, 171, 256, generator=g) > 0.5).byte()},
        {"boxes": boxes_in(2, 180, 280, g), "labels": torch.tensor([1, 1]), "masks": (torch.rand(2, 300, 200, generator=g) > 0.5).byte()},
    ]
    config = SegmenterConfig(min_size=224, max_size=320)
    theirs = GeneralizedRCNNTransform(224, 320, config.image_mean, config.image_std).eval()
    ours = ImageTransform(config)
    want, _ = theirs(images)
    got, _ = ours.float_batch(images)
    assert torch.equal(got.tensors, want.tensors) and got.image_sizes == want.image_sizes
    assert got.original_sizes == [(171, 256), (300, 200)]
    uint8 = (images[0] * 255).round().byte()
    want_u8, _ = theirs([uint8.float() / 255])
    got_u8 = ours.uint8_batch(torch.stack([uint8, uint8]))
    assert torch.equal(got_u8.tensors[0], want_u8.tensors[0]) and torch.equal(got_u8.tensors[1], want_u8.tensors[0])
    # a frame that shrinks is normalised after resizing: the same values up to float rounding
    frame = (torch.rand(3, 400, 300, generator=g) * 255).round().byte()
    want_small, _ = theirs([frame.float() / 255])
    got_small = ours.uint8_batch(frame[None])
    assert got_small.image_sizes == want_small.image_sizes == [(298, 224)]
    torch.testing.assert_close(got_small.tensors[0], want_small.tensors[0], rtol=0, atol=1e-5)
    pair = torch.stack([frame, frame.flip(-1)])  # a CPU shrinks a batch frame by frame: the same as each alone
    want_pair, _ = theirs([image.float() / 255 for image in pair])
    torch.testing.assert_close(ours.uint8_batch(pair).tensors, want_pair.tensors, rtol=0, atol=1e-5)
    theirs.train()
    torch.manual_seed(0)
    want, want_targets = theirs(images, targets)
    torch.manual_seed(0)
    got, got_targets = ours.float_batch(images, targets, training=True)
    assert torch.equal(got.tensors, want.tensors)
    for a, b in zip(got_targets, want_targets):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    # several training sizes: evaluation, like torchvision's, resizes to the last one
    multi = SegmenterConfig(min_size=[160, 192, 224], max_size=320)
    theirs = GeneralizedRCNNTransform((160, 192, 224), 320, multi.image_mean, multi.image_std).eval()
    want, _ = theirs(images)
    got, _ = ImageTransform(multi).float_batch(images)
    assert got.image_sizes == want.image_sizes and torch.equal(got.tensors, want.tensors)


def test_detection_selection_equals_torchvision():
    g = torch.Generator().manual_seed(4)
    proposals = [boxes_in(300, 320, 240, g), boxes_in(200, 320, 240, g)]
    logits = torch.randn(500, 6, generator=g) * 3
    regression = torch.randn(500, 24, generator=g)
    sizes = [(240, 320), (230, 300)]
    theirs = TvRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    want = theirs.postprocess_detections(logits, regression, proposals, sizes)
    got = select_detections(logits, regression, proposals, sizes, BoxCoder((10.0, 10.0, 5.0, 5.0)), 0.05, 0.5, 100)
    for i, (boxes, scores, labels) in enumerate(got):
        assert len(boxes) == 100
        assert torch.equal(boxes, want[0][i]) and torch.equal(scores, want[1][i]) and torch.equal(labels, want[2][i])


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_mask_paste_equals_torchvision(chunk_size):
    g = torch.Generator().manual_seed(5)
    height, width = 150, 210
    boxes = boxes_in(30, width, height, g, min_side=0.3)
    boxes[0] = torch.tensor([-20.0, -10.0, 60.5, 40.2])  # sticks out top-left
    boxes[1] = torch.tensor([180.0, 120.0, 260.0, 190.0])  # sticks out bottom-right
    boxes[2] = torch.tensor([5.2, 6.7, 5.4, 6.9])  # sub-pixel
    boxes[3] = torch.tensor([0.0, 0.0, 210.0, 150.0])  # whole image
    masks = torch.rand(30, 28, 28, generator=g)
    want = paste_masks_in_image(masks[:, None], boxes, (height, width))[:, 0]
    got = paste_masks(masks, boxes, (height, width), chunk_size=chunk_size)
    assert got.shape == want.shape == (30, height, width)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert paste_masks(masks[:0], boxes[:0], (height, width)).shape == (0, height, width)


def test_mask_areas_count_what_numpy_counts(device):
    g = torch.Generator().manual_seed(9)
    masks = torch.rand(5, 37, 53, generator=g)
    masks[1] = 0.5  # exactly at the threshold: counts
    masks[2] = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))  # just below: does not
    boxes = torch.zeros(5, 4)
    instances = Instances(image_size=(37, 53), boxes=boxes, scores=torch.ones(5),
                          labels=torch.ones(5, dtype=torch.long), masks=masks).to(device)
    want = (masks.numpy() >= 0.5).reshape(5, -1).sum(1)
    assert instances.mask_areas().cpu().tolist() == want.tolist()
    assert instances.mask_areas().tolist()[1:3] == [37 * 53, 0]
    assert instances.binarize().mask_areas().tolist() == want.tolist()
    assert instances.mask_areas(0.9).cpu().tolist() == (masks.numpy() >= 0.9).reshape(5, -1).sum(1).tolist()
    assert instances[:0].mask_areas().shape == (0,)


def test_fold_frozen_batchnorm_equals_conv_then_bn():
    from torchvision.ops import FrozenBatchNorm2d

    from segment.fold import fold_frozen_batchnorm

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), FrozenBatchNorm2d(8), torch.nn.ReLU())
    bn = block[1]
    bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.1, 3)
    x = torch.randn(2, 3, 16, 16)
    want = block(x)
    assert fold_frozen_batchnorm(block) == 1
    assert isinstance(block[1], torch.nn.Identity) and block[0].bias is not None
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_size", [(2, 10, 12), (1, 2, 2)], ids=["folded", "output_scaled"])
def test_conv_frozen_bn_equals_conv_then_bn_in_training(bias, input_size):
    """segment.backbone.conv_frozen_bn, both ways (folded into the weights, or the map applied to a small output):
    same output and input / weight / bias gradients as torchvision's conv -> FrozenBatchNorm2d, no gradient for the
    BN buffers, and buffers changed later (loaded, written in place, replaced, cast) are the ones used: the cached
    scale and shift are remade then, and only then."""
    from torchvision.ops import FrozenBatchNorm2d

    from segment.backbone import conv_frozen_bn, fold_into_weights, frozen_bn_affine

    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(4, 8, 3, padding=1, bias=bias), FrozenBatchNorm2d(8)
    bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.1, 3)
    n, h, w = input_size
    x = torch.randn(n, 4, h, w, requires_grad=True)
    assert fold_into_weights(conv, x) == (input_size == (2, 10, 12))
    upstream = torch.randn(n, 8, h, w)
    results = []
    for run in (lambda: bn(conv(x)), lambda: conv_frozen_bn(conv, bn, x)):
        x.grad = None
        conv.zero_grad(set_to_none=True)
        out = run()
        (out * upstream).sum().backward()
        results.append([out, x.grad, *(p.grad for p in conv.parameters())])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert all(not b.requires_grad and b.grad is None for b in bn.buffers())
    assert all(a is b for a, b in zip(frozen_bn_affine(bn), frozen_bn_affine(bn)))  # made once, then reused
    changes = [
        # a new tensor with the old one's version count (1, from normal_ above): only its identity differs
        lambda: setattr(bn, "running_mean", torch.empty(8).normal_()),
        lambda: bn.load_state_dict({k: torch.rand_like(v) + 0.5 for k, v in bn.state_dict().items()}),
        lambda: bn.running_var.mul_(3),
        lambda: (bn.double(), conv.double()),
    ]
    for change in changes:
        change()
        with torch.no_grad():
            torch.testing.assert_close(conv_frozen_bn(conv, bn, x.to(conv.weight.dtype)), bn(conv(x.to(conv.weight.dtype))),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_folds_frozen_bn_while_training_only(arch, monkeypatch):
    """Our ResNet body equals torchvision's ResNet with the same state: with autograd on (training) the frozen BNs
    are folded per forward, under no_grad (inference) they run exactly as torchvision's, and after segment.fold
    replaced them by Identity the blocks take their plain path."""
    from torchvision.models import resnet
    from torchvision.ops import FrozenBatchNorm2d

    import segment.backbone
    from segment.backbone import ResNetBody
    from segment.fold import fold_frozen_batchnorm

    torch.manual_seed(0)
    ours = ResNetBody(arch, "frozen_bn")
    for bn in (m for m in ours.modules() if isinstance(m, FrozenBatchNorm2d)):
        bn.weight.uniform_(0.1, 0.5), bn.bias.normal_(0, 0.1), bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    theirs = getattr(resnet, arch)(norm_layer=FrozenBatchNorm2d)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        want = []
        y = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))
        for stage in (theirs.layer1, theirs.layer2, theirs.layer3, theirs.layer4):
            y = stage(y)
            want.append(y)

    calls, real = [], segment.backbone.conv_frozen_bn

    def counted(conv, bn, x):
        calls.append(bn)
        return real(conv, bn, x)

    monkeypatch.setattr(segment.backbone, "conv_frozen_bn", counted)
    norms = {"resnet18": 20, "resnet50": 53}[arch]
    folded = ours(x)  # parameters require grad: autograd records
    assert len(calls) == norms
    with torch.no_grad():
        unfolded = ours(x)
    assert len(calls) == norms
    for got, exact, expected in zip(folded, unfolded, want):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        assert torch.equal(exact, expected)
    with torch.no_grad():
        assert fold_frozen_batchnorm(ours) == norms
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in ours.modules())
        for got, expected in zip(ours(x), want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_folded_model_refuses_training_and_saving(tmp_path):
    from segment.checkpoint import save_checkpoint
    from segment.errors import CheckpointError
    from segment.model import build_model

    model = build_model(dict(backbone="resnet18", norm="frozen_bn", fpn_channels=32, representation_size=32,
                             mask_head_channels=32, num_classes=2)).fold_frozen_norms()
    with pytest.raises(RuntimeError, match="folded"):
        model.train()
    with pytest.raises(CheckpointError, match="folded"):
        save_checkpoint(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_predict_without_frames_or_pixels():
    """An empty batch tensor was a reshape RuntimeError (an empty list gave [] already), a frame without rows a
    ZeroDivisionError, and one that resizing leaves without rows an F.interpolate RuntimeError (torchvision's too)."""
    from segment.errors import FrameSizeError
    from segment.model import build_model

    model = build_model(dict(backbone="resnet18", norm="gn", fpn_channels=32, representation_size=32,
                             mask_head_channels=32, num_classes=2, min_size=192, max_size=288)).eval()
    assert model.predict(torch.zeros(0, 3, 64, 64, dtype=torch.uint8)) == [] and model.predict([]) == []
    cases = [((0, 64), "a 64x0 frame has no pixels"),  # width x height, as every other message
             ((1, 320), "a 320x1 frame is 288x0 pixels once resized (min_size 192, max_size 288): too thin to segment")]
    for (height, width), fragment in cases:
        frame = torch.zeros(3, height, width, dtype=torch.uint8)
        for run in (lambda: model.predict(frame), lambda: model.predict([frame]), lambda: model([frame / 255])):
            with pytest.raises(FrameSizeError) as error:
                run()
            assert fragment in str(error.value) and "\n" not in str(error.value)


def test_one_frame_gives_one_result_and_eval_forward_needs_no_no_grad():
    """predict(frame) sized its results by the frame's channels ([result, None, None]); the eval forward, which
    torchvision callers use, raised an autograd error outside no_grad; a tensor where a list goes was split into its
    channels and refused as 'expected a float tensor, got torch.float32'."""
    from segment.model import build_model

    torch.manual_seed(0)
    model = build_model(dict(backbone="resnet18", norm="gn", fpn_channels=32, representation_size=32,
                             mask_head_channels=32, num_classes=2, min_size=64, max_size=96)).eval()
    frame = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    (alone,) = model.predict(frame)
    (listed,) = model.predict([frame])
    assert len(alone) > 0 and torch.equal(alone.boxes, listed.boxes) and torch.equal(alone.scores, listed.scores)
    (forward,) = model([frame / 255])  # grad mode on, as a caller's plain script has it
    assert torch.is_grad_enabled() and torch.equal(forward.labels, listed.labels)
    assert (forward.boxes - listed.boxes).abs().max() < 1e-3  # 0-255 vs 0-1 input: the same pixels up to rounding
    with pytest.raises(TypeError, match=r"pass a list of float \(3, H, W\) images in \[0, 1\], got a tensor of "
                                        r"shape \(3, 48, 64\)"):
        model(frame / 255)

@pytest.mark.parametrize("threads", [1, 4, 8])
def test_multilevel_roi_align_training_equals_torchvision(threads):
    # CPU training pools on the thread pool too (RoI chunks forward; backward an image per thread, 8 threads over 3
    # images also split the channels): the pooled values and the features' gradients must be exactly
    # torchvision's, with an image that has no RoIs at all
    g = torch.Generator().manual_seed(4)
    boxes = [boxes_in(300, 400, 300, g, min_side=1.0), boxes_in(0, 400, 300, g), boxes_in(90, 400, 300, g, min_side=40.0)]
    boxes[2][:2] = torch.tensor([[0.0, 0.0, 400.0, 300.0], [0.0, 0.0, 520.0, 460.0]])  # the top levels get RoIs too
    names = ["0", "1", "2", "3"]
    sizes = [(300, 400), (290, 410), (300, 400)]
    grad = torch.randn(390, 8, 7, 7, generator=g)
    results = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for pooler in (lambda f: MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, f)), boxes, sizes),
                       lambda f: MultiLevelRoIAlign(7, 2)(f, boxes)):
            features = [torch.randn(3, 8, 304 // 2**i // 4, 416 // 2**i // 4, generator=torch.Generator().manual_seed(i))
                        .requires_grad_() for i in range(4)]
            pooled = pooler(features)
            pooled.backward(grad)
            results.append((pooled.detach(), [f.grad for f in features]))
    finally:
        torch.set_num_threads(previous)
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads)) and all(a.any() for a in got_grads)
    assert not got_grads[0][1].any()  # the image without RoIs gets no gradient


@pytest.mark.parametrize("autocast", [False, True])
def test_multilevel_roi_align_in_threads_equals_torchvision(autocast):
    # CPU inference splits each level's RoIs over a thread pool; the thread-local inference and autocast modes
    # must reach the workers, and the pooled values must be exactly torchvision's.
    g = torch.Generator().manual_seed(3)
    boxes = [boxes_in(300, 400, 300, g, min_side=1.0), boxes_in(200, 400, 300, g, min_side=40.0)]
    names = ["0", "1", "2", "3"]
    dtype = torch.bfloat16 if autocast else torch.float32  # what the FPN hands over under bf16 autocast
    features = {n: torch.randn(2, 8, 304 // 2**i // 4, 416 // 2**i // 4, generator=g).to(dtype)
                for i, n in enumerate(names)}
    sizes = [(300, 400), (290, 410)]
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want = MultiScaleRoIAlign(names, 7, 2)(features, boxes, sizes)
            got = MultiLevelRoIAlign(7, 2)(list(features.values()), boxes)
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_cpu_model_reads_frames_from_the_device_under_test(device, tmp_path):
    """predict takes frames on any device. A CPU model given GPU frames copied them to the host with non_blocking,
    and a copy to the host is not finished when the call returns: the front could read the frame half-copied.
    The same frames from the host are the oracle (on a GPU, a long matmul queued first keeps the copy late)."""
    from segment.checkpoint import load_checkpoint
    from tests.tiny_models import tiny_segmenter

    model = load_checkpoint(tiny_segmenter(tmp_path / "tiny.pt")).eval()
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    want = model.predict(frames)
    on_device = frames.to(device)
    if device.type == "cuda":
        busy = torch.randn(4096, 4096, device=device)
        for _ in range(8):
            busy = busy @ busy / 64
    for got, expected in zip(model.predict(on_device), want):
        for field in ("boxes", "scores", "labels", "masks"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=0)


def test_proposal_filters_equal_torchvision_with_a_score_threshold():
    from torchvision.models.detection.rpn import RegionProposalNetwork as TvRPN
    from torchvision.models.detection.rpn import RPNHead as TvRPNHead

    from segment.rpn import Candidates, RegionProposalNetwork

    g = torch.Generator().manual_seed(7)
    per_level = [300, 120, 40]  # each under pre_nms_top_n: torchvision's top-k keeps every candidate, as given here
    boxes = torch.stack([boxes_in(460, 200, 180, g, min_side=0.0) - 20 for _ in range(2)])  # some stick out
    logits = torch.randn(2, 460, generator=g) * 2
    levels = torch.cat([torch.full((n,), i) for i, n in enumerate(per_level)]).expand(2, -1)
    sizes = [(150, 170), (160, 160)]
    got = RegionProposalNetwork(SegmenterConfig(rpn_score_thresh=0.6)).eval().select_proposals(
        Candidates(boxes, torch.sigmoid(logits), levels), sizes)
    theirs = TvRPN(TvAnchorGenerator(((32,),), ((1.0,),)), TvRPNHead(8, 1), 0.7, 0.3, 256, 0.5,
                   dict(training=2000, testing=1000), dict(training=2000, testing=1000), 0.7, score_thresh=0.6).eval()
    want, _ = theirs.filter_proposals(boxes, logits, sizes, per_level)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    theirs.score_thresh = 0.0
    unfiltered, _ = theirs.filter_proposals(boxes, logits, sizes, per_level)
    assert all(len(a) < len(b) for a, b in zip(got, unfiltered))  # the threshold does remove proposals here


def test_rpn_inference_keeps_the_test_time_top_k_like_torchvision():
    """Eval-mode proposals of our RPN (top-k per level, decode, filters) against torchvision's RegionProposalNetwork
    with the same head weights on the same features: with pre_nms_top_n 50 at test time and 2000 in training, the
    training value would keep many more candidates on the 3072-anchor first level."""
    from torchvision.models.detection.rpn import RegionProposalNetwork as TvRPN
    from torchvision.models.detection.rpn import RPNHead as TvRPNHead

    from segment.rpn import RegionProposalNetwork
    from segment.transform import ImageBatch

    config = SegmenterConfig(fpn_channels=16, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=1000)
    ours = RegionProposalNetwork(config).eval()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in ours.head.parameters():  # spread scores and deltas: a freshly initialised head's are nearly flat
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = TvRPN(TvAnchorGenerator(tuple((s,) for s in SIZES), (tuple(RATIOS),) * 5), TvRPNHead(16, 3),
                   0.7, 0.3, 256, 0.5, dict(training=2000, testing=50), dict(training=2000, testing=1000), 0.7).eval()
    theirs.head.load_state_dict(ours.head.state_dict(), strict=True)
    features = OrderedDict((str(i), torch.randn(2, 16, 32 // 2**i, 48 // 2**i, generator=g)) for i in range(4))
    features["pool"] = torch.randn(2, 16, 1, 2, generator=g)
    images, sizes = torch.zeros(2, 3, 128, 192), [(128, 190), (120, 192)]
    with torch.no_grad():
        got, losses = ours(ImageBatch(images, sizes, sizes), features)
        want, _ = theirs(ImageList(images, sizes), features)
    assert losses == {}
    assert all(len(b) > 0 and torch.equal(a, b) for a, b in zip(got, want))


def test_box_min_size_removes_small_detections():
    from segment.roi_heads import RoIHeads

    torch.manual_seed(0)
    heads = RoIHeads(SegmenterConfig(fpn_channels=32, representation_size=32, mask_head_channels=32, num_classes=2,
                                     box_min_size=30.0, score_threshold=0.0)).eval()
    g = torch.Generator().manual_seed(10)
    features = {str(i): torch.randn(1, 32, 32 // 2**i, 32 // 2**i, generator=g) for i in range(4)}
    proposals = [torch.tensor([[10.0, 10.0, 20.0, 20.0], [40.0, 30.0, 52.0, 90.0], [5.0, 5.0, 100.0, 100.0],
                               [60.0, 50.0, 110.0, 95.0]])]

    def sides():
        with torch.no_grad():
            boxes = heads(features, proposals, [(128, 128)])[0][0]
        return torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])

    kept = sides()
    assert len(kept) > 0 and (kept >= 30.0).all()
    heads.box_min_size = 1e-2  # torchvision's default: the small proposals' detections are candidates after all
    assert (sides() < 30.0).any()


def test_mask_branch_initialisation_matches_torchvision():
    """Weights kaiming normal with fan_out, as torchvision's MaskRCNNHeads and MaskRCNNPredictor: each weight's
    spread against theirs (other seeds: a statistical comparison, under 2 % apart here). fan_in would make the
    logits layer's 0.089 instead of 0.149 (91 classes from 256 channels). Biases zero (torchvision leaves its
    predictor's at nn.Conv2d's default)."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    from segment.mask_head import MaskHead, MaskPredictor

    torch.manual_seed(0)
    ours = dict(MaskHead(64, 256).named_parameters(prefix="head"))
    ours.update(MaskPredictor(256, 256, 91).named_parameters(prefix="predictor"))
    torch.manual_seed(1)
    theirs = dict(MaskRCNNHeads(64, [256] * 4, 1).named_parameters(prefix="head"))
    theirs.update(MaskRCNNPredictor(256, 256, 91).named_parameters(prefix="predictor"))
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}
    for name, param in ours.items():
        if name.endswith("bias"):
            assert not param.any(), name
        else:
            assert abs(param.std().item() / theirs[name].std().item() - 1) < 0.05, name


def test_predict_keeps_the_models_mode():
    from segment.model import build_model

    model = build_model(dict(backbone="resnet18", norm="bn", trainable_layers=3, fpn_channels=32,
                             representation_size=32, mask_head_channels=32, num_classes=2, min_size=64, max_size=96))
    frame = torch.zeros(3, 48, 64, dtype=torch.uint8)
    for mode in (True, False):
        model.train(mode)
        # train() leaves the frozen stages' BN in eval: every module's own flag must come back as it was
        before = {name: module.training for name, module in model.named_modules()}
        model.predict(frame)
        assert {name: module.training for name, module in model.named_modules()} == before


def test_predict_refuses_frames_without_three_channels():
    from segment.model import build_model

    model = build_model(dict(backbone="resnet18", norm="gn", fpn_channels=32, representation_size=32,
                             mask_head_channels=32, num_classes=2, min_size=64, max_size=96)).eval()
    for shape in [(1, 48, 64, 3), (1, 4, 48, 64)]:  # channels last, and RGBA
        with pytest.raises(ValueError, match=rf"predict expects \(B, 3, H, W\) frames, got shape "
                                             rf"\({', '.join(map(str, shape))}\)"):
            model.predict(torch.zeros(shape, dtype=torch.uint8))


def test_anchor_cache_stays_bounded_over_many_frame_sizes():
    generator = AnchorGenerator(SIZES, RATIOS)
    for k in range(40):
        side = 64 + 32 * k
        grids = [(side // 2**i, side // 2**i) for i in range(2, 7)]
        anchors, _ = generator((side, side), grids, torch.float32, "cpu")
    # emptied once it holds more than 16 sets (anchors.py): a long run over many frame sizes must not keep them all
    assert len(generator._cache) <= 17
    assert torch.equal(anchors, AnchorGenerator(SIZES, RATIOS)((side, side), grids, torch.float32, "cpu")[0])


def test_every_backbone_body_has_torchvisions_names_and_shapes():
    """A torchvision checkpoint loads by name and shape: a wrong block count (resnet101's 23 in layer3) or ResNeXt
    group width would show only on a real file. Built on the meta device: no memory, no initialisation cost."""
    from torchvision import models
    from torchvision.ops import FrozenBatchNorm2d

    from segment.backbone import ARCHS, ResNetBody

    with torch.device("meta"):
        for arch in ARCHS:
            ours = {k: v.shape for k, v in ResNetBody(arch, "frozen_bn").state_dict().items()}
            theirs = getattr(models, arch)(norm_layer=FrozenBatchNorm2d).state_dict()
            assert ours == {k: v.shape for k, v in theirs.items() if not k.startswith("fc.")}, arch


@pytest.mark.parametrize("trainable_layers", range(6))
def test_frozen_parameters_follow_torchvision_trainable_layers(trainable_layers):
    """The stem's BN trains only with all 5 stages, as torchvision's resnet_fpn_backbone: norm=bn shows it (frozen
    BN has no parameters at all)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from segment.backbone import BackboneWithFPN

    with torch.device("meta"):
        ours = BackboneWithFPN(SegmenterConfig(backbone="resnet18", norm="bn", trainable_layers=trainable_layers))
        theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d,
                                     trainable_layers=trainable_layers)
    frozen = {n for n, p in ours.body.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in theirs.body.named_parameters() if not p.requires_grad}
    assert ("bn1.weight" in frozen) == (trainable_layers < 5)


def test_fpn_initialisation_matches_torchvision():
    """kaiming_uniform with a=1, as torchvision's FeaturePyramidNetwork: a=0 would make every weight's spread 1.41
    times theirs. Other seeds: a statistical comparison, each under 2 % apart here. Biases zero like theirs."""
    channels = [64, 128, 256, 512]
    torch.manual_seed(0)
    ours = dict(FeaturePyramid(channels, 256).named_parameters())
    torch.manual_seed(1)
    theirs = dict(FeaturePyramidNetwork(channels, 256, extra_blocks=LastLevelMaxPool()).named_parameters())
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}
    for name, param in ours.items():
        if name.endswith("bias"):
            assert not param.any() and not theirs[name].any(), name
        else:
            assert abs(param.std().item() / theirs[name].std().item() - 1) < 0.05, name


@pytest.mark.parametrize("index", [0, 1, -1, -2])
def test_instances_integer_index_takes_one_row_like_a_list(index):
    labels = [3, 7]
    inst = Instances((4, 4), boxes=torch.tensor([[0., 0, 1, 1], [1, 1, 3, 3]]), scores=torch.tensor([.9, .8]),
                     labels=torch.tensor(labels), masks=torch.rand(2, 4, 4))
    one = inst[index]
    assert len(one) == 1 and one.labels.tolist() == [labels[index]]
    assert torch.equal(one.masks, inst.masks[index][None]) and torch.equal(one.boxes, inst.boxes[index][None])
    roi = Instances((4, 4), inst.boxes, inst.scores, inst.labels, RoIMasks.from_probs(torch.rand(2, 28, 28),
                                                                                      inst.boxes, (4, 4)))
    assert torch.equal(roi[index].masks.grids, roi.masks.grids[index][None])


@pytest.mark.parametrize("index", [2, -3])
def test_instances_integer_index_past_the_end_is_an_index_error_like_a_list(index):
    """It was an empty Instances (a slice past the end), which reads as a frame without detections."""
    inst = Instances((4, 4), boxes=torch.tensor([[0., 0, 1, 1], [1, 1, 3, 3]]), scores=torch.tensor([.9, .8]),
                     labels=torch.tensor([3, 7]))
    with pytest.raises(IndexError, match=f"Instances index {index} out of range for 2 rows"):
        inst[index]
    with pytest.raises(IndexError, match=f"RoIMasks index {index} out of range for 2 rows"):
        RoIMasks.from_probs(torch.rand(2, 28, 28), inst.boxes, (4, 4))[index]


def test_roi_masks_cat_of_nothing_says_so():
    """It said "different image sizes []"."""
    with pytest.raises(ValueError, match=r"RoIMasks.cat: nothing to join \(an empty list has no image size\)"):
        RoIMasks.cat([])


def test_instances_cast_keeps_labels_integer_and_rows_aligned():
    inst = Instances((4, 4), boxes=torch.tensor([[0., 0, 1, 1]]), scores=torch.tensor([.9]),
                     labels=torch.tensor([300]), masks=torch.rand(1, 4, 4))
    half = inst.to(torch.float16)
    # labels index class names: a float16 label of a large class would round (2049 -> 2048) or stop being an index
    assert half.labels.dtype == torch.int64 and half.labels.tolist() == [300]
    assert half.boxes.dtype == half.scores.dtype == half.masks.dtype == torch.float16
    with pytest.raises(ValueError, match="scores has 3 rows, boxes has 2"):
        Instances((4, 4), boxes=torch.zeros(2, 4), scores=torch.zeros(3), labels=torch.zeros(2, dtype=torch.long))


def test_fold_keeps_a_convolutions_own_bias():
    from torchvision.ops import FrozenBatchNorm2d

    from segment.fold import fold_frozen_batchnorm

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=True), FrozenBatchNorm2d(8))
    with torch.no_grad():
        block[0].bias.normal_(0, 2)
    bn = block[1]
    bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.1, 3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = block(x)
        assert fold_frozen_batchnorm(block) == 1
        torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)
