"""Benchmark: preprocess of the CIFAR-10 JPEG copy (../shared/data) from scratch, then after adding 1% new
images: seconds, images decoded and images reused (the decode cache, data/cache/decoded).

The images sit inside the scratch project (data/images, as `dvc add data/images` leaves them) and are read in
place; 1% of each class folder (the last files by name) is held back for the first run and added for the
second. Each stage runs as the pipeline runs it (stages/<name>.py in a child process).

.venv/bin/python bench/preprocess_incremental.py
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from common import SHARED_CIFAR_IMAGES, extract_shared_cifar, machine, run_timed, scratch_project, write_results

WORK = Path("/tmp/imgcls-bench-incremental")
HELD_BACK = 0.01  # share of each class folder added for the second run
SUMMARY = re.compile(r"preprocess: ([\d,]+) images: ([\d,]+) decoded, ([\d,]+) reused")


def link_images(extracted: Path, images: Path) -> list[tuple[Path, Path]]:
    """Hard-link the extracted images into the project (regular files, no copy); returns the held-back pairs
    (source, destination), the last HELD_BACK of each class folder by name."""
    held = []
    for class_dir in sorted(p for p in extracted.glob("*/*") if p.is_dir()):
        files = sorted(class_dir.iterdir())
        keep = len(files) - round(HELD_BACK * len(files))
        target = images / class_dir.relative_to(extracted)
        target.mkdir(parents=True)
        for index, path in enumerate(files):
            pair = (path, target / path.name)
            held.append(pair) if index >= keep else os.link(*pair)
    return held


def run_stages(project: Path, label: str) -> dict:
    row = {"run": label}
    for stage in ("download", "preprocess"):
        log = project / f"{label}-{stage}.log"
        result = run_timed([sys.executable, f"stages/{stage}.py"], project, log)
        if result["returncode"]:
            print(log.read_text())
            raise SystemExit(1)
        row[f"{stage}_seconds"] = round(result["seconds"], 2)
        row[f"{stage}_peak_rss_mib"] = round(result["peak_rss_mib"])
    images, decoded, reused = (int(g.replace(",", "")) for g in SUMMARY.search(log.read_text()).groups())
    row.update(images=images, decoded=decoded, reused=reused)
    return row


def main() -> int:
    if not SHARED_CIFAR_IMAGES.is_file():
        print(f"skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        return 0
    extracted = extract_shared_cifar(WORK / "extracted")
    params = {"data": {"dataset": "imagefolder", "source": "data/images", "image_size": 32, "channels": 3}}
    project = scratch_project(WORK / "project", params)
    held = link_images(extracted, project / "data" / "images")
    rows = [run_stages(project, "from scratch")]
    for pair in held:
        os.link(*pair)
    rows.append(run_stages(project, f"+{HELD_BACK:.0%} new images"))
    print(f"{'run':<18}{'images':>8}{'decoded':>9}{'reused':>8}{'download_s':>12}{'preprocess_s':>14}")
    for row in rows:
        print(
            f"{row['run']:<18}{row['images']:>8}{row['decoded']:>9}{row['reused']:>8}"
            f"{row['download_seconds']:>12.1f}{row['preprocess_seconds']:>14.1f}"
        )
    path = write_results(
        "preprocess-incremental",
        {
            "machine": machine(),
            "source": f"{SHARED_CIFAR_IMAGES} (all 60,000 images, read in place from the project's data/images)",
            "held_back": HELD_BACK,
            "load_average_1min_after": os.getloadavg()[0],  # the CPU is shared: other work slows both rows
            "runs": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
