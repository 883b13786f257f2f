"""A CPU stand-in for "this tensor is on a GPU", which counts where the host would wait for the GPU.

CI has no GPU, and `helpers_cuda.gpu_waits` counts real waits only under `pytest --device cuda`. `as_on_gpu(t)`
returns `t` as a `SimulatedGpuTensor`: its operations compute on the CPU and keep the type, and every operation
that on a CUDA tensor makes the host wait for the GPU is recorded: a read to the host (`.cpu()`, `.item()`,
`.tolist()`, `bool()`...), an output whose shape depends on the data (`nonzero`, a boolean index, one-argument
`where`), and a host value copied into it from pageable memory (an index given as a Python list or host tensor, a
Python number or host tensor set into it). A model of torch's behaviour, not torch's own count: it errs towards
counting (a `.cpu()` already on the host counts).

Its `.device` is `SIMULATED_GPU` ("cpu:0", a CPU device torch accepts everywhere), so that the code's own moves tell
the GPU from the host: `.to(x.device)` stays on the GPU (no wait), `.to("cpu")` is a read. Inside `counted_waits`,
`gpu.transfer.to_device` to `SIMULATED_GPU` (and so `row_index` and `to_device_all`) gives a SimulatedGpuTensor
without a wait: pinned and non_blocking, the host does not wait for it. Tensors the code makes with
`device=x.device`, or moves there with a plain tensor's `.to(x.device)` (on a GPU a copy from pageable memory, a
wait), are plain CPU tensors, unseen until they meet a SimulatedGpuTensor (as an index into one they count); checks
of `is_cuda` or `device.type` still take the CPU's paths. `on_gpu(record)` puts a record's device tensors on it.
"""
from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

import gpu.transfer
from pipeline.record import FrameRecord
from segment.roi_masks import TENSORS, RoIMasks
from segment.structures import Instances

ROOT = Path(__file__).resolve().parent.parent
SIMULATED_GPU = torch.device("cpu", 0)  # a SimulatedGpuTensor's device
_DEVICE = torch.Tensor.device.__get__
_TO_DEVICE = gpu.transfer.to_device

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive"}
HOST_RESULTS = {"item", "tolist", "cpu", "numpy"}


class SimulatedGpuTensor(torch.Tensor):
    waits: list[tuple[str, str]] = []  # (what waited, the project's line that asked), in order

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE:
            return SIMULATED_GPU
        name = getattr(func, "__name__", str(func))
        on_gpu = any(isinstance(a, cls) for a in _flat([*args, *kwargs.values()]))
        if on_gpu:
            cls.waits += [(what, _caller()) for what in _waits(name, args, kwargs)]
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if not on_gpu:
            return out
        if name in HOST_RESULTS or (name == "to" and _to_host(args, kwargs)):
            # the host's copy: a plain tensor, also where the CPU computation returned the input itself
            return _as(out, torch.Tensor)
        return _as(out, cls)


def as_on_gpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.as_subclass(SimulatedGpuTensor)


def instances_on_gpu(instances: Instances | None) -> Instances | None:
    """`instances` with every tensor on the simulated GPU, a RoIMasks' too (its windows unread, as the model gives
    them)."""
    if instances is None:
        return None
    masks = instances.masks
    if isinstance(masks, RoIMasks):
        masks = replace(masks, **{name: as_on_gpu(getattr(masks, name)) for name in TENSORS}, _windows=None)
    else:
        masks = as_on_gpu(masks)
    return replace(instances, boxes=as_on_gpu(instances.boxes), scores=as_on_gpu(instances.scores),
                   labels=as_on_gpu(instances.labels), masks=masks)


def on_gpu(record: FrameRecord) -> FrameRecord:
    """`record` (changed in place) with the tensors a render holds on its device on the simulated GPU: the image,
    the instances, the stylized crops, the background and the output. Track ids and `keep` stay: the stages make
    them on the host, where their readers want them (pipeline/record.py)."""
    record.image = as_on_gpu(record.image)
    record.instances = instances_on_gpu(record.instances)
    record.stylized = [replace(region, pixels=as_on_gpu(region.pixels)) for region in record.stylized]
    record.background, record.output = as_on_gpu(record.background), as_on_gpu(record.output)
    return record


@contextmanager
def counted_waits() -> Iterator[list[tuple[str, str]]]:
    """The waits of `SimulatedGpuTensor` operations in the block, in order: (what, file:line of the project's code
    that asked). In the block `gpu.transfer.to_device` copies to the simulated GPU, wherever it was imported."""
    SimulatedGpuTensor.waits = []
    patched = [module for module in list(sys.modules.values()) if getattr(module, "to_device", None) is _TO_DEVICE]
    for module in patched:
        module.to_device = _to_simulated_gpu
    try:
        yield SimulatedGpuTensor.waits
    finally:
        SimulatedGpuTensor.waits = []
        for module in patched:
            module.to_device = _TO_DEVICE


def _to_simulated_gpu(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`gpu.transfer.to_device`: a host tensor copied to the simulated GPU from pinned memory, no wait."""
    if torch.device(device) == SIMULATED_GPU and not isinstance(tensor, SimulatedGpuTensor):
        return as_on_gpu(tensor.clone())
    return _TO_DEVICE(tensor, device)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(ROOT) and path.parent.name != "tests" and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "?"


def _waits(name: str, args: tuple, kwargs: dict) -> list[str]:
    if name in READS or (name == "where" and len(args) == 1 and not kwargs):
        return [name]
    if name == "to" and _to_host(args, kwargs):
        return ["to(cpu)"]
    if name in ("__getitem__", "__setitem__"):
        parts = args[1] if isinstance(args[1], tuple) else (args[1],)
        found = [f"{name} with a {_kind(part)}" for part in parts if _kind(part)]
        if name == "__setitem__" and (isinstance(args[2], (int, float, bool)) or _is_host_tensor(args[2])):
            found.append("__setitem__ of a host value")
        return found
    return []


def _kind(index) -> str | None:
    if isinstance(index, list):
        return "Python list index"
    if isinstance(index, SimulatedGpuTensor) and index.dtype == torch.bool:
        return "boolean index"
    if _is_host_tensor(index) and index.dim() > 0:
        return "host tensor index"
    return None


def _is_host_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, SimulatedGpuTensor)


def _to_host(args: tuple, kwargs: dict) -> bool:
    """A `.to` whose target is the host: "cpu", not the simulated GPU's "cpu:0"."""
    targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
    return bool(targets) and torch.device(targets[0]) == torch.device("cpu")


def _flat(values):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


def _as(out, cls):
    if isinstance(out, torch.Tensor):
        return out if type(out) is cls else out.as_subclass(cls)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # torch.return_types (max, sort, ...)
        return type(out)(tuple(_as(o, cls) for o in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_as(o, cls) for o in out)
    return out
