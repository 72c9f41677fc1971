"""Benchmark: download + preprocess of the CIFAR-10 JPEG image archive (../shared/data), images/s decoded.

.venv/bin/python bench/data.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import SHARED_CIFAR_IMAGES, machine, run_timed, scratch_project, write_results


def main() -> int:
    if not SHARED_CIFAR_IMAGES.is_file():
        print(f"skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        return 0
    project = scratch_project(
        Path("/tmp/imgcls-bench-data"),
        {"data": {"dataset": "imagefolder", "source": str(SHARED_CIFAR_IMAGES), "image_size": 32, "channels": 3}},
    )
    rows = []
    for stage in ("download", "preprocess"):
        result = run_timed([sys.executable, f"stages/{stage}.py"], project, project / f"{stage}.log")
        if result["returncode"]:
            print((project / f"{stage}.log").read_text())
            return 1
        rows.append({"stage": stage, **result})
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    images = sum(sum(split.values()) for split in meta["counts"].values())
    decode_seconds = rows[1]["seconds"]
    print(f"{'stage':<12}{'wall_s':>8}{'peak_rss_mib':>14}")
    for row in rows:
        print(f"{row['stage']:<12}{row['seconds']:>8.1f}{row['peak_rss_mib']:>14.0f}")
    total = sum(r["seconds"] for r in rows)
    print(f"{'total':<12}{total:>8.1f}   {images} images, {images / decode_seconds:,.0f} images/s through preprocess")
    path = write_results(
        "data",
        {
            "machine": machine(),
            "source": str(SHARED_CIFAR_IMAGES),
            "images": images,
            "stages": rows,
            "total_seconds": total,
            "preprocess_images_per_second": images / decode_seconds,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
