"""`precision: auto`: bf16 where the device has bf16 arithmetic units, fp32 where bf16 would only be emulated.

On a GPU bf16 is the fast path. On a CPU with AMX or AVX512-BF16 too (docs/benchmarks.md: bf16 convs 2.5-6.5x
faster than fp32 on an AMX CPU); on other CPUs oneDNN would only emulate bf16, so auto keeps fp32 there.
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 convolutions and matmuls in hardware."""
    if device.type == "cuda":
        # compute capability 8 (Ampere) on; torch.cuda.is_bf16_supported answers for the current GPU, not `device`
        return bool(torch.version.hip) or (torch.cuda.is_available()
                                           and torch.cuda.get_device_properties(device).major >= 8)
    if device.type == "cpu":
        # private but long-standing (torch >= 2.1): the CPU feature bits oneDNN chooses its bf16 kernels by
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a device with native bf16, else 'fp32'; any other setting is returned as it is."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"
