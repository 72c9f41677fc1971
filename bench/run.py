"""`make bench`: the tutorial's loop against the pipeline's recipes, in one run on one machine.

Prints one table (recipe, data set, test accuracy, wall seconds, training images/s, peak resident memory,
ratios to the tutorial) and writes it as JSON to bench/results/bench.json. CIFAR-10 rows need
../shared/data/cifar10-images.tar.gz and are skipped with a message when it is absent.

    .venv/bin/python bench/run.py [--only RECIPE ...] [--skip-tutorial]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from common import extract_shared_cifar, REPO_ROOT, SHARED_CIFAR_IMAGES, machine, run_timed, scratch_project, set_params, write_results

WORK = Path("/tmp/imgcls-bench")
FASHION_MNIST_SOURCE = {"data": {"dataset": "fashion-mnist", "source": str(REPO_ROOT / "sources" / "fashion-mnist.txt")}}


def run_stages(project: Path, stages: list[str]) -> dict:
    total = {"seconds": 0.0, "peak_rss_mib": 0.0}
    for stage in stages:
        result = run_timed([sys.executable, f"stages/{stage}.py"], project, project / f"{stage}.log")
        if result["returncode"]:
            raise SystemExit(f"{stage} failed:\n{(project / f'{stage}.log').read_text()[-3000:]}")
        total["seconds"] += result["seconds"]
        total["peak_rss_mib"] = max(total["peak_rss_mib"], result["peak_rss_mib"])
    return total


FASHION_MNIST_IDX = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def tutorial_row(dataset: str = "cifar10-jpeg") -> dict:
    """The tutorial's loop on CIFAR-10 (the JPEG copy) or on Fashion-MNIST (issue 14's baseline for it)."""
    result_path = WORK / f"tutorial-{dataset}.json"
    if dataset == "fashion-mnist":
        args, name = ["--fashion-mnist", str(FASHION_MNIST_IDX)], "tutorial (LeNet 1-channel, batch 4, 2 epochs)"
    else:
        args, name = [str(extract_shared_cifar(WORK / "cifar10-images"))], "tutorial (LeNet, batch 4, 2 epochs)"
    log = WORK / f"tutorial-{dataset}.log"
    run = run_timed([sys.executable, str(REPO_ROOT / "bench" / "tutorial.py"), *args, str(result_path)], WORK, log)
    if run["returncode"]:
        raise SystemExit(log.read_text()[-3000:])
    result = json.loads(result_path.read_text())
    return {"recipe": name, "dataset": dataset, "test_accuracy": result["test_accuracy"],
            "wall_seconds": run["seconds"], "train_images_per_second": result["train_images"] / result["train_seconds"],
            "peak_rss_mib": run["peak_rss_mib"]}


def recipe_row(name: str, overrides: dict, projects: dict[str, Path]) -> dict:
    dataset = "cifar10-jpeg" if name.startswith("cifar10") else "fashion-mnist"
    project = projects[dataset]
    set_params(project, _reset(overrides))
    run = run_stages(project, ["train", "evaluate"])
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    train = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    return {"recipe": name, "dataset": dataset, "test_accuracy": evaluation["test"]["accuracy"],
            "wall_seconds": run["seconds"], "train_seconds": train["train_seconds"],
            "train_images_per_second": train["images_per_second"], "peak_rss_mib": run["peak_rss_mib"],
            "precision": train["precision"], "params": overrides}


def _reset(overrides: dict) -> dict:
    """The committed params.yaml's train/evaluate sections with this recipe's overrides on top."""
    committed = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    merged = {section: dict(committed[section]) for section in ("train", "evaluate")}
    for section, values in overrides.items():
        if section in merged:
            for key, value in values.items():
                merged[section][key] = {**merged[section][key], **value} if isinstance(value, dict) else value
    return merged


def prepare(dataset: str, overrides: dict) -> tuple[Path, dict]:
    project = WORK / dataset
    stamp = project / "prepared-with.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == overrides and (project / "data/prepared/meta.json").is_file():
        # Same data params as last time: reuse the prepared data (the row reports that run's time).
        previous = json.loads((project / "prepared-row.json").read_text())
        return project, previous
    scratch_project(project, overrides)
    run = run_stages(project, ["download", "preprocess"])
    stamp.write_text(json.dumps(overrides))
    row = {"recipe": "data: download + preprocess", "dataset": dataset, "wall_seconds": run["seconds"],
           "peak_rss_mib": run["peak_rss_mib"]}
    (project / "prepared-row.json").write_text(json.dumps(row))
    return project, row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="recipe names from bench/recipes.yaml")
    parser.add_argument("--skip-tutorial", action="store_true", help="no tutorial rows (CIFAR-10 or Fashion-MNIST)")
    args = parser.parse_args()
    recipes = yaml.safe_load((REPO_ROOT / "bench" / "recipes.yaml").read_text())
    if args.only:
        recipes = {k: v for k, v in recipes.items() if k in args.only}
    WORK.mkdir(parents=True, exist_ok=True)
    have_cifar = SHARED_CIFAR_IMAGES.is_file()
    if not have_cifar:
        print(f"CIFAR-10 rows skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        recipes = {k: v for k, v in recipes.items() if not k.startswith("cifar10")}
    rows, projects = [], {}
    if have_cifar and not args.skip_tutorial and any(k.startswith("cifar10") for k in recipes):
        rows.append(tutorial_row())
        print_row(rows[-1], {rows[-1]["dataset"]: rows[-1]})
    if any(not k.startswith("cifar10") for k in recipes) and not args.skip_tutorial:
        if (FASHION_MNIST_IDX / "train-images-idx3-ubyte.gz").is_file():
            rows.append(tutorial_row("fashion-mnist"))
            print_row(rows[-1], {rows[-1]["dataset"]: rows[-1]})
        else:
            print(f"Fashion-MNIST tutorial row skipped: {FASHION_MNIST_IDX} is absent (apt-get install dataset-fashion-mnist)")
    if any(k.startswith("cifar10") for k in recipes):
        # The standard split: all 50,000 training images train, the 10,000 test images only test.
        cifar_data = {"data": {"dataset": "imagefolder", "source": str(SHARED_CIFAR_IMAGES), "image_size": 32, "channels": 3},
                      "preprocess": {"val_fraction": 0.0}}
        projects["cifar10-jpeg"], row = prepare("cifar10-jpeg", cifar_data)
        rows.append(row)
    if any(not k.startswith("cifar10") for k in recipes):
        projects["fashion-mnist"], row = prepare("fashion-mnist", FASHION_MNIST_SOURCE)
        rows.append(row)
    for name, overrides in recipes.items():
        rows.append(recipe_row(name, overrides, projects))
        print(f"done: {name}: accuracy {rows[-1]['test_accuracy']:.4f} in {rows[-1]['wall_seconds']:.0f} s", flush=True)
    # Each data set's rows compare with the tutorial's loop on the same data set in this run.
    baselines = {row["dataset"]: row for row in rows if row["recipe"].startswith("tutorial")}
    print()
    print(f"{'recipe':<38}{'dataset':<15}{'test_acc':>9}{'wall_s':>9}{'train_img/s':>12}{'peak_MiB':>10}"
          f"{'acc_x_tut':>10}{'time_x_tut':>11}")
    for row in rows:
        print_row(row, baselines)
    payload = {"machine": machine(), "command": "make bench", "baselines": sorted(baselines), "rows": rows}
    for row in rows:
        baseline = baselines.get(row["dataset"])
        if baseline and "test_accuracy" in row:
            row["accuracy_ratio_to_tutorial"] = row["test_accuracy"] / baseline["test_accuracy"]
            row["time_ratio_to_tutorial"] = row["wall_seconds"] / baseline["wall_seconds"]
    if args.only:
        payload["command"] = "bench/run.py --only " + " ".join(args.only)
    name = "bench" if not args.only else "bench-" + "-".join(args.only)  # a partial run keeps the full table
    print(f"\nmachine: {payload['machine']}\nwrote {write_results(name, payload)}")
    return 0


def print_row(row: dict, baselines: dict[str, dict]) -> None:
    accuracy = f"{row['test_accuracy']:9.4f}" if "test_accuracy" in row else f"{'':>9}"
    speed = f"{row['train_images_per_second']:12.0f}" if "train_images_per_second" in row else f"{'':>12}"
    ratios = ""
    baseline = baselines.get(row["dataset"])  # the tutorial on the same data set only
    if baseline and "test_accuracy" in row:
        ratios = f"{row['test_accuracy'] / baseline['test_accuracy']:10.2f}{row['wall_seconds'] / baseline['wall_seconds']:11.2f}"
    print(f"{row['recipe']:<38}{row['dataset']:<15}{accuracy}{row['wall_seconds']:9.1f}{speed}{row['peak_rss_mib']:10.0f}{ratios}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
