"""The Mask R-CNN paper's optimisation recipe: SGD with momentum, linear warm-up, step decay.

He et al. (2017) train with lr 0.02 for 16 images per batch, momentum 0.9, weight decay 1e-4, and divide the
learning rate by 10 at fixed iterations; Goyal et al. (2017) give the linear scaling rule used here for other
batch sizes and the linear warm-up that keeps large learning rates stable at the start.
"""
from __future__ import annotations

from bisect import bisect_right

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from segment.errors import ConfigError

REFERENCE_BATCH = 16  # images per iteration the paper's base learning rate is quoted for
FUSED_DEVICES = ("cuda", "cpu")  # where torch has a fused SGD kernel
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def scaled_lr(base_lr: float, images_per_iteration: int) -> float:
    """Linear scaling rule: the learning rate grows with the images per iteration summed over all processes."""
    return base_lr * images_per_iteration / REFERENCE_BATCH


def build_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    norm_weight_decay: float | None = None, bias_weight_decay: float | None = None, *, grad_scaled: bool = False,
) -> torch.optim.SGD:
    """SGD over the trainable parameters (frozen stages are left out).

    The paper decays every weight alike (the default, None); `norm_weight_decay` / `bias_weight_decay` give
    normalisation parameters / biases their own decay (often 0), a common later refinement. `grad_scaled`: stepped
    by a GradScaler (amp=fp16), which skips the steps whose gradients overflowed.
    """
    groups: dict[str, list[nn.Parameter]] = {"default": [], "norm": [], "bias": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, _NORM_TYPES) and norm_weight_decay is not None:
                groups["norm"].append(param)
            elif name == "bias" and bias_weight_decay is not None:
                groups["bias"].append(param)
            else:
                groups["default"].append(param)
    if not seen:
        raise ConfigError("the model has no trainable parameters (check segment.trainable_layers)")
    decay = {"default": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    param_groups = [{"params": params, "weight_decay": decay[key]} for key, params in groups.items() if params]
    # fused: one kernel for the whole update instead of foreach's several per parameter group; the same update up to
    # float rounding (on a CPU: 1.5e-8 apart after six steps of the demo model) and on a CPU half the time (R50
    # update 37 -> 17 ms on 2 cores). Not under a GradScaler: torch's fused SGD makes its momentum buffers with
    # empty_like at its first step and keeps them, uninitialised, when the scaler skips that step (fp16's first steps
    # often overflow), and the next step adds that garbage to the weights (non-finite ones within two steps)
    fused = (not grad_scaled and all(p.device.type in FUSED_DEVICES for group in param_groups
                                     for p in group["params"])) or None
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)


class WarmupMultiStepLR(LRScheduler):
    """lr(it) = base_lr * warmup(it) * gamma ** (number of milestones <= it), stepped once per iteration.

    warmup rises linearly from `warmup_factor` at iteration 0 to 1 at `warmup_iters` (Detectron's schedule).
    Closed form in the iteration, so a resumed run gets exactly the same learning rates; its state is plain
    numbers, so it round-trips through `torch.load(weights_only=True)`.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.1,
        warmup_iters: int = 0, warmup_factor: float = 1.0 / 1000, last_epoch: int = -1,
    ) -> None:
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise ConfigError(f"schedule.steps must be increasing, got {milestones}")
        if warmup_iters < 0 or not 0 < warmup_factor <= 1:
            raise ConfigError(f"schedule.warmup_iters must be >= 0 and warmup_factor in (0, 1], got {warmup_iters}, {warmup_factor}")
        self.milestones = milestones
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        decay = self.gamma ** bisect_right(self.milestones, iteration)
        if iteration >= self.warmup_iters:
            return decay
        alpha = iteration / self.warmup_iters
        return decay * (self.warmup_factor * (1 - alpha) + alpha)

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
