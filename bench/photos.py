"""Issue 23's benchmark: every model trains, photos included. Two data sets made from the CIFAR-10 JPEG copy
(../shared/data), both laid out as people have their own photos (class folders):

- **cat/dog at 224 px**, ants/bees-sized: 122 + 122 training images and 77 + 76 test images (in ``val/``,
  the test split: data.val_folder: test), upscaled to 224 x 224 (bicubic) and trained at data.image_size 64.
  Rows: the default model (fast) with today's recipe and the augmentation ``auto`` picks at 64 px, the same
  with the thumbnail augmentation (flip + 2-pixel shift: what every size got before), and mobilenet_v3_small
  and resnet18 from scratch with their recipe; three seeds each (the seed also picks the validation images).
- **CIFAR-10, 5,000 training images** (500 per class) and 1,000 test images (100 per class) at 32 px: every
  registered model and two more torchvision networks picked by name, one seed, with seconds and images/s.

Each row runs the real stages (download, preprocess, train, evaluate) in a scratch project; the table shows
test accuracy with its 95% interval, chance, whether evaluate flagged a constant classifier, and time.
Writes bench/results/photos.json.

    .venv/bin/python bench/photos.py [--seeds 0 1 2] [--only catdog|cifar5k]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from common import SHARED_CIFAR_IMAGES, extract_shared_cifar, machine, scratch_project, set_params, write_results
from run import run_stages

WORK = Path("/tmp/imgcls-bench")
CATDOG = {"train": {"cat": 122, "dog": 122}, "val": {"cat": 77, "dog": 76}}
PHOTO_SIZE = 224  # the cat/dog images are upscaled to this, as photos would be large
TRAIN_SIZE = 64  # and trained at this data.image_size
CIFAR5K = {"train": 500, "test": 100}  # per class
THUMBNAIL_AUGMENT = {"translate": 2, "crop_scale": 1.0, "color_jitter": 0.0, "policy": "none"}
CATDOG_ROWS = {
    "fast (default), photo augmentation": {"model": "fast"},
    "fast (default), thumbnail augmentation": {"model": "fast", "augment": THUMBNAIL_AUGMENT},
    "mobilenet_v3_small from scratch": {"model": "mobilenet_v3_small"},
    "resnet18 from scratch": {"model": "resnet18"},
}
CIFAR_MODELS = ["lenet", "tutorial_cnn", "convnet", "fast", "fast_lite", "resnet18", "mobilenet_v3_small"]
CIFAR_EXTRA_TORCHVISION = ["shufflenet_v2_x1_0", "regnet_x_400mf"]  # through torchvision's registry


def make_catdog(cifar: Path, root: Path) -> Path:
    """The cat/dog folder, upscaled; made once."""
    from PIL import Image

    if (root / "done").is_file():
        return root
    rng = random.Random(0)
    for split, counts in CATDOG.items():
        source = cifar / ("train" if split == "train" else "test")
        for name, count in counts.items():
            target = root / split / name
            target.mkdir(parents=True, exist_ok=True)
            for path in rng.sample(sorted((source / name).iterdir()), count):
                with Image.open(path) as image:
                    image.convert("RGB").resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BICUBIC).save(
                        target / path.name, quality=92
                    )
    (root / "done").write_text("")
    return root


def make_cifar5k(cifar: Path, root: Path) -> Path:
    """500 training and 100 test images per class, as hard links into the extracted copy; made once."""
    import os

    if (root / "done").is_file():
        return root
    rng = random.Random(0)
    for split, count in CIFAR5K.items():
        for class_dir in sorted((cifar / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in rng.sample(sorted(class_dir.iterdir()), count):
                os.link(path, target / path.name)
    (root / "done").write_text("")
    return root


def row_results(project: Path, run: dict) -> dict:
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    train = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    test = evaluation["test"]
    return {
        "test_accuracy": test["accuracy"],
        "ci95": [test["ci95_low"], test["ci95_high"]],
        "test_images": test["images"],
        "chance": evaluation["chance_accuracy"],
        "constant_classifier": evaluation["constant_classifier"],
        "above_chance": test["ci95_low"] > evaluation["chance_accuracy"],
        "epochs": train["epochs"],
        "steps": train["steps"],
        "train_seconds": train["train_seconds"],
        "images_per_second": train["images_per_second"],
        "wall_seconds": run["seconds"],
    }


def run_row(project: Path, train: dict, seed: int) -> dict:
    # Each row starts from the committed params (all auto), then sets its own keys.
    defaults = {"model": "fast", "augment": {key: "auto" for key in THUMBNAIL_AUGMENT}}
    set_params(project, {"base": {"seed": seed}, "train": defaults})
    set_params(project, {"train": train})
    run = run_stages(project, ["download", "preprocess", "train", "evaluate"])
    return row_results(project, run)


def print_row(name: str, seed: int, row: dict) -> None:
    flag = " CONSTANT" if row["constant_classifier"] else ""
    print(
        f"{name:<42} seed {seed} accuracy {row['test_accuracy']:.4f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] "
        f"chance {row['chance']:.3f}{flag} {row['steps']} steps {row['train_seconds']:.1f} s "
        f"{row['images_per_second']:.0f} img/s",
        flush=True,
    )


def catdog_rows(cifar: Path, seeds: list[int]) -> tuple[list[dict], dict]:
    folder = make_catdog(cifar, WORK / "photos-catdog224")
    data = {"dataset": "imagefolder", "source": str(folder), "image_size": TRAIN_SIZE, "channels": 3}
    project = scratch_project(WORK / "photos-catdog", {"data": {**data, "val_folder": "test"}})
    rows = []
    for name, train in CATDOG_ROWS.items():
        for seed in seeds:
            row = {"row": name, "seed": seed, **run_row(project, train, seed)}
            rows.append(row)
            print_row(name, seed, row)
    summary = {}
    for name in CATDOG_ROWS:
        mine = [r for r in rows if r["row"] == name]
        summary[name] = {
            "mean_accuracy": statistics.mean(r["test_accuracy"] for r in mine),
            "min": min(r["test_accuracy"] for r in mine),
            "max": max(r["test_accuracy"] for r in mine),
            "all_above_chance": all(r["above_chance"] for r in mine),
            "any_constant": any(r["constant_classifier"] for r in mine),
            "mean_train_seconds": statistics.mean(r["train_seconds"] for r in mine),
        }
    return rows, summary


def cifar_rows(cifar: Path, on_row=lambda rows: None) -> list[dict]:
    folder = make_cifar5k(cifar, WORK / "photos-cifar5k")
    data = {"dataset": "imagefolder", "source": str(folder), "image_size": 32, "channels": 3}
    project = scratch_project(WORK / "photos-cifar", {"data": data})
    rows = []
    for model in CIFAR_MODELS + CIFAR_EXTRA_TORCHVISION:
        row = {"row": model, "seed": 0, **run_row(project, {"model": model}, 0)}
        rows.append(row)
        print_row(model, 0, row)
        on_row(rows)
    return rows


def print_tables(catdog_summary: dict, cifar: list[dict]) -> None:
    if catdog_summary:
        print(f"\n{'cat/dog 224 px at 64, 244 training images':<42}{'mean':>8}{'min':>8}{'max':>8}  above chance")
        for name, s in catdog_summary.items():
            verdict = "all" if s["all_above_chance"] else "NOT all"
            print(f"{name:<42}{s['mean_accuracy']:8.4f}{s['min']:8.4f}{s['max']:8.4f}  {verdict}")
        default = catdog_summary["fast (default), photo augmentation"]["mean_accuracy"]
        print(f"target: default from scratch >= 0.70: {'met' if default >= 0.70 else 'missed'} ({default:.4f})")
    if cifar:
        print(f"\n{'CIFAR-10 5,000 training images, 32 px':<42}{'accuracy':>9}{'train_s':>9}{'img/s':>8}  >= 0.45")
        for r in cifar:
            verdict = "met" if r["test_accuracy"] >= 0.45 else f"missed by {0.45 - r['test_accuracy']:.3f}"
            print(
                f"{r['row']:<42}{r['test_accuracy']:9.4f}{r['train_seconds']:9.1f}"
                f"{r['images_per_second']:8.0f}  {verdict}"
            )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--only", choices=["catdog", "cifar5k"])
    args = parser.parse_args()
    if not SHARED_CIFAR_IMAGES.is_file():
        print(f"skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        return 0
    cifar = extract_shared_cifar(WORK / "cifar10-images")
    name = "photos" if not args.only else f"photos-{args.only}"
    payload = {
        "machine": machine(),
        "command": "bench/photos.py " + " ".join(sys.argv[1:]),
        "catdog": {"rows": [], "summary": {}, "sizes": CATDOG, "photo_size": PHOTO_SIZE, "image_size": TRAIN_SIZE},
        "cifar5k": {"rows": [], "per_class": CIFAR5K},
    }
    if args.only != "cifar5k":
        payload["catdog"]["rows"], payload["catdog"]["summary"] = catdog_rows(cifar, args.seeds)
        write_results(name, payload)  # each part as soon as it is done: a long run keeps what it measured
    if args.only != "catdog":

        def keep(rows: list[dict]) -> None:  # after every row: a long run keeps what it measured
            payload["cifar5k"]["rows"] = rows
            write_results(name, payload)

        payload["cifar5k"]["rows"] = cifar_rows(cifar, keep)
    print_tables(payload["catdog"]["summary"], payload["cifar5k"]["rows"])
    print(f"machine: {payload['machine']}\nwrote {write_results(name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
