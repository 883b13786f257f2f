"""Training throughput: our engine's step (segment.engine.Trainer.train_step on our MaskRCNN) against a plain
training loop around torchvision's MaskRCNN of the same architecture and the same starting weights.

    python scripts/bench_train.py --size 128 --batch 2 --iterations 6
    python scripts/bench_train.py --device cuda --size 512 --batch 8 --amp bf16 --iterations 30

Both see the same synthetic batches (segment.data.synthetic scenes); the timed steps alternate between the two
models so machine load hits both alike. Prints a table with the ratio and appends it to docs/benchmarks.md (--output).
The ratio is only given when the two compute the same thing: a first, untimed step of each from the same weights and
the same seed must give the same losses (within LOSS_TOLERANCE); otherwise the script says so and exits 1.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import BatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import segment.roi_heads  # noqa: E402
from segment.config import SegmenterConfig  # noqa: E402
from segment.data.coco import CocoDetection  # noqa: E402
from segment.data.sampler import collate  # noqa: E402
from segment.data.synthetic import CLASS_NAMES, write_coco_split  # noqa: E402
from segment.distributed import DistInfo, pick_device  # noqa: E402
from segment.engine import AMP_DTYPES, TARGET_KEYS, Trainer, TrainSettings  # noqa: E402
from segment.loader import BatchStream  # noqa: E402
from segment.model import build_model  # noqa: E402
from segment.optim import WarmupMultiStepLR, build_optimizer  # noqa: E402
from segment.tv_reference import torchvision_twin  # noqa: E402
from common.arguments import reports_user_errors, torch_device, whole_number, writing_in_place  # noqa: E402
from scripts.bench_report import add_report_options, device_name, markdown_table, publish, worst  # noqa: E402
from scripts.profiling import print_profile  # noqa: E402

# Largest relative difference of a first-step loss between ours and the twin that still counts as the same
# computation: on a CPU in fp32 they came out equal (channels_last or the mask head's padding may move the last
# bits); autocast rounds each side's matmuls to 8 (bf16) or 11 (fp16) bits. Another sampling, loss or layer gives
# tens of percent.
LOSS_TOLERANCE = {"none": 1e-3, "bf16": 5e-2, "fp16": 2e-2}
SEED = 0  # of the agreement step: the RPN's and the box head's samplers draw the same proposals on both sides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=torch_device, default="auto", help="auto | cpu | cuda[:N]")
    # 32: the least the synthetic scenes are drawn at (segment.data.synthetic.write_coco_split)
    p.add_argument("--size", type=whole_number(32), default=128,
                   help="square synthetic images; also the model's min/max size")
    p.add_argument("--batch", type=whole_number(1), default=2)
    p.add_argument("--amp", default="none", choices=["none", *AMP_DTYPES])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--norm", default="gn", choices=["gn", "bn", "frozen_bn"])
    p.add_argument("--fpn-channels", type=whole_number(1), default=128)
    p.add_argument("--representation-size", type=whole_number(1), default=512)
    p.add_argument("--mask-head-channels", type=whole_number(1), default=128)
    p.add_argument("--iterations", type=whole_number(1), default=6, help="timed steps per model")
    p.add_argument("--warmup", type=whole_number(0), default=2)
    p.add_argument("--channels-last", action="store_true", help="our model in channels_last memory layout")
    p.add_argument("--threads", type=whole_number(1), default=None, help="torch CPU threads (default: torch's)")
    add_report_options(p)
    p.add_argument("--mask-batch-bucket", type=whole_number(1), default=None,
                   help="diagnosis: the multiple of RoIs our mask head runs on this device (1: unpadded; default: "
                        "segment.roi_heads.MASK_BATCH_BUCKETS), to measure what the padding saves")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, profile 3 steps of each (host syncs, launches, top operators)")
    return p.parse_args(argv)


def pinned(batch):
    """A collated batch in page-locked memory, as a DataLoader with pin_memory=True hands it over."""
    images, targets = batch
    return [i.pin_memory() for i in images], [{k: t[k].pin_memory() for k in TARGET_KEYS} for t in targets]


def loss_difference(steps, inputs: dict[str, list]) -> float:
    """The largest relative difference between the two models' losses on one step each, from the same weights on
    the first batch with the same seed (an untimed step: the timed ones then start from the weights it left)."""
    losses = {}
    for name, step in steps:
        torch.manual_seed(SEED)
        losses[name] = {key: float(value) for key, value in step(inputs[name][0]).items()}
    ours, theirs = losses["ours"], losses["torchvision"]
    if set(ours) != set(theirs):
        return float("inf")
    return worst(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in ours)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(str(args.device))  # as training picks it: cuda is cuda:0 (the device of local rank 0)
    if args.mask_batch_bucket is not None:
        segment.roi_heads.MASK_BATCH_BUCKETS[device.type] = args.mask_batch_bucket
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    names = ["__background__", *CLASS_NAMES]
    config = SegmenterConfig(
        backbone=args.backbone, norm=args.norm, trainable_layers=5, num_classes=len(names), class_names=names,
        min_size=args.size, max_size=args.size, fpn_channels=args.fpn_channels,
        representation_size=args.representation_size, mask_head_channels=args.mask_head_channels,
        channels_last=args.channels_last,
    )
    torch.manual_seed(0)
    ours = build_model(config).to(device)
    theirs = torchvision_twin(config).to(device)
    theirs.load_state_dict(ours.state_dict())  # same starting point: both see the same losses and gradients

    with tempfile.TemporaryDirectory() as tmp:
        write_coco_split(tmp, "train", max(4, 2 * args.batch), size=args.size, progress=False)
        dataset = CocoDetection(Path(tmp) / "train", Path(tmp) / "annotations" / "instances_train.json")
        batches = [collate([dataset[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(2)]

    lr = 0.02 * args.batch / 16
    optimizer = build_optimizer(ours, lr, grad_scaled=args.amp == "fp16")  # as segment.train builds it
    stream = BatchStream(dataset, partial(BatchSampler, batch_size=args.batch, drop_last=True), collate)
    trainer = Trainer(ours, optimizer, WarmupMultiStepLR(optimizer, []), stream,
                      TrainSettings(Path(tempfile.gettempdir()), 1, amp=args.amp), DistInfo(device=device))
    their_optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                      weight_decay=1e-4)
    dtype = AMP_DTYPES.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def on_device(batch):
        images, targets = batch
        return [i.to(device) for i in images], [{k: t[k].to(device) for k in TARGET_KEYS} for t in targets]

    def our_step(batch) -> dict[str, torch.Tensor]:  # as Trainer.fit runs it: a pinned batch copied without blocking
        values = trainer.train_step(*trainer._to_device(batch))
        return dict(zip(trainer.loss_names, values))

    def their_step(batch) -> dict[str, torch.Tensor]:  # the loop torchvision's detection reference trains with
        images, targets = on_device(batch)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = theirs(images, targets)
            loss = sum(losses.values())
        their_optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(their_optimizer)
        scaler.update()
        return {name: value.detach() for name, value in losses.items()}

    # torchvision's detection reference loads without pin_memory; our train.py pins on a GPU (segment/loader.py)
    inputs = {"torchvision": batches, "ours": [pinned(b) for b in batches] if device.type == "cuda" else batches}
    ours.train()
    theirs.train()
    steps = (("torchvision", their_step), ("ours", our_step))
    difference = loss_difference(steps, inputs)
    tolerance = LOSS_TOLERANCE[args.amp]
    if not difference <= tolerance:  # nan too
        print(f"error: the first step's losses of ours and torchvision's differ by up to {difference:.2e} (relative; "
              f"{tolerance:g} allowed with amp {args.amp}): they do not compute the same thing, no speed ratio",
              file=sys.stderr)
        return 1
    seconds = {"ours": 0.0, "torchvision": 0.0}
    for step in range(args.warmup + args.iterations):
        for name, run in steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run(inputs[name][step % 2])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                seconds[name] += time.perf_counter() - start
    rate = {k: args.iterations * args.batch / v for k, v in seconds.items()}

    header = ["device", "batch", "images", "amp", "first-step losses, max relative Δ", "torchvision img/s",
              "ours img/s", "ours / torchvision"]
    row = [device_name(device), str(args.batch), f"{args.size}x{args.size}", args.amp, f"{difference:.1e}",
           f"{rate['torchvision']:.2f}", f"{rate['ours']:.2f}", f"{rate['ours'] / rate['torchvision']:.2f}x"]
    table = markdown_table(header, [row])
    text = (
        f"## Training step: ours vs torchvision Mask R-CNN loop — {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
        f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}; {args.backbone}/{args.norm} "
        f"FPN {args.fpn_channels}, box head {args.representation_size}, mask head {args.mask_head_channels}, "
        f"ours in {'channels_last' if args.channels_last else 'contiguous'} layout, mask head on multiples of "
        f"{segment.roi_heads.MASK_BATCH_BUCKETS.get(device.type, 1)} RoIs; "
        f"same starting weights and synthetic batches (on a GPU ours get them pinned, as our loader hands them over, "
        f"torchvision's loop pageable, as its detection reference loads them); first an untimed step of each with "
        f"seed {SEED}, whose losses must agree within {tolerance:g}; then {args.iterations} timed steps each "
        f"after {args.warmup} warm-up, alternating; SGD step included; 1/5/15-min load average before: "
        f"{load_before}.\n\n{table}\n"
    )
    with writing_in_place(None if args.no_append else args.output, last=not args.profile):
        publish(text, args.output, append=not args.no_append)
    if args.profile:
        for name, run in steps:
            print_profile(lambda: run(inputs[name][0]), 3, device.type == "cuda", f"{name} training step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
