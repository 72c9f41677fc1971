"""How far a run is from what this CPU can do: floating-point operations of a training step (counted by
torch's FlopCounterMode: convolutions and matrix products, forward + backward), the CPU's peak measured by a
large matrix product, and its nominal peak from cores x clock x FLOPs per cycle of its vector units.

bench/run.py (every row of `make bench`) and bench/profile_step.py (one step in detail) share these.
"""

from __future__ import annotations

import os
import time

import torch

from imgcls.host import cpu_info

CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
PEAK_SIZE = 2048  # a square matrix product this large keeps every core's vector units busy


def cpu_features() -> list[str]:
    flags = cpu_info().flags
    return [f for f in CPU_FEATURES if f in flags]


def nominal_peak() -> dict:
    """cores x clock x FLOPs per cycle per core, for fp32 and bf16, with the assumptions that give them.

    FLOPs per cycle per core (two vector FMA pipes, an FMA = 2 FLOPs):
    - AMD with AVX-512 (Zen 4/5: 512-bit instructions on 256-bit datapaths): fp32 2 x 8 x 2 = 32; bf16 through
      VDPBF16PS (two bf16 products summed into each fp32 lane) = 64.
    - Intel with AVX-512: fp32 2 x 16 x 2 = 64; with AMX, bf16 through the tile unit: 1024 (16 x 32 x 2 per cycle).
    - AVX2 + FMA only: fp32 2 x 8 x 2 = 32; no native bf16 (bf16 is computed in fp32).
    The clock is /proc/cpuinfo's "cpu MHz" (a virtual machine reports its base clock; cores may boost above it,
    which is why a measured matrix product can exceed this nominal figure)."""
    cpu = cpu_info()
    flags, vendor, mhz = cpu.flags, cpu.vendor, cpu.mhz
    cores = os.cpu_count() or 1
    amd = "AMD" in vendor
    if "avx512f" in flags:
        fp32 = 32 if amd else 64
    elif "fma" in flags:
        fp32 = 32
    else:
        fp32 = 8
    if "amx_bf16" in flags:
        bf16, unit = 1024, "AMX tiles"
    elif "avx512_bf16" in flags:
        bf16, unit = 2 * fp32, "AVX512-BF16 (VDPBF16PS)"
    else:
        bf16, unit = None, "none (bf16 runs in fp32)"
    hz = mhz * 1e6
    return {
        "cores": cores,
        "mhz": mhz,
        "vendor": vendor,
        "flops_per_cycle_per_core": {"fp32": fp32, "bf16": bf16},
        "bf16_unit": unit,
        "fp32": cores * hz * fp32,
        "bf16": cores * hz * bf16 if bf16 else None,
    }


def matmul_peak(precision: str, seconds: float = 2.0) -> float:
    """FLOP/s of a large square matrix product in ``precision`` (bf16 tensors or fp32) on torch's threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        calls += 1
    return 2 * PEAK_SIZE**3 * calls / (time.perf_counter() - started)


def step_flops(model, batch, labels, loss_fn, device, precision) -> int:
    """Floating-point operations of one training step (forward + backward), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from imgcls.train.loop import forward_loss

    counter = FlopCounterMode(display=False)
    with counter:
        _, loss = forward_loss(model, batch, labels, loss_fn, device, precision)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def training_flops_per_image(
    architecture: str, *, width: int, image_shape: list[int], num_classes: int, precision: str
) -> float:
    """FLOPs (forward + backward) one training image costs in ``architecture`` at ``width``."""
    from imgcls.model.registry import build_model, normalized_channels

    channels, size = image_shape[0], image_shape[1]
    norm = normalized_channels(architecture, channels)
    model = build_model(
        architecture,
        in_channels=channels,
        num_classes=num_classes,
        image_size=size,
        mean=[0.5] * norm,
        std=[0.25] * norm,
        width=width,
    )
    model.train()
    batch = 4
    images = torch.rand(batch, channels, size, size)
    labels = torch.arange(batch) % num_classes
    return step_flops(model, images, labels, torch.nn.CrossEntropyLoss(), torch.device("cpu"), precision) / batch
