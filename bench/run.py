"""`make bench`: the tutorial's loop against the pipeline's recipes, in one run on one machine.

Prints one table (recipe, data set, test accuracy, wall seconds, training images/s, peak resident memory,
the training's achieved GFLOP/s and its share of the CPU's peak, ratios to the tutorial), then issue 14's
targets, each met or missed by how much, and writes it all as JSON to bench/results/bench.json. CIFAR-10 rows
need ../shared/data/cifar10-images.tar.gz and are skipped with a message when it is absent.

Achieved FLOP/s = FLOPs per training image (forward + backward, counted by torch for the recipe's model) x the
train stage's images/s (the mean of its epochs' rates; validation is outside them); the peak is a large matrix
product in the same precision
measured at the start of the run (bench/flops.py), with the nominal cores x clock x FLOPs/cycle beside it.

    .venv/bin/python bench/run.py [--only RECIPE ...] [--skip-tutorial]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from common import (
    REPO_ROOT,
    SHARED_CIFAR_IMAGES,
    extract_shared_cifar,
    machine,
    merge_params,
    run_timed,
    scratch_project,
    set_params,
    write_results,
)
from flops import cpu_features, matmul_peak, nominal_peak, training_flops_per_image

from imgcls.paths import ProjectPaths

WORK = Path("/tmp/imgcls-bench")
# Issue 14's targets: (data set, least test accuracy, most wall time as a multiple of the tutorial's loop on the
# same data set in the same run).
TARGETS = [
    ("1", "cifar10-jpeg", 0.870, 1.0),
    ("2", "cifar10-jpeg", 0.905, 3.5),
    ("3 (stretch)", "cifar10-jpeg", 0.920, 9.0),
    ("4", "fashion-mnist", 0.940, 1.0),
]
MEMORY_TARGET_MIB = 4096  # target 5: every stage's peak resident memory
FASHION_MNIST_SOURCE = {
    "data": {"dataset": "fashion-mnist", "source": str(REPO_ROOT / "sources" / "fashion-mnist.txt")}
}
# The standard split: all 50,000 training images train, the 10,000 test images only test.
CIFAR_DATA = {
    "data": {"dataset": "imagefolder", "source": str(SHARED_CIFAR_IMAGES), "image_size": 32, "channels": 3},
    "preprocess": {"val_fraction": 0.0},
}


def run_stages(project: Path, stages: list[str], candidates: bool = False) -> dict:
    """Each stage in a child process, timed; ``candidates``: through bench/candidate_stage.py, which registers
    bench/candidates.py's layouts first (issue 25's search)."""
    total = {"seconds": 0.0, "peak_rss_mib": 0.0}
    for stage in stages:
        script = [str(REPO_ROOT / "bench" / "candidate_stage.py"), stage] if candidates else [f"stages/{stage}.py"]
        result = run_timed([sys.executable, *script], project, project / f"{stage}.log")
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
    shape = [1, 28, 28] if dataset == "fashion-mnist" else [3, 32, 32]
    return {
        "recipe": name,
        "dataset": dataset,
        "test_accuracy": result["test_accuracy"],
        "wall_seconds": run["seconds"],
        "train_images_per_second": result["train_images"] / result["train_seconds"],
        "peak_rss_mib": run["peak_rss_mib"],
        "precision": "fp32",
        "train_flops_per_image": training_flops_per_image(
            "lenet", width=32, image_shape=shape, num_classes=10, precision="fp32"
        ),
    }


def recipe_dataset(name: str) -> str:
    return "cifar10-jpeg" if name.startswith("cifar10") else "fashion-mnist"


def recipe_data(name: str, overrides: dict) -> tuple[str, dict]:
    """The prepared project a recipe trains in (its name under WORK) and the data params that prepare it: the
    data set's, with the recipe's own ``preprocess`` overrides (e.g. no validation split) on top."""
    dataset = recipe_dataset(name)
    data = CIFAR_DATA if dataset == "cifar10-jpeg" else FASHION_MNIST_SOURCE
    own = overrides.get("preprocess", {})
    # The committed preprocess section is part of what prepared the data: a project prepared under an earlier
    # params.yaml (another val_fraction) no longer matches and is prepared again.
    committed = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["preprocess"]
    merged = {**data, "preprocess": {**committed, **data.get("preprocess", {}), **own}}
    return dataset + "".join(f"-{key}{value}" for key, value in sorted(own.items())), merged


def recipe_row(name: str, overrides: dict, project: Path, candidates: bool = False) -> dict:
    dataset = recipe_dataset(name)
    set_params(project, _reset(overrides))
    # A benchmark row trains from scratch: a resume state left by an interrupted earlier row would make the
    # train stage continue that run (and its seconds meaningless).
    ProjectPaths(project).resume_state.unlink(missing_ok=True)
    run = run_stages(project, ["train", "evaluate"], candidates)
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    train = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    config = yaml.safe_load((project / "params.yaml").read_text())["train"]
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    flops = training_flops_per_image(
        config["model"],
        width=config["width"],
        image_shape=meta["image_shape"],
        num_classes=len(meta["class_names"]),
        precision=train["precision"],
    )
    return {
        "recipe": name,
        "dataset": dataset,
        "test_accuracy": evaluation["test"]["accuracy"],
        "wall_seconds": run["seconds"],
        "train_seconds": train["train_seconds"],
        "train_images_per_second": train["images_per_second"],
        "peak_rss_mib": run["peak_rss_mib"],
        "precision": train["precision"],
        "train_flops_per_image": flops,
        "params": overrides,
    }


def _reset(overrides: dict) -> dict:
    """The committed params.yaml's base/train/evaluate sections with this recipe's overrides on top (a seed set
    by one row does not leak into the next)."""
    committed = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    sections = ("base", "train", "evaluate")
    return merge_params(
        {section: committed[section] for section in sections},
        {section: values for section, values in overrides.items() if section in sections},
    )


def prepare(dataset: str, overrides: dict, folder: str | None = None) -> tuple[Path, dict]:
    project = WORK / (folder or dataset)
    stamp = project / "prepared-with.json"
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == overrides
        and (project / "data/prepared/meta.json").is_file()
    ):
        # Same data params as last time: reuse the prepared data (the row reports that run's time).
        previous = json.loads((project / "prepared-row.json").read_text())
        return project, previous
    scratch_project(project, overrides)
    run = run_stages(project, ["download", "preprocess"])
    stamp.write_text(json.dumps(overrides))
    row = {
        "recipe": f"data: download + preprocess{'' if folder in (None, dataset) else ' (' + folder + ')'}",
        "dataset": dataset,
        "wall_seconds": run["seconds"],
        "peak_rss_mib": run["peak_rss_mib"],
    }
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
    # The CPU's dense-math peak, measured while nothing else runs: what each row's FLOP/s is a share of.
    peaks = {"fp32": matmul_peak("fp32")}
    if {"avx512_bf16", "amx_bf16"} & set(cpu_features()):
        peaks["bf16"] = matmul_peak("bf16")
    nominal = nominal_peak()
    print(
        "peak (2048x2048 matrix product): "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
        + "; nominal (cores x clock x FLOP/cycle): "
        + ", ".join(f"{k} {nominal[k] / 1e9:.1f} GFLOP/s" for k in ("fp32", "bf16") if nominal[k])
        + f"; CPU features: {', '.join(cpu_features())}",
        flush=True,
    )
    have_cifar = SHARED_CIFAR_IMAGES.is_file()
    if not have_cifar:
        print(
            f"CIFAR-10 rows skipped: {SHARED_CIFAR_IMAGES} is absent "
            "(it sits beside the checkout on the project's machines)"
        )
        recipes = {k: v for k, v in recipes.items() if not k.startswith("cifar10")}
    rows, projects = [], {}
    if have_cifar and not args.skip_tutorial and any(k.startswith("cifar10") for k in recipes):
        rows.append(with_flops(tutorial_row(), peaks))
        print_row(rows[-1], {rows[-1]["dataset"]: rows[-1]})
    if any(not k.startswith("cifar10") for k in recipes) and not args.skip_tutorial:
        if (FASHION_MNIST_IDX / "train-images-idx3-ubyte.gz").is_file():
            rows.append(with_flops(tutorial_row("fashion-mnist"), peaks))
            print_row(rows[-1], {rows[-1]["dataset"]: rows[-1]})
        else:
            print(
                f"Fashion-MNIST tutorial row skipped: {FASHION_MNIST_IDX} is absent "
                "(apt-get install dataset-fashion-mnist)"
            )
    folders = {}
    for name, overrides in recipes.items():  # each data variant is prepared once, before any recipe trains
        folder, data = folders[name] = recipe_data(name, overrides)
        if folder not in projects:
            projects[folder], row = prepare(recipe_dataset(name), data, folder)
            rows.append(row)
    for name, overrides in recipes.items():
        rows.append(with_flops(recipe_row(name, overrides, projects[folders[name][0]]), peaks))
        print(f"done: {name}: accuracy {rows[-1]['test_accuracy']:.4f} in {rows[-1]['wall_seconds']:.0f} s", flush=True)
    # Each data set's rows compare with the tutorial's loop on the same data set in this run.
    baselines = {row["dataset"]: row for row in rows if row["recipe"].startswith("tutorial")}
    print()
    print(
        f"{'recipe':<46}{'dataset':<15}{'test_acc':>9}{'wall_s':>9}{'train_img/s':>12}{'peak_MiB':>10}"
        f"{'GFLOP/s':>9}{'%peak':>7}{'acc_x_tut':>10}{'time_x_tut':>11}"
    )
    for row in rows:
        print_row(row, baselines)
    for row in rows:
        baseline = baselines.get(row["dataset"])
        if baseline and "test_accuracy" in row:
            row["accuracy_ratio_to_tutorial"] = row["test_accuracy"] / baseline["test_accuracy"]
            row["time_ratio_to_tutorial"] = row["wall_seconds"] / baseline["wall_seconds"]
    verdicts = target_verdicts(rows, baselines)
    print()
    for verdict in verdicts:
        print(verdict["line"])
    payload = {
        "machine": machine(),
        "command": "make bench",
        "cpu_features": cpu_features(),
        "matmul_peak_flops_per_second": peaks,
        "nominal_peak": nominal,
        "baselines": sorted(baselines),
        "rows": rows,
        "targets": verdicts,
    }
    if args.only:
        payload["command"] = "bench/run.py --only " + " ".join(args.only)
    name = "bench" if not args.only else "bench-" + "-".join(args.only)  # a partial run keeps the full table
    print(f"\nmachine: {payload['machine']}\nwrote {write_results(name, payload)}")
    return 0


def with_flops(row: dict, peaks: dict[str, float]) -> dict:
    """The row's achieved training FLOP/s and its share of the measured peak in the row's precision."""
    achieved = row["train_flops_per_image"] * row["train_images_per_second"]
    peak = peaks.get(row["precision"], peaks["fp32"])
    return {**row, "train_flops_per_second": achieved, "share_of_peak": achieved / peak}


def target_verdicts(rows: list[dict], baselines: dict[str, dict]) -> list[dict]:
    """Each target: met (by the fastest row that meets it) or missed, by how much (the closest row)."""
    verdicts = []
    for label, dataset, accuracy, ratio in TARGETS:
        head = f"target {label}: {dataset} >= {accuracy:.1%} in <= {ratio:g}x the tutorial:"
        candidates = [
            r
            for r in rows
            if r["dataset"] == dataset and "time_ratio_to_tutorial" in r and not r["recipe"].startswith("tutorial")
        ]
        if not candidates:
            verdicts.append(
                {
                    "target": label,
                    "status": "not run",
                    "line": f"{head} not run (no tutorial or recipe row for {dataset})",
                }
            )
            continue
        meeting = [r for r in candidates if r["test_accuracy"] >= accuracy and r["time_ratio_to_tutorial"] <= ratio]
        if meeting:
            best = min(meeting, key=lambda r: r["time_ratio_to_tutorial"])
            status = "met"
            detail = f"MET by {best['recipe']} ({best['test_accuracy']:.2%} at {best['time_ratio_to_tutorial']:.2f}x)"
        else:
            # The miss is the shortfall of the row that comes closest: accuracy short (points) and time over (x),
            # one point of accuracy weighing as much as one tutorial's time.
            def shortfall(r: dict, accuracy: float = accuracy, ratio: float = ratio) -> tuple[float, float]:
                return max(0.0, accuracy - r["test_accuracy"]), max(0.0, r["time_ratio_to_tutorial"] - ratio)

            best = min(candidates, key=lambda r: shortfall(r)[0] * 100 + shortfall(r)[1])
            short, over = shortfall(best)
            status = "missed"
            detail = (
                f"missed; closest {best['recipe']}: {best['test_accuracy']:.2%} at "
                f"{best['time_ratio_to_tutorial']:.2f}x ("
                + ", ".join(
                    part
                    for part in (
                        f"{short * 100:.2f} points short" if short else "",
                        f"{over:.2f}x over" if over else "",
                    )
                    if part
                )
                + ")"
            )
        verdicts.append(
            {
                "target": label,
                "status": status,
                "recipe": best["recipe"],
                "test_accuracy": best["test_accuracy"],
                "time_ratio_to_tutorial": best["time_ratio_to_tutorial"],
                "line": f"{head} {detail}",
            }
        )
    measured = [r for r in rows if "peak_rss_mib" in r]
    if measured:
        largest = max(measured, key=lambda r: r["peak_rss_mib"])
        met = largest["peak_rss_mib"] <= MEMORY_TARGET_MIB
        verdicts.append(
            {
                "target": "5",
                "status": "met" if met else "missed",
                "recipe": largest["recipe"],
                "peak_rss_mib": largest["peak_rss_mib"],
                "line": f"target 5: peak resident memory <= {MEMORY_TARGET_MIB} MiB: "
                f"{'MET' if met else 'missed'}; largest {largest['peak_rss_mib']:.0f} MiB "
                f"({largest['recipe']}, {largest['dataset']})",
            }
        )
    return verdicts


def print_row(row: dict, baselines: dict[str, dict]) -> None:
    accuracy = f"{row['test_accuracy']:9.4f}" if "test_accuracy" in row else f"{'':>9}"
    speed = f"{row['train_images_per_second']:12.0f}" if "train_images_per_second" in row else f"{'':>12}"
    ratios = ""
    baseline = baselines.get(row["dataset"])  # the tutorial on the same data set only
    if baseline and "test_accuracy" in row:
        accuracy_ratio = row["test_accuracy"] / baseline["test_accuracy"]
        ratios = f"{accuracy_ratio:10.2f}{row['wall_seconds'] / baseline['wall_seconds']:11.2f}"
    flops = (
        f"{row['train_flops_per_second'] / 1e9:9.1f}{row['share_of_peak']:7.0%}"
        if "train_flops_per_second" in row
        else f"{'':>16}"
    )
    print(
        f"{row['recipe']:<46}{row['dataset']:<15}{accuracy}{row['wall_seconds']:9.1f}{speed}{row['peak_rss_mib']:10.0f}"
        f"{flops}{ratios}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
