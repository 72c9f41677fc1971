"""data/prepared as the stages after preprocess read it: damaged files are named, with the command that
rebuilds them, instead of a traceback deep inside training; the stage functions are called in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, real_params
from imgcls.errors import DataError
from imgcls.evaluate.stage import evaluate
from imgcls.paths import ProjectPaths
from imgcls.prepared import load_prepared, save_prepared
from imgcls.train.stage import train


def write_good(directory: Path) -> None:
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 1, 12, 12), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3)
              for split, n in (("train", 30), ("val", 6), ("test", 9))}
    meta = {"dataset": "imagefolder", "class_names": ["a", "b", "c"], "image_shape": [1, 12, 12],
            "counts": {}, "mean": [0.5], "std": [0.25]}
    directory.mkdir(parents=True, exist_ok=True)
    save_prepared(directory, splits, meta)


def damage_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json: not valid JSON"),
    (lambda d: damage_meta(d, class_names=["only"]), "class_names must be a list of at least two distinct names"),
    (lambda d: damage_meta(d, image_shape=[2, 12, 12]), "image_shape must be [channels (1 or 3), height, width]"),
    (lambda d: damage_meta(d, mean=[0.5, 0.5]), "mean must hold 1 number(s)"),
    (lambda d: damage_meta(d, std=[0.0]), "std finite and positive, found [0.5], [0.0]"),
    (lambda d: damage_meta(d, mean=[float("nan")]), "mean must be finite"),
    (lambda d: np.save(d / "test_labels.npy", np.zeros(0, np.int64)), "test_labels.npy: expected 9 int64 labels"),
    (lambda d: [np.save(d / f"test_{k}.npy", a) for k, a in (("images", np.zeros((0, 1, 12, 12), np.uint8)),
                                                              ("labels", np.zeros(0, np.int64)))],
     "the test split is empty"),
    (lambda d: np.savez(d / "train_images.npy", a=np.zeros(3)) or (d / "train_images.npy.npz").rename(d / "train_images.npy"),
     "not a .npy array (found NpzFile)"),
    (lambda d: (d / "train_images.npy").unlink(), "train_images.npy: missing (the train split is needed here)"),
    (lambda d: np.save(d / "train_images.npy", np.zeros((30, 1, 12, 12), np.float32)),
     "expected uint8 images of shape (N, 1, 12, 12), found float32"),
    (lambda d: np.save(d / "train_images.npy", np.zeros((30, 1, 10, 12), np.uint8)), "found uint8 (30, 1, 10, 12)"),
    (lambda d: np.save(d / "train_labels.npy", np.arange(29, dtype=np.int64) % 3), "expected 30 int64 labels"),
    (lambda d: np.save(d / "train_labels.npy", np.arange(30, dtype=np.int64)), "labels must lie in 0..2, found 0..29"),
    (lambda d: (d / "train_labels.npy").write_bytes(b"\x93NUMPY garbage"), "not a readable .npy array"),
    (lambda d: np.save(d / "train_labels.npy", np.array([{"a": 1}] * 30, dtype=object)), "not a readable .npy array"),
])
def test_damaged_prepared_data_is_named_with_the_rebuild_command(tmp_path, damage, fragment):
    write_good(tmp_path / "prepared")
    assert len(load_prepared(tmp_path / "prepared", ("train",), optional=("val",)).splits) == 2
    damage(tmp_path / "prepared")
    with pytest.raises(DataError) as caught:
        load_prepared(tmp_path / "prepared", ("train", "test"), optional=("val",))
    assert fragment in str(caught.value) and "dvc repro -f preprocess" in str(caught.value)


def test_train_and_evaluate_stage_functions_run_in_process(tmp_path):
    # The stage's work is a plain function a test calls with real params, shrunk.
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    params = real_params(train={"model": "convnet", "width": 8, "epochs": 1, "batch_size": 10, "log_images": 4},
                         evaluate={"tta": False})
    train(params, paths)
    assert paths.checkpoint.is_file() and len(list(paths.tensorboard_dir.iterdir())) == 1
    train(params, paths)  # a second direct run replaces the TensorBoard log instead of adding another
    assert len(list(paths.tensorboard_dir.iterdir())) == 1
    evaluate(params, paths)
    result = json.loads((paths.metrics_dir / "eval.json").read_text())
    assert result["test"]["images"] == 9 and set(result["per_class"]) == {"a", "b", "c"}


def test_evaluate_refuses_a_model_trained_on_other_classes(tmp_path):
    paths = ProjectPaths(tmp_path)
    paths.prepared_dir.mkdir(parents=True)
    params = real_params(train={"model": "lenet", "epochs": 1, "batch_size": 10, "log_images": 0},
                         data={"dataset": "imagefolder", "source": "x.tar", "image_size": 16})
    # LeNet needs 16 pixels: make the data that size, train, then relabel the data's classes.
    rng = np.random.default_rng(1)
    splits = {s: (rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8), np.arange(12, dtype=np.int64) % 3)
              for s in ("train", "test")}
    save_prepared(paths.prepared_dir, splits, {"dataset": "x", "class_names": ["a", "b", "c"],
                                               "image_shape": [1, 16, 16], "mean": [0.5], "std": [0.25]})
    train(params, paths)
    damage_meta(paths.prepared_dir, class_names=["cat", "dog", "emu"])
    with pytest.raises(DataError, match=r"was trained on classes \['a', 'b', 'c'\] but data/prepared holds"):
        evaluate(params, paths)
    assert not (paths.metrics_dir / "eval.json").exists()


def test_no_test_images_of_a_class_is_reported_as_null_not_zero(tmp_path, capsys):
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    labels = np.load(paths.prepared_dir / "test_labels.npy")
    np.save(paths.prepared_dir / "test_labels.npy", np.where(labels == 2, 0, labels))  # no test image of 'c'
    params = real_params(train={"model": "convnet", "width": 8, "epochs": 1, "batch_size": 10, "log_images": 0},
                         evaluate={"tta": False})
    train(params, paths)
    evaluate(params, paths)
    result = json.loads((paths.metrics_dir / "eval.json").read_text())
    assert result["per_class"]["c"]["accuracy"] is None and result["per_class"]["a"]["accuracy"] is not None
    assert "no test images of class(es) ['c']" in capsys.readouterr().out


def test_ctrl_c_stops_at_a_step_boundary_and_the_next_run_ends_with_the_same_weights(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch

    straight, stopped = ProjectPaths(tmp_path / "a"), ProjectPaths(tmp_path / "b")
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 1, 12, 12), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3)
              for split, n in (("train", 1500), ("val", 30), ("test", 30))}
    for paths in (straight, stopped):
        paths.prepared_dir.mkdir(parents=True)
        save_prepared(paths.prepared_dir, splits, {"dataset": "x", "class_names": ["a", "b", "c"],
                                                   "image_shape": [1, 12, 12], "mean": [0.5], "std": [0.25]})
    shrink = {"model": "convnet", "width": 8, "epochs": 3, "batch_size": 10, "log_images": 0}
    params = real_params(train=shrink)
    train(params, straight)

    (stopped.root / "params.yaml").write_text(
        (REPO_ROOT / "params.yaml").read_text().replace("  model: fast", "  model: convnet", 1)
        .replace("  width: 32", "  width: 8", 1).replace("  epochs: 10", "  epochs: 3", 1)
        .replace("  batch_size: 512", "  batch_size: 10", 1).replace("  log_images: 64", "  log_images: 0", 1))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "stages" / "train.py")], cwd=stopped.root,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not stopped.resume_state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # Ctrl-C during epoch 2
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Ctrl-C: stopping at the end of this step" in output and "run `dvc repro` again to continue" in output
    saved = torch.load(stopped.resume_state, weights_only=True)
    assert saved["epoch_progress"]["batches_done"] >= 1 and not stopped.checkpoint.exists()  # mid-epoch

    train(params, stopped)
    a = torch.load(straight.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(stopped.checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a) and not stopped.resume_state.parent.exists()
