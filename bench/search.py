"""Issue 25's network search: layouts of the fast network (bench/candidates.py) scored by speed, then by
accuracy per second, on this machine.

    .venv/bin/python bench/search.py speed DATASET [--widths 16 24 32] [--layouts NAME ...]
        training images/s of every layout x width (the real set-up and step of imgcls.train.loop on random
        uint8 images of the data set's shape, batch 512 or --batch-size, the precision `auto` picks; 12 steps
        timed after 3),
        with its FLOPs per image -> bench/results/search-speed-DATASET.json (rows replaced by layout+width)
    .venv/bin/python bench/search.py accuracy RUN [RUN ...] [--seeds 0 1 2]
        each run of bench/search.yaml trained and evaluated by bench/run.py's stages in its prepared project
        (train + evaluate wall seconds, test accuracy with the evaluate stage's settings), every result appended
        to bench/results/search-DATASET.json, kept or not. The tutorial's loop on the same data set is timed
        once per CPU model in that file (the first accuracy run measures it) and each row gets its ratio.

    .venv/bin/python bench/search.py table DATASET
        the recorded runs as a markdown table (docs/performance.md)

DATASET: fashion-mnist | cifar10-jpeg (CIFAR-10 needs ../shared/data/cifar10-images.tar.gz).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import yaml
from candidates import LAYOUTS, register
from common import REPO_ROOT, RESULTS_DIR, machine, write_results
from flops import step_flops
from run import WORK, prepare, recipe_data, recipe_dataset, recipe_row, tutorial_row

from imgcls.host import cpu_info
from imgcls.model.registry import build_model
from imgcls.runtime import resolve_precision, seed_everything

SHAPES = {"fashion-mnist": (1, 28), "cifar10-jpeg": (3, 32)}


def speed(dataset: str, name: str, width: int, batch_size: int = 512, steps: int = 12, warmup: int = 3) -> dict:
    """Training images/s of layout ``name`` at ``width`` through the real step (bench/profile_step.py's phases)."""
    from imgcls.params.core import read_yaml
    from imgcls.params.project import parse_params
    from imgcls.params.train import params_with_recipe
    from imgcls.train.loop import FitSetup, epoch_batches, make_training_setup, train_step

    channels, side = SHAPES[dataset]
    raw = read_yaml(REPO_ROOT / "params.yaml")
    raw["train"].update(model=f"cand_{name}", width=width, batch_size=batch_size)
    config = params_with_recipe(parse_params(raw)).train
    generator = seed_everything(0)
    images = torch.randint(0, 256, (max(8192, (steps + warmup) * batch_size), channels, side, side), dtype=torch.uint8)
    labels = torch.randint(0, 10, (len(images),))
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    model = build_model(
        config.model,
        in_channels=channels,
        num_classes=10,
        image_size=side,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        width=width,
        whiten_bias_epochs=3.0,
    ).to(memory_format=torch.channels_last)
    model.initialize_from_data(images)
    training = make_training_setup(model, images, config=config, generator=generator)
    setup = FitSetup(config=config, device=device, precision=precision)
    batches = epoch_batches(training, images, labels, 1, generator)
    model.train()
    started = 0.0
    for step in range(steps + warmup):
        if step == warmup:
            started = time.perf_counter()
        batch, batch_labels = next(batches)
        train_step(model, batch, batch_labels, training, setup, step, 1.0)
    seconds = time.perf_counter() - started
    flops = step_flops(model, batch, batch_labels, training.loss_fn, device, precision) / len(batch)
    return {
        "layout": name,
        "width": width,
        "batch_size": batch_size,
        "widths": [m * width for m in LAYOUTS[name].multipliers],
        "convs": list(LAYOUTS[name].convs),
        "stem_stride": LAYOUTS[name].stem_stride,
        "train_mflop_per_image": flops / 1e6,
        "train_images_per_second": steps * len(batch) / seconds,
        "precision": precision,
    }


def run_speed(args: argparse.Namespace) -> None:
    path = RESULTS_DIR / f"search-speed-{args.dataset}.json"
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    same_cpu = old.get("machine", {}).get("cpu") == cpu_info().model
    rows = {(r["layout"], r["width"], r.get("batch_size", 512)): r for r in old["rows"] if same_cpu}
    print(f"{'layout':<12}{'width':>6}{'widths':>16}{'convs':>10}{'stem':>5}{'MFLOP/img':>10}{'img/s':>8}", flush=True)
    for name in args.layouts or LAYOUTS:
        for width in args.widths:
            row = speed(args.dataset, name, width, args.batch_size)
            rows[(name, width, args.batch_size)] = row
            print(
                f"{name:<12}{width:>6}{str(row['widths']):>16}{str(row['convs']):>10}{row['stem_stride']:>5}"
                f"{row['train_mflop_per_image']:>10.1f}{row['train_images_per_second']:>8.0f}",
                flush=True,
            )
    payload = {
        "machine": machine(),
        "command": "bench/search.py speed " + args.dataset,
        "torch_threads": torch.get_num_threads(),
        "rows": sorted(rows.values(), key=lambda r: (r["layout"], r["width"], r.get("batch_size", 512))),
    }
    print(f"wrote {write_results(f'search-speed-{args.dataset}', payload)}")


def run_accuracy(args: argparse.Namespace) -> None:
    runs = yaml.safe_load((REPO_ROOT / "bench" / "search.yaml").read_text())
    for name in args.runs:
        if name not in runs:
            raise SystemExit(f"no run {name!r} in bench/search.yaml")
    for name in args.runs:
        for seed in args.seeds:
            accuracy_row(name, runs[name], seed)


def accuracy_row(name: str, overrides: dict, seed: int) -> None:
    dataset = recipe_dataset(name)
    path = RESULTS_DIR / f"search-{dataset}.json"
    payload = json.loads(path.read_text()) if path.is_file() else {"tutorials": {}, "rows": []}
    cpu = cpu_info().model
    if cpu not in payload["tutorials"]:
        payload["tutorials"][cpu] = {**tutorial_row(dataset), "machine": machine()}
    tutorial = payload["tutorials"][cpu]
    folder, data = recipe_data(name, overrides)
    project, _ = prepare(dataset, data, folder)
    row = recipe_row(name, {**overrides, "base": {"seed": seed}}, project, candidates=True)
    row |= {
        "tta_levels": tta_levels(project, row["precision"]),
        "seed": seed,
        "machine": machine(),
        "time_ratio_to_tutorial": row["wall_seconds"] / tutorial["wall_seconds"],
        "accuracy_per_second": row["test_accuracy"] / row["wall_seconds"],
    }
    payload["rows"].append(row)
    write_results(f"search-{dataset}", payload)
    print(
        f"{name:<40} seed {seed}: test {row['test_accuracy']:.4f}, wall {row['wall_seconds']:.1f} s "
        f"(train {row['train_seconds']:.1f} s, {row['train_images_per_second']:.0f} img/s), "
        f"{row['time_ratio_to_tutorial']:.2f}x the tutorial ({tutorial['wall_seconds']:.1f} s); TTA "
        + ", ".join(f"{k} {v['test_accuracy']:.4f} ({v['seconds']:.1f} s)" for k, v in row["tta_levels"].items()),
        flush=True,
    )


def tta_levels(project, precision: str) -> dict:
    """The run's checkpoint rescored on the test split at each test-time augmentation level (the library's
    TTA_LEVELS, 1,000 views per call as the evaluate stage does): accuracy and the seconds the scoring took."""
    import numpy as np

    from imgcls.model.checkpoint import load_checkpoint
    from imgcls.model.inference import predict
    from imgcls.model.networks import TTA_LEVELS, with_tta

    model, _ = load_checkpoint(project / "data" / "model" / "checkpoint.pt", torch.device("cpu"))
    images = torch.from_numpy(np.load(project / "data" / "prepared" / "test_images.npy"))
    labels = torch.from_numpy(np.load(project / "data" / "prepared" / "test_labels.npy"))
    levels = {}
    for level, views in TTA_LEVELS.items():
        started = time.perf_counter()
        logits = predict(
            with_tta(model, level), images, batch_size=1000 // views, device=torch.device("cpu"), precision=precision
        )
        levels[level] = {
            "test_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "seconds": time.perf_counter() - started,
        }
    return levels


def run_table(args: argparse.Namespace) -> None:
    """Every recorded run of the data set as a markdown table (docs/performance.md), in the order run."""
    payload = json.loads((RESULTS_DIR / f"search-{args.dataset}.json").read_text())
    tutorials = ", ".join(f"{cpu}: {t['wall_seconds']:.1f} s" for cpu, t in payload["tutorials"].items())
    print(f"tutorial's loop: {tutorials}\n")
    print(
        "| run | seed | layout | test accuracy | TTA none / mirror / mirror_shifts | wall s | x tutorial "
        "| train img/s | MFLOP/img |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for row in payload["rows"]:
        train = row["params"]["train"]
        layout = LAYOUTS[train["model"].removeprefix("cand_")]
        widths = "/".join(str(m * train["width"]) for m in layout.multipliers)
        convs = "".join(map(str, layout.convs))
        rescored = row.get("tta_levels", {}).values()
        levels = " / ".join(f"{v['test_accuracy']:.4f}" for v in rescored) or "not rescored"
        print(
            f"| {row['recipe'].removeprefix(args.dataset + '-')} | {row['seed']} | {widths}, convs {convs}"
            f"{', s2d stem' if layout.stem_stride == 2 else ''} | {row['test_accuracy']:.4f} | {levels} | "
            f"{row['wall_seconds']:.1f} | {row['time_ratio_to_tutorial']:.2f} | "
            f"{row['train_images_per_second']:,.0f} | {row['train_flops_per_image'] / 1e6:.1f} |"
        )


def main() -> int:
    register()
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    speed_parser = commands.add_parser("speed")
    speed_parser.add_argument("dataset", choices=sorted(SHAPES))
    speed_parser.add_argument("--widths", nargs="*", type=int, default=[16, 24, 32])
    speed_parser.add_argument("--layouts", nargs="*", choices=sorted(LAYOUTS))
    speed_parser.add_argument("--batch-size", type=int, default=512)
    accuracy_parser = commands.add_parser("accuracy")
    accuracy_parser.add_argument("runs", nargs="+")
    accuracy_parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    table_parser = commands.add_parser("table")
    table_parser.add_argument("dataset", choices=sorted(SHAPES))
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    {"speed": run_speed, "accuracy": run_accuracy, "table": run_table}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
