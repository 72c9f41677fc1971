"""Benchmark: peak resident memory of every stage against the size of the prepared data (issue 13).

    .venv/bin/python bench/memory.py [--only cifar32,cifar96,big] [--train-seconds 120]

Data sets, all from the CIFAR-10 JPEG copy in ../shared/data (skipped with a reason when it is absent):
- cifar32: the copy at 32 pixels (175 MB prepared); train runs twice for 2 epochs, with the images kept in
  memory (train.in_memory: always) and read from disk per batch (never): same metrics, images/s compared;
- cifar96: the copy resized to 96 pixels (1.6 GB prepared, the figure issue 13 measured before);
- big: the training images repeated 4 times (hard links, so the source costs no disk) plus the test
  images, at 128 pixels: 210,000 images, 10.3 GB prepared.
For cifar96 and big, train runs for --train-seconds and is then stopped with Ctrl-C (SIGINT: the stage stops
at a step boundary); its images/s come from the saved resume state. Evaluate and export then run on a
checkpoint of *untrained* weights written by this script (their memory and speed do not depend on the
weights; their accuracy is meaningless and not reported). evaluate.tta is off for cifar96 and big.

Peak memory is sampled every 0.1 s as the sum of VmRSS over the stage's process and all its children
(preprocess decodes in worker processes; shared pages are counted once per process, so this is an upper
bound), and also read as the stage process's own ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import (
    REPO_ROOT,
    SHARED_CIFAR_IMAGES,
    extract_shared_cifar,
    machine,
    scratch_project,
    set_params,
    write_results,
)

WORK = Path("/tmp/imgcls-bench-memory")
TARGET_MIB = 2.5 * 1024


def tree_rss_kib(root: int) -> int:
    """Sum of VmRSS (KiB) over ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def run_stage(project: Path, stage: str, stop_after: float | None = None) -> dict:
    """Run stages/<stage>.py; peak tree RSS sampled, own ru_maxrss, wall seconds, exit code."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    log = open(project / f"{stage}.log", "w")
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, f"stages/{stage}.py"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_kib(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if stop_after is not None:
        timer = threading.Timer(stop_after, lambda: process.poll() is None and process.send_signal(signal.SIGINT))
        timer.daemon = True
        timer.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    log.close()
    seconds = time.perf_counter() - started
    return {
        "stage": stage,
        "seconds": seconds,
        "returncode": os.waitstatus_to_exitcode(status),
        "peak_tree_rss_mib": peak[0] / 1024,
        "peak_own_rss_mib": usage.ru_maxrss / 1024,
    }


def read_cost(project: Path, batch: int = 512, batches: int = 80) -> dict:
    """Milliseconds to get one shuffled training batch: read from disk by rows (streamed) or gathered from
    a resident tensor, on the prepared training split."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "src"))
    from imgcls.arrays import NpyReader

    reader = NpyReader(project / "data" / "prepared" / "train_images.npy")
    resident = torch.from_numpy(reader.load())
    order = torch.randperm(len(reader), generator=torch.Generator().manual_seed(0))
    indices = [order[i * batch : (i + 1) * batch] for i in range(min(batches, len(reader) // batch))]
    started = time.perf_counter()
    for index in indices:
        reader.take(index.numpy())
    streamed_ms = (time.perf_counter() - started) / len(indices) * 1000
    started = time.perf_counter()
    for index in indices:
        resident[index]
    return {
        "batch": batch,
        "streamed_read_ms": streamed_ms,
        "resident_gather_ms": (time.perf_counter() - started) / len(indices) * 1000,
    }


def prepared_bytes(project: Path) -> int:
    return sum(p.stat().st_size for p in (project / "data" / "prepared").glob("*.npy"))


def counts(project: Path) -> dict:
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    return {split: sum(values.values()) for split, values in meta["counts"].items()}


def untrained_checkpoint(project: Path) -> None:
    """A checkpoint of freshly initialised weights for the prepared data (evaluate/export memory and speed)."""
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from imgcls.model.checkpoint import save_checkpoint
    from imgcls.model.registry import build_model
    from imgcls.params.core import as_dict
    from imgcls.params.project import load_params

    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    params = load_params(project / "params.yaml")
    arguments = {
        "in_channels": meta["image_shape"][0],
        "num_classes": len(meta["class_names"]),
        "image_size": meta["image_shape"][1],
        "mean": meta["mean"],
        "std": meta["std"],
        "width": params.train.width,
        "whiten_bias_epochs": params.train.whiten_bias_epochs,
    }
    model = build_model(params.train.model, **arguments)
    save_checkpoint(
        project / "data" / "model" / "checkpoint.pt",
        model,
        architecture=params.train.model,
        arguments=arguments,
        class_names=meta["class_names"],
        mean=meta["mean"],
        std=meta["std"],
        params=as_dict(params),
        extra={"train_seconds": 0.0, "precision": "fp32", "untrained": True},
    )


def resume_progress(project: Path) -> dict | None:
    import torch

    state_path = project / "data" / "train-resume" / "state.pt"
    if not state_path.is_file():
        return None
    state = torch.load(state_path, weights_only=True)
    progress = state["epoch_progress"] or {"seen": 0, "seconds": 0.0}
    return {"images": progress["seen"], "seconds": progress["seconds"]}


def repeated_source(cifar: Path, where: Path, repeats: int) -> Path:
    """train/ repeated ``repeats`` times through hard links (no extra disk), test/ once."""
    if (where / "done").is_file():
        return where
    shutil.rmtree(where, ignore_errors=True)
    for class_dir in sorted((cifar / "train").iterdir()):
        target = where / "train" / class_dir.name
        target.mkdir(parents=True)
        for image in class_dir.iterdir():
            for r in range(repeats):
                os.link(image, target / f"r{r}_{image.name}")
    shutil.copytree(cifar / "test", where / "test", copy_function=os.link)
    (where / "done").write_text("")
    return where


def bench_set(
    name: str, source: Path, image_size: int, extra: dict, train_runs: list[tuple[str, float | None]], untrained: bool
) -> dict:
    project = scratch_project(
        WORK / name,
        {"data": {"dataset": "imagefolder", "source": str(source), "image_size": image_size, "channels": 3}, **extra},
    )
    rows = []
    for stage in ("download", "preprocess"):
        rows.append(run_stage(project, stage))
        if rows[-1]["returncode"]:
            raise SystemExit(f"{name} {stage} failed:\n{(project / f'{stage}.log').read_text()[-3000:]}")
    size, split_counts = prepared_bytes(project), counts(project)
    batch_read = read_cost(project) if name == "cifar32" else None
    rows[-1]["images_per_second"] = sum(split_counts.values()) / rows[-1]["seconds"]
    for in_memory, stop_after in train_runs:
        shutil.rmtree(project / "data" / "train-resume", ignore_errors=True)
        set_params(project, {"train": {"in_memory": in_memory}})
        row = run_stage(project, "train", stop_after)
        row["stage"], row["in_memory"] = f"train ({in_memory})", in_memory
        log_text = (project / "train.log").read_text()
        row["mode"] = "resident" if "kept in memory" in log_text else "streamed"
        if stop_after is not None:
            progress = resume_progress(project)
            if row["returncode"] != 130 or progress is None:
                raise SystemExit(f"{name} train did not stop as asked:\n{log_text[-3000:]}")
            row["images_per_second"] = progress["images"] / progress["seconds"]
            row["stopped_after_seconds"] = stop_after
        else:
            if row["returncode"]:
                raise SystemExit(f"{name} train failed:\n{log_text[-3000:]}")
            metrics = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
            row["images_per_second"] = metrics["images_per_second"]
            row["val_accuracy"] = metrics.get("val", {}).get("accuracy")
        rows.append(row)
    if untrained:
        untrained_checkpoint(project)
    for stage in ("evaluate", "export"):
        row = run_stage(project, stage)
        if row["returncode"]:
            raise SystemExit(f"{name} {stage} failed:\n{(project / f'{stage}.log').read_text()[-3000:]}")
        if stage == "evaluate":
            row["images_per_second"] = split_counts["test"] / row["seconds"]
            if not untrained:
                row["test_accuracy"] = json.loads((project / "metrics" / "eval.json").read_text())["test"]["accuracy"]
        rows.append(row)
    return {
        "name": name,
        "image_size": image_size,
        "prepared_bytes": size,
        "counts": split_counts,
        "batch_read": batch_read,
        "untrained_for_evaluate": untrained,
        "stages": rows,
    }


def print_set(result: dict) -> None:
    if result.get("batch_read"):
        cost = result["batch_read"]
        print(
            f"\n{result['name']}: one shuffled batch of {cost['batch']}: "
            f"read from disk {cost['streamed_read_ms']:.2f} ms, "
            f"gathered in memory {cost['resident_gather_ms']:.2f} ms"
        )
    print(
        f"\n{result['name']}: {sum(result['counts'].values()):,} images at {result['image_size']} px, "
        f"{result['prepared_bytes'] / 2**30:.2f} GiB prepared"
    )
    print(f"  {'stage':<18}{'wall_s':>8}{'peak_rss_mib':>14}{'own_rss_mib':>13}{'x_data':>8}{'images/s':>10}  notes")
    for row in result["stages"]:
        ratio = row["peak_tree_rss_mib"] * 2**20 / result["prepared_bytes"]
        notes = [
            f"{row['mode']}" if "mode" in row else "",
            "OVER 2.5 GB" if row["peak_tree_rss_mib"] > TARGET_MIB else "",
            f"val acc {row['val_accuracy']:.4f}" if row.get("val_accuracy") is not None else "",
            f"test acc {row['test_accuracy']:.4f}" if row.get("test_accuracy") is not None else "",
            f"stopped after {row['stopped_after_seconds']:.0f} s" if "stopped_after_seconds" in row else "",
        ]
        print(
            f"  {row['stage']:<18}{row['seconds']:>8.1f}{row['peak_tree_rss_mib']:>14.0f}"
            f"{row['peak_own_rss_mib']:>13.0f}{ratio:>8.2f}{row.get('images_per_second', 0):>10,.0f}  "
            + ", ".join(n for n in notes if n)
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="cifar32,cifar96,big")
    parser.add_argument("--train-seconds", type=float, default=120.0)
    args = parser.parse_args()
    if not SHARED_CIFAR_IMAGES.is_file():
        print(f"skipped: {SHARED_CIFAR_IMAGES} is absent (it sits beside the checkout on the project's machines)")
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    cifar = extract_shared_cifar(WORK / "cifar10-images")
    fast_eval = {"evaluate": {"tta": False}}
    sets = {
        "cifar32": lambda: bench_set(
            "cifar32",
            SHARED_CIFAR_IMAGES,
            32,
            {"train": {"epochs": 2}},
            [("always", None), ("never", None), ("always", None), ("never", None)],
            untrained=False,
        ),
        "cifar96": lambda: bench_set(
            "cifar96", SHARED_CIFAR_IMAGES, 96, fast_eval, [("auto", args.train_seconds)], untrained=True
        ),
        # Batch 128 and evaluation batches of 250: at 128 pixels a batch of 512 alone needs about 8 GB of
        # activations (see docs/memory.md); this row shows what does not grow with the data.
        "big": lambda: bench_set(
            "big",
            repeated_source(cifar, WORK / "big-source", 4),
            128,
            {"evaluate": {"tta": False, "batch_size": 250}, "train": {"batch_size": 128}},
            [("auto", args.train_seconds)],
            untrained=True,
        ),
    }
    results = []
    for name in args.only.split(","):
        results.append(sets[name]())
        print_set(results[-1])
        shutil.rmtree(WORK / name / "data", ignore_errors=True)  # 10 GB sets: do not keep them around
        write_results("memory", {"machine": machine(), "sets": results, "complete": False})  # kept if a later set fails
    worst = max(row["peak_tree_rss_mib"] for result in results for row in result["stages"])
    print(
        f"\nlargest peak of any stage: {worst:,.0f} MiB (target <= {TARGET_MIB:,.0f} MiB): "
        + ("met" if worst <= TARGET_MIB else f"missed by {worst - TARGET_MIB:,.0f} MiB")
    )
    path = write_results(
        "memory", {"machine": machine(), "sets": results, "largest_peak_mib": worst, "target_mib": TARGET_MIB}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
