"""Small data: fine-tuning against training from scratch, on an ants/bees-sized task made from CIFAR-10.

Pretrain the default recipe on eight CIFAR-10 classes (all but cat and dog: 40,000 training images), then
train on cat vs dog with 122 training images per class, laid out as people have their own photos:
``train/`` and ``val/`` with no ``test/`` (so ``val/``, 1,000 CIFAR test images per class, is the test split,
data.val_folder: test). Rows: from scratch, fine-tuned from the 8-class checkpoint (train.init_from), and
fine-tuned with the backbone frozen throughout (only the new head trains), each for three seeds (the seed
also picks the validation images held out of the 244). Prints a table and writes bench/results/transfer.json.

    .venv/bin/python bench/transfer.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
from pathlib import Path

from common import SHARED_CIFAR_IMAGES, extract_shared_cifar, machine, scratch_project, set_params, write_results
from run import run_stages

WORK = Path("/tmp/imgcls-bench")
SMALL_CLASSES = ("cat", "dog")
TRAIN_PER_CLASS = 122  # the ants/bees training set: 244 images


def link_folder(target: Path, files: list[Path]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.link(path, target / path.name)


def make_folders(cifar: Path, root: Path) -> tuple[Path, Path]:
    """(pretrain folder: 8 classes, full train/ and test/; small folder: cat/dog, train/ 122 each, val/ 1,000
    each), as hard links into the extracted copy."""
    shutil.rmtree(root, ignore_errors=True)
    pretrain, small = root / "pretrain8", root / "catdog"
    rng = random.Random(0)
    for class_dir in sorted((cifar / "train").iterdir()):
        name = class_dir.name
        train_files, test_files = sorted(class_dir.iterdir()), sorted((cifar / "test" / name).iterdir())
        if name in SMALL_CLASSES:
            link_folder(small / "train" / name, rng.sample(train_files, TRAIN_PER_CLASS))
            link_folder(small / "val" / name, test_files)
        else:
            link_folder(pretrain / "train" / name, train_files)
            link_folder(pretrain / "test" / name, test_files)
    return pretrain, small


def results(project: Path) -> dict:
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    train = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    test = evaluation["test"]
    return {
        "test_accuracy": test["accuracy"],
        "ci95": [test["ci95_low"], test["ci95_high"]],
        "test_images": test["images"],
        "epochs": train["epochs"],
        "batch_size": train["batch_size"],
        "steps": train["steps"],
        "train_seconds": train["train_seconds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    if not SHARED_CIFAR_IMAGES.is_file():
        print(f"skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        return 0
    cifar = extract_shared_cifar(WORK / "cifar10-images")
    pretrain_dir, small_dir = make_folders(cifar, WORK / "transfer-data")

    # Pretrain: the default recipe on the eight other classes (32 pixels, as the CIFAR images are).
    data = {"dataset": "imagefolder", "image_size": 32, "channels": 3}
    project = scratch_project(WORK / "transfer-pretrain", {"data": {**data, "source": str(pretrain_dir)}})
    pretrain_run = run_stages(project, ["download", "preprocess", "train", "evaluate"])
    pretrained = results(project)
    checkpoint = WORK / "transfer-pretrain8.pt"
    shutil.copy(project / "data" / "model" / "checkpoint.pt", checkpoint)
    print(
        f"pretrain on 8 classes: test accuracy {pretrained['test_accuracy']:.4f} "
        f"({pretrain_run['seconds']:.0f} s with data preparation)",
        flush=True,
    )

    variants = {
        "from scratch": {},
        "fine-tuned (train.init_from)": {"init_from": str(checkpoint), "trust_weights_file": True},
        "head only (backbone frozen throughout)": {
            "init_from": str(checkpoint),
            "freeze_backbone_epochs": 1000,
            "trust_weights_file": True,
        },
    }
    project = scratch_project(WORK / "transfer-small", {"data": {**data, "source": str(small_dir)}})
    rows = []
    for seed in args.seeds:
        set_params(project, {"base": {"seed": seed}})
        run_stages(project, ["download", "preprocess"])
        for name, train in variants.items():
            set_params(
                project,
                {"train": {"init_from": "none", "freeze_backbone_epochs": 0, "trust_weights_file": False, **train}},
            )
            run = run_stages(project, ["train", "evaluate"])
            row = {
                "variant": name,
                "seed": seed,
                **results(project),
                "wall_seconds": run["seconds"],
                "peak_rss_mib": run["peak_rss_mib"],
            }
            rows.append(row)
            print(
                f"seed {seed} {name:<40} accuracy {row['test_accuracy']:.4f} "
                f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] {row['steps']} steps ({row['epochs']} epochs of "
                f"batch {row['batch_size']}) {row['wall_seconds']:.1f} s",
                flush=True,
            )

    print()
    print(f"{'cat vs dog, 244 training images':<42}{'mean acc':>9}{'min':>8}{'max':>8}{'steps':>7}{'wall_s':>8}")
    summary = {}
    for name in variants:
        accuracies = [r["test_accuracy"] for r in rows if r["variant"] == name]
        walls = [r["wall_seconds"] for r in rows if r["variant"] == name]
        steps = [r["steps"] for r in rows if r["variant"] == name][0]
        summary[name] = {
            "mean_accuracy": statistics.mean(accuracies),
            "min": min(accuracies),
            "max": max(accuracies),
            "mean_wall_seconds": statistics.mean(walls),
            "steps": steps,
        }
        print(
            f"{name:<42}{summary[name]['mean_accuracy']:9.4f}{min(accuracies):8.4f}{max(accuracies):8.4f}"
            f"{steps:7d}{summary[name]['mean_wall_seconds']:8.1f}"
        )
    gain = summary["fine-tuned (train.init_from)"]["mean_accuracy"] - summary["from scratch"]["mean_accuracy"]
    print(f"\nfine-tuning gains {gain * 100:+.1f} points over training from scratch (target: at least +10)")
    payload = {
        "machine": machine(),
        "command": "bench/transfer.py " + " ".join(sys.argv[1:]),
        "pretrain": {**pretrained, "wall_seconds": pretrain_run["seconds"], "classes": 8},
        "rows": rows,
        "summary": summary,
        "gain_points": gain * 100,
    }
    print(f"machine: {payload['machine']}\nwrote {write_results('transfer', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
