"""Benchmark: the photo augmentations' cost on the CPU, in images/s through iterate_batches (the code training
runs), against today's path (flip + translate 2 + float conversion).

    .venv/bin/python bench/augment.py [--repeats 5] [--batches 4]

Each row is today's path plus one op (or all of them), on uint8 batches of 3-channel images: 256 at 32 px,
256 at 64 px, 64 at 224 px; best of ``--repeats`` passes over ``--batches`` batches, the configs taking turns;
torch threads = the machine's cores. Writes bench/results/augment.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch
from common import machine, write_results

from imgcls.train.batches import Augmentation, iterate_batches

SIZES = ((32, 256), (64, 256), (224, 64))  # (image side in px, batch size)
TODAY = Augmentation(flip=True, translate=2)
CONFIGS = {
    "today: flip + translate 2": TODAY,
    "+ random resized crop 0.35": replace(TODAY, crop_scale=0.35),
    "+ colour jitter 0.4": replace(TODAY, color_jitter=0.4),
    "+ trivialaugment (per image)": replace(TODAY, policy="trivialaugment"),
    "+ trivialaugment (groups of 8)": replace(TODAY, policy="trivialaugment", policy_group_size=8),
    "+ randaugment (per image)": replace(TODAY, policy="randaugment"),
    "+ mixup 0.8 / cutmix 1.0": replace(TODAY, mixup=0.8, cutmix=1.0, num_classes=10),
    "all (trivialaugment per image)": replace(
        TODAY,
        crop_scale=0.35,
        color_jitter=0.4,
        policy="trivialaugment",
        mixup=0.8,
        cutmix=1.0,
        num_classes=10,
    ),
}


def seconds_per_pass(augmentation: Augmentation, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """One pass of iterate_batches over ``images`` in batches of ``batch_size``, in seconds."""
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for batch, _targets in iterate_batches(images, labels, batch_size, generator=generator, augmentation=augmentation):
        assert batch.dtype == torch.float32
    return time.perf_counter() - started


def rates_for_size(side: int, batch_size: int, batches: int, repeats: int) -> dict[str, float]:
    """images/s of every config at one size: the best of ``repeats`` passes over ``batches`` batches of random
    uint8 images. The configs take turns within each repeat, so a busy spell of the machine slows them alike;
    a first round warms up (imports, allocator, first-call dispatch) untimed."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size * batches, 3, side, side), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    best = dict.fromkeys(CONFIGS, float("inf"))
    for repeat in range(repeats + 1):
        for name, augmentation in CONFIGS.items():
            seconds = seconds_per_pass(augmentation, images, labels, batch_size)
            if repeat:
                best[name] = min(best[name], seconds)
    return {name: len(images) / seconds for name, seconds in best.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = []
    for side, batch_size in SIZES:
        rates = rates_for_size(side, batch_size, args.batches, args.repeats)
        today = rates[next(iter(CONFIGS))]
        for name, rate in rates.items():
            row = {"images_px": side, "batch_size": batch_size, "path": name, "images_per_second": rate}
            rows.append(row | {"ratio_to_today": rate / today})
    print(f"{'px':>4}{'batch':>6}  {'path':<34}{'images/s':>10}{'x today':>9}")
    for row in rows:
        print(
            f"{row['images_px']:>4}{row['batch_size']:>6}  {row['path']:<34}"
            f"{row['images_per_second']:>10,.0f}{row['ratio_to_today']:>9.3f}"
        )
    path = write_results(
        "augment",
        {
            "machine": machine(),
            "command": "bench/augment.py " + " ".join(sys.argv[1:]),
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "batches_per_repeat": args.batches,
            "channels": 3,
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
