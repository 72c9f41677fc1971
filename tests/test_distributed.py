"""Data-parallel training (issue 12): real torchrun, real gloo, two processes on this machine, started the
way the train stage starts them (train.processes: 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, committed_params_raw, merge

from imgcls.model.checkpoint import load_checkpoint
from imgcls.model.inference import evaluate_model
from imgcls.paths import ProjectPaths
from imgcls.prepared import load_prepared, save_prepared
from imgcls.train.batches import iterate_batches

# The fast model: its whitening layer is data-initialised and its bias freezes after whiten_bias_epochs,
# which a data-parallel run must handle (DDP all-reduces the parameters that train).
SMALL = {
    "model": "fast",
    "width": 8,
    "epochs": 3,
    "whiten_bias_epochs": 1.0,
    "min_steps": 0,
    "batch_size": 32,
    "log_images": 4,
    "precision": "fp32",
}


def make_project(root: Path, train: dict) -> ProjectPaths:
    """A project folder with prepared, learnable data (class = brightness level, plus noise) and params."""
    paths = ProjectPaths(root)
    paths.prepared_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 480), ("val", 30), ("test", 120)):
        labels = np.arange(n, dtype=np.int64) % 3
        images = np.clip(60 + 60 * labels[:, None, None, None] + rng.normal(0, 40, (n, 1, 12, 12)), 0, 255)
        splits[split] = (images.astype(np.uint8), labels)
    save_prepared(
        paths.prepared_dir,
        splits,
        {"dataset": "x", "class_names": ["a", "b", "c"], "image_shape": [1, 12, 12], "mean": [0.47], "std": [0.3]},
    )
    params = merge(committed_params_raw(), {"base": {"threads": 1}, "train": {**SMALL, **train}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return paths


def run_stage(root: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py")],
        cwd=root,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    return out


@pytest.mark.slow  # torchrun and its processes
def test_two_processes_train_like_one_and_only_rank_0_writes(tmp_path):
    one = make_project(tmp_path / "one", {"processes": 1})
    two = make_project(tmp_path / "two", {"processes": 2})
    out_one = finish(run_stage(one.root))
    process = run_stage(two.root)
    out_two = finish(process)
    assert process.returncode == 0, out_two
    assert "starting 2 processes" in out_two and "torchrun" in out_two and "rank 0 of 2 processes" in out_two
    # One writer: each epoch line once, one set of outputs, the same files as the one-process run.
    for epoch in (1, 2, 3):
        assert (
            sum(line.split()[1:2] == [str(epoch)] for line in out_two.splitlines() if line.startswith("train: ")) == 1
        )
    files = {
        root: sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "tensorboard" not in p.parts and p.name != "params.yaml"
        )
        for root in (one.root, two.root)
    }
    assert files[one.root] == files[two.root], files
    assert len(list(two.tensorboard_dir.glob("events.*"))) == 1
    model_two, checkpoint = load_checkpoint(two.checkpoint)
    assert checkpoint["extra"]["processes"] == 2
    model_one, _ = load_checkpoint(one.checkpoint)
    images, labels = load_prepared(two.prepared_dir, ("test",)).splits["test"]
    accuracies = [
        evaluate_model(
            m, images, torch.from_numpy(labels), batch_size=64, device=torch.device("cpu"), precision="fp32"
        )["accuracy"]
        for m in (model_one, model_two)
    ]
    assert accuracies[1] > 0.8 and abs(accuracies[0] - accuracies[1]) <= 0.1, (accuracies, out_one, out_two)
    # The same world size and seed: the same weights, bit for bit.
    again = run_stage(two.root)
    out_again = finish(again)
    assert again.returncode == 0, out_again
    _, repeated = load_checkpoint(two.checkpoint)
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(value, repeated["state_dict"][name]), name


def test_rank_shards_are_disjoint_and_together_the_one_process_batch():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous()
    labels = torch.arange(40)
    whole = [lab for _, lab in iterate_batches(images, labels, 8, generator=torch.Generator().manual_seed(3))]
    parts = [
        [
            lab
            for _, lab in iterate_batches(
                images, labels, 8, generator=torch.Generator().manual_seed(3), shard=(rank, 2)
            )
        ]
        for rank in (0, 1)
    ]
    for batch, first, second in zip(whole, *parts, strict=False):
        assert len(first) == len(second) == 4 and torch.equal(torch.cat([first, second]), batch)


@pytest.mark.slow  # torchrun and its processes
def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    paths = make_project(tmp_path / "bad-data", {"processes": 2})
    images = paths.prepared_dir / "train_images.npy"
    images.write_bytes(images.read_bytes()[:-1000])  # truncated: every rank fails as it loads the data
    started = time.monotonic()
    process = run_stage(paths.root)
    out = finish(process, timeout=240)
    assert process.returncode == 1 and time.monotonic() - started < 120, out
    assert "train: error: rank 0 of 2 failed: " in out or "train: error: rank 1 of 2 failed: " in out, out
    assert "train_images.npy" in out.split("train: error: rank ")[-1] and "dvc repro -f preprocess" in out, out
    assert not paths.checkpoint.exists()


def _worker(tag: str, rank: int) -> int | None:
    """The pid of the training process of ``rank`` started under ``tag`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"IMGCLS_TEST_TAG={tag}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow  # torchrun and its processes
def test_a_killed_rank_ends_the_job_with_exit_status_1_not_a_hang(tmp_path):
    paths = make_project(tmp_path / "killed", {"processes": 2, "epochs": 500})
    tag = uuid.uuid4().hex
    process = run_stage(paths.root, env=dict(os.environ, IMGCLS_TEST_TAG=tag))
    deadline = time.monotonic() + 120
    lines = []
    for line in process.stdout:  # wait until both ranks are training (epoch 1 done)
        lines.append(line)
        if line.startswith("train:     1 ") or time.monotonic() > deadline:
            break
    pid = _worker(tag, 1)
    assert pid is not None, "".join(lines)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    out = "".join(lines) + finish(process, timeout=120)
    assert process.returncode == 1, out
    assert time.monotonic() - killed < 60  # torchrun ends rank 0 at once, not after the collective timeout
    assert "train: error: " in out and "ended without a message" in out, out
    assert "Signal 9 (SIGKILL)" in out  # torchrun's root cause names the killed rank
    assert not paths.checkpoint.exists()


@pytest.mark.slow  # torchrun and its processes
def test_stopping_the_stage_stops_every_rank(tmp_path):
    # SIGTERM to the stage alone (a CI cancel, `timeout`, `kill`): torchrun and both ranks end too, none is
    # left writing into data/ while the next run starts.
    paths = make_project(tmp_path / "stopped", {"processes": 2, "epochs": 500})
    tag = uuid.uuid4().hex
    process = run_stage(paths.root, env=dict(os.environ, IMGCLS_TEST_TAG=tag))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("train:     2 "):  # epoch 1's state is saved by now
            break
    process.send_signal(signal.SIGTERM)
    out = "".join(lines) + finish(process, timeout=60)
    assert process.returncode == 130, out
    assert "stopped: torchrun ended every process" in out
    deadline = time.monotonic() + 30
    while (_worker(tag, 0) or _worker(tag, 1)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _worker(tag, 0) is None and _worker(tag, 1) is None
    assert paths.resume_state.is_file()  # rank 0 saved the finished epochs: the next run resumes from there


@pytest.mark.slow  # torchrun and its processes
def test_a_killed_stage_takes_torchrun_and_its_ranks_with_it(tmp_path):
    paths = make_project(tmp_path / "orphans", {"processes": 2, "epochs": 500})
    tag = uuid.uuid4().hex
    process = run_stage(paths.root, env=dict(os.environ, IMGCLS_TEST_TAG=tag))
    for line in process.stdout:
        if line.startswith("train:     1 "):
            break
    process.kill()  # SIGKILL: the stage cannot pass anything on
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (_worker(tag, 0) or _worker(tag, 1)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _worker(tag, 0) is None and _worker(tag, 1) is None
