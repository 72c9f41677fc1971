"""Know your data on real photos: the CIFAR-10 JPEG copy (../shared/data) through the real stages with the
committed params (data set switched to the image folder): cross-split duplicates found, the top label
suspects (a committed picture), ECE before and after temperature scaling, and the seconds each part adds.

    .venv/bin/python bench/know_your_data.py

Prints a table and writes bench/results/know-your-data.json, plus the pictures
bench/results/know-your-data-label-suspects.png and bench/results/know-your-data-duplicates.png."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

from common import (
    RESULTS_DIR,
    SHARED_CIFAR_IMAGES,
    extract_shared_cifar,
    machine,
    run_timed,
    scratch_project,
    write_results,
)

WORK = Path("/tmp/imgcls-bench-know")
STAGES = ("download", "preprocess", "duplicates", "label_errors", "train", "evaluate")
CAM_LINE = re.compile(r"activation maps \(([^)]+)\) of (\d+) test images.* in ([0-9.]+) s")
CALIBRATION_LINE = re.compile(r"calibration: temperature ([0-9.]+) fitted on (\d+) validation images in ([0-9.]+) s")


def run_stage(project: Path, stage: str) -> dict:
    log = project / f"{stage}.log"
    result = run_timed([sys.executable, f"stages/{stage}.py"], project, log)
    if result["returncode"]:
        raise SystemExit(f"{stage} failed:\n{log.read_text()[-3000:]}")
    print(f"  {stage:<13} {result['seconds']:8.1f} s  peak {result['peak_rss_mib']:,.0f} MiB", flush=True)
    return {"seconds": round(result["seconds"], 2), "peak_rss_mib": round(result["peak_rss_mib"])}


def top_suspects(project: Path, count: int = 20) -> list[dict]:
    with open(project / "metrics" / "label_suspects.csv", newline="") as f:
        return [row for _, row in zip(range(count), csv.DictReader(f), strict=False)]


def main() -> int:
    if not SHARED_CIFAR_IMAGES.is_file():
        print(f"skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        return 0
    cifar = extract_shared_cifar(Path("/tmp/imgcls-bench/extracted"))
    project = scratch_project(
        WORK / "project",
        {"data": {"dataset": "imagefolder", "source": str(cifar), "image_size": 32, "channels": 3}},
    )
    print(f"CIFAR-10 (JPEG copy) through {', '.join(STAGES)} with the committed params", flush=True)
    stages = {stage: run_stage(project, stage) for stage in STAGES}
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    labels = json.loads((project / "metrics" / "label_errors.json").read_text())
    evaluate_log = (project / "evaluate.log").read_text()
    cam = CAM_LINE.search(evaluate_log)
    calibration_fit = CALIBRATION_LINE.search((project / "train.log").read_text())
    duplicates = evaluation["duplicates"]
    results = {
        "machine": machine(),
        "data": "CIFAR-10 (JPEG copy): 45,000 train / 5,000 val / 10,000 test, 32 px",
        "stages": stages,
        "duplicates": {
            **duplicates,
            "max_distance": json.loads((project / "data" / "audit" / "duplicates.json").read_text())["max_distance"],
            "test_accuracy": evaluation["test"]["accuracy"],
            "test_without_leaks": evaluation["test_without_leaks"],
            "seconds": stages["duplicates"]["seconds"],
        },
        "label_errors": {**labels, "top20": top_suspects(project)},
        "calibration": {
            **evaluation["calibration"],
            "fitted_on_val_images": int(calibration_fit.group(2)) if calibration_fit else None,
            "fit_seconds": float(calibration_fit.group(3)) if calibration_fit else None,
        },
        "activation_maps": {
            "method": cam.group(1) if cam else None,
            "images": int(cam.group(2)) if cam else None,
            "seconds": float(cam.group(3)) if cam else None,
        },
    }
    for name in ("label_suspects", "duplicates", "activation_maps", "reliability"):
        shutil.copy(project / "metrics" / f"{name}.png", RESULTS_DIR / f"know-your-data-{name.replace('_', '-')}.png")
    path = write_results("know-your-data", results)
    c, d = results["calibration"], results["duplicates"]
    print(f"\nCPU: {results['machine']['cpu']} ({results['machine']['cores']} cores)")
    print("| part | result | seconds |")
    print("|---|---|---:|")
    print(
        f"| duplicates | {d['cross_split_exact']} exact + {d['cross_split_near']} near pairs across splits, "
        f"{d['leaked_test_images']} test images leaked; accuracy {d['test_accuracy']:.4f} -> "
        f"{d['test_without_leaks']['accuracy']:.4f} without them | {d['seconds']:.1f} |"
    )
    print(
        f"| label errors | {labels['suspects']} suspects ({labels['folds']} folds x {labels['epochs']} epochs each, "
        f"out-of-sample accuracy {labels['out_of_sample_accuracy']:.4f}) | {labels['seconds']:.1f} |"
    )
    print(
        f"| calibration | temperature {c['temperature']:.3f}: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} "
        f"| {c['fit_seconds']} (in train) |"
    )
    a = results["activation_maps"]
    print(f"| activation maps | {a['method']} on {a['images']} images | {a['seconds']} |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
