"""Device, precision and seed: each decided in one place, and said once."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from .errors import RuntimeChoiceError
from .host import cgroup_available_memory, cpu_info, host_available_memory  # noqa: F401 (tests read the cgroup here)


def seed_everything(seed: int) -> torch.Generator:
    """Seed random, NumPy and torch; returns the generator that orders batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def set_threads(threads: int) -> int:
    """torch's intra-op threads: ``threads``, or one per core for 0. Parallel jobs (``dvc queue start -j 2``)
    each take all cores otherwise, and two jobs on two cores then run slower than one after the other."""
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_memory(device: torch.device) -> int:
    """Bytes free for data on ``device``: the GPU's free memory, or the host's (imgcls.host)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_memory()


def resolve_device(requested: str) -> torch.device:
    """``auto`` takes the GPU when one is present; asking for CUDA without one is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeChoiceError(
                f"base.device = {requested!r} but no CUDA GPU is visible; set base.device: auto or cpu"
            )
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise RuntimeChoiceError(
                f"base.device = {requested!r} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return torch.device(requested)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix math runs natively (AVX512-BF16 or AMX on CPU, Ampere+ on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.backends.cpu
    capability = cpu.get_cpu_capability() if hasattr(cpu, "get_cpu_capability") else ""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return capability.startswith("AVX512") and any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` takes bf16 only where it is native (else fp32, which emulated bf16 would only slow down)."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {cpu_model()})"


def cpu_model() -> str:
    """This machine's CPU model name, as runs record it (imgcls.host reads /proc/cpuinfo)."""
    return cpu_info().model
