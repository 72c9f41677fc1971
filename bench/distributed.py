"""Data-parallel training on this machine: the default recipe on Fashion-MNIST with 2 processes x 1 thread
(torchrun, gloo) against 1 process x 2 threads, the gradient all-reduce time per step, and the scaling one
can expect at 4, 8 and 16 workers from the measured gradient size and step time.

Prints a table and writes bench/results/distributed.json.

    .venv/bin/python bench/distributed.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine, set_params, write_results
from run import FASHION_MNIST_SOURCE, _reset, prepare, run_stages

ALL_REDUCE_CALLS = 50


def train_and_evaluate(project: Path, processes: int) -> dict:
    set_params(project, {"base": {"threads": 0}, "train": {"processes": processes}})
    run = run_stages(project, ["train", "evaluate"])
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    train = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    return {
        "processes": processes,
        "threads_per_process": (os.cpu_count() or 1) // processes,
        "test_accuracy": evaluation["test"]["accuracy"],
        "test_loss": evaluation["test"]["loss"],
        "train_seconds": train["train_seconds"],
        "steps": train["steps"],
        "step_seconds": train["train_seconds"] / train["steps"],
        "images_per_second": train["images_per_second"],
        "wall_seconds": run["seconds"],
        "peak_rss_mib": run["peak_rss_mib"],
    }


def _all_reduce_worker(rank: int, world: int, port: int, numel: int, result: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensor = torch.randn(numel)
    for _ in range(5):
        dist.all_reduce(tensor)
    dist.barrier()
    times = []
    for _ in range(ALL_REDUCE_CALLS):
        started = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - started)
    if rank == 0:
        result.write_text(json.dumps(times))
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, world: int = 2) -> float:
    """Median time of one gloo all-reduce of ``numel`` float32 values between ``world`` local processes."""
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "times.json"
        mp.spawn(_all_reduce_worker, args=(world, port, numel, result), nprocs=world, join=True)
        return statistics.median(json.loads(result.read_text()))


def projected(step_one: float, gradient_bytes: int, workers: int, bandwidth: float, latency: float) -> dict:
    """Ring all-reduce: each worker sends and receives 2 (N - 1) / N of the gradient, in 2 (N - 1) messages.
    Compute per step is the one-worker step divided by N (the global batch is fixed)."""
    compute = step_one / workers
    communicate = 2 * (workers - 1) / workers * gradient_bytes / bandwidth + 2 * (workers - 1) * latency
    step = compute + communicate
    return {
        "workers": workers,
        "step_seconds": step,
        "speedup": step_one / step,
        "efficiency": step_one / step / workers,
        "communication_share": communicate / step,
    }


def main() -> int:
    project, _ = prepare("fashion-mnist", FASHION_MNIST_SOURCE)
    set_params(project, _reset({}))  # the committed recipe (bench/run.py leaves its last recipe's params here)
    one = train_and_evaluate(project, 1)
    print(
        f"1 process x {one['threads_per_process']} threads: accuracy {one['test_accuracy']:.4f} "
        f"in {one['train_seconds']:.1f} s",
        flush=True,
    )
    two = train_and_evaluate(project, 2)
    print(
        f"2 processes x {two['threads_per_process']} thread: accuracy {two['test_accuracy']:.4f} "
        f"in {two['train_seconds']:.1f} s",
        flush=True,
    )
    set_params(project, {"train": {"processes": 1}})

    from imgcls.model.checkpoint import load_checkpoint

    _, checkpoint = load_checkpoint(project / "data" / "model" / "checkpoint.pt")
    gradient_numel = sum(
        v.numel() for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and "running_" not in k
    )
    reduce_seconds = all_reduce_seconds(gradient_numel)
    gradient_bytes = 4 * gradient_numel
    loopback_bandwidth = 2 * 0.5 * gradient_bytes / max(reduce_seconds, 1e-9)  # from the 2-worker measurement

    print()
    print(f"{'run':<28}{'test_acc':>9}{'loss':>8}{'train_s':>9}{'step_ms':>9}{'img/s':>8}{'peak_MiB':>10}")
    for row in (one, two):
        name = f"{row['processes']} process(es) x {row['threads_per_process']} thread(s)"
        print(
            f"{name:<28}{row['test_accuracy']:9.4f}{row['test_loss']:8.4f}{row['train_seconds']:9.1f}"
            f"{row['step_seconds'] * 1000:9.1f}{row['images_per_second']:8.0f}{row['peak_rss_mib']:10.0f}"
        )
    print(
        f"\naccuracy difference: {(two['test_accuracy'] - one['test_accuracy']) * 100:+.2f} points (target within 0.3)"
    )
    print(
        f"gradient: {gradient_numel:,} values ({gradient_bytes / 1e6:.2f} MB fp32); one gloo all-reduce between 2 "
        f"local processes: {reduce_seconds * 1000:.2f} ms ({reduce_seconds / two['step_seconds'] * 100:.1f}% "
        f"of a {two['step_seconds'] * 1000:.0f} ms step)"
    )
    # The projection: one worker's step (2 cores' worth of compute as measured here) split over N workers.
    scenarios = {
        "10 Gbit/s Ethernet, 50 us": (1.25e9, 50e-6),
        "same machine (measured loopback)": (loopback_bandwidth, 50e-6),
    }
    projection = {}
    print(f"\nprojected speedup of a step ({one['step_seconds'] * 1000:.0f} ms on one 2-core worker) at N workers:")
    for name, (bandwidth, latency) in scenarios.items():
        rows = [projected(one["step_seconds"], gradient_bytes, n, bandwidth, latency) for n in (2, 4, 8, 16)]
        projection[name] = rows
        print(
            f"  {name}: "
            + ", ".join(
                f"N={r['workers']}: {r['speedup']:.1f}x ({r['communication_share'] * 100:.0f}% comm.)" for r in rows
            )
        )
    payload = {
        "machine": machine(),
        "command": "bench/distributed.py",
        "rows": [one, two],
        "accuracy_difference_points": (two["test_accuracy"] - one["test_accuracy"]) * 100,
        "gradient_values": gradient_numel,
        "all_reduce_seconds": reduce_seconds,
        "all_reduce_share_of_step": reduce_seconds / two["step_seconds"],
        "projection": projection,
    }
    print(f"machine: {payload['machine']}\nwrote {write_results('distributed', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
