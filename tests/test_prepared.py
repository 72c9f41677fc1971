"""data/prepared as the stages after preprocess read it: damaged files are named, with the command that
rebuilds them, instead of a traceback deep inside training; the stage functions are called in-process."""

from __future__ import annotations

import json
import re
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
    splits = {
        split: (rng.integers(0, 256, (n, 1, 12, 12), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3)
        for split, n in (("train", 30), ("val", 6), ("test", 9))
    }
    meta = {
        "dataset": "imagefolder",
        "class_names": ["a", "b", "c"],
        "image_shape": [1, 12, 12],
        "counts": {},
        "mean": [0.5],
        "std": [0.25],
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_prepared(directory, splits, meta)


def damage_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: (d / "meta.json").write_text("{not json"), "meta.json: not valid JSON"),
        (lambda d: damage_meta(d, class_names=["only"]), "class_names must be a list of at least two distinct names"),
        (lambda d: damage_meta(d, image_shape=[2, 12, 12]), "image_shape must be [channels (1 or 3), height, width]"),
        (lambda d: damage_meta(d, mean=[0.5, 0.5]), "mean must hold 1 number(s)"),
        (lambda d: damage_meta(d, std=[0.0]), "std finite and positive, found [0.5], [0.0]"),
        (lambda d: damage_meta(d, mean=[float("nan")]), "mean must be finite"),
        (lambda d: np.save(d / "test_labels.npy", np.zeros(0, np.int64)), "test_labels.npy: expected 9 int64 labels"),
        (
            lambda d: [
                np.save(d / f"test_{k}.npy", a)
                for k, a in (("images", np.zeros((0, 1, 12, 12), np.uint8)), ("labels", np.zeros(0, np.int64)))
            ],
            "the test split is empty",
        ),
        (
            lambda d: (
                np.savez(d / "train_images.npy", a=np.zeros(3))
                or (d / "train_images.npy.npz").rename(d / "train_images.npy")
            ),
            "not a readable .npy array (ValueError: the magic string is not correct",
        ),
        # The images are read by rows, not loaded: a short file, pickled objects and Fortran order are refused.
        (
            lambda d: (d / "train_images.npy").write_bytes((d / "train_images.npy").read_bytes()[:-10]),
            "truncated: the header says 30 rows of 144 bytes",
        ),
        (
            lambda d: np.save(d / "train_images.npy", np.array([{"a": 1}] * 30, dtype=object)),
            "holds Python objects (a pickle); refused",
        ),
        (
            lambda d: np.save(d / "train_images.npy", np.asfortranarray(np.zeros((30, 1, 12, 12), np.uint8))),
            "expected a C-ordered array",
        ),
        (lambda d: (d / "train_images.npy").unlink(), "train_images.npy: missing (the train split is needed here)"),
        (
            lambda d: np.save(d / "train_images.npy", np.zeros((30, 1, 12, 12), np.float32)),
            "expected uint8 images of shape (N, 1, 12, 12), found float32",
        ),
        (lambda d: np.save(d / "train_images.npy", np.zeros((30, 1, 10, 12), np.uint8)), "found uint8 (30, 1, 10, 12)"),
        (lambda d: np.save(d / "train_labels.npy", np.arange(29, dtype=np.int64) % 3), "expected 30 int64 labels"),
        (
            lambda d: np.save(d / "train_labels.npy", np.arange(30, dtype=np.int64)),
            "labels must lie in 0..2, found 0..29",
        ),
        (lambda d: (d / "train_labels.npy").write_bytes(b"\x93NUMPY garbage"), "not a readable .npy array"),
        (
            lambda d: np.save(d / "train_labels.npy", np.array([{"a": 1}] * 30, dtype=object)),
            "not a readable .npy array",
        ),
    ],
)
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
    params = real_params(
        train={"model": "convnet", "width": 8, "epochs": 1, "min_steps": 0, "batch_size": 10, "log_images": 4},
        evaluate={"tta": False},
    )
    train(params, paths)
    assert paths.checkpoint.is_file() and len(list(paths.tensorboard_dir.iterdir())) == 1
    train(params, paths)  # a second direct run replaces the TensorBoard log instead of adding another
    assert len(list(paths.tensorboard_dir.iterdir())) == 1
    evaluate(params, paths)
    result = json.loads((paths.metrics_dir / "eval.json").read_text())
    per_class = (paths.metrics_dir / "per_class.csv").read_text().splitlines()
    assert result["test"]["images"] == 9 and [row.split(",")[0] for row in per_class[1:]] == ["a", "b", "c"]


def test_evaluate_refuses_a_model_trained_on_other_classes(tmp_path):
    paths = ProjectPaths(tmp_path)
    paths.prepared_dir.mkdir(parents=True)
    params = real_params(
        train={"model": "lenet", "epochs": 1, "min_steps": 0, "batch_size": 10, "log_images": 0},
        data={"dataset": "imagefolder", "source": "x.tar", "image_size": 16},
    )
    # LeNet needs 16 pixels: make the data that size, train, then relabel the data's classes.
    rng = np.random.default_rng(1)
    splits = {
        s: (rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8), np.arange(12, dtype=np.int64) % 3)
        for s in ("train", "test")
    }
    save_prepared(
        paths.prepared_dir,
        splits,
        {"dataset": "x", "class_names": ["a", "b", "c"], "image_shape": [1, 16, 16], "mean": [0.5], "std": [0.25]},
    )
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
    params = real_params(
        train={"model": "convnet", "width": 8, "epochs": 1, "min_steps": 0, "batch_size": 10, "log_images": 0},
        evaluate={"tta": False},
    )
    train(params, paths)
    evaluate(params, paths)
    result = json.loads((paths.metrics_dir / "eval.json").read_text())
    per_class = {
        row.split(",")[0]: row.split(",")[1] for row in (paths.metrics_dir / "per_class.csv").read_text().split()
    }
    assert per_class["c"] == "" and per_class["a"] != ""  # no test image of c: an empty cell, not 0
    assert result["weakest_class"] in {"a", "b"}  # the class without test images is not the weakest
    assert "no test images of class(es) ['c']" in capsys.readouterr().out


def test_ctrl_c_stops_at_a_step_boundary_and_the_next_run_ends_with_the_same_weights(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch

    straight, stopped = ProjectPaths(tmp_path / "a"), ProjectPaths(tmp_path / "b")
    rng = np.random.default_rng(0)
    splits = {
        split: (rng.integers(0, 256, (n, 1, 12, 12), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3)
        for split, n in (("train", 1500), ("val", 30), ("test", 30))
    }
    for paths in (straight, stopped):
        paths.prepared_dir.mkdir(parents=True)
        save_prepared(
            paths.prepared_dir,
            splits,
            {"dataset": "x", "class_names": ["a", "b", "c"], "image_shape": [1, 12, 12], "mean": [0.5], "std": [0.25]},
        )
    shrink = {"model": "convnet", "width": 8, "epochs": 3, "min_steps": 0, "batch_size": 10, "log_images": 0}
    params = real_params(train=shrink)
    train(params, straight)

    text = (REPO_ROOT / "params.yaml").read_text()
    for key, value in shrink.items():  # the train section's first line of each key, whatever its committed value
        text = re.sub(rf"^  {key}: \S+", f"  {key}: {value}", text, count=1, flags=re.MULTILINE)
    (stopped.root / "params.yaml").write_text(text)
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py")],
        cwd=stopped.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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


# ------------------------------------------------------------------------------ bounded memory (streaming)


def test_npy_reader_reads_rows_like_numpy_in_any_order(tmp_path):
    from imgcls.arrays import NpyReader

    array = np.random.default_rng(0).integers(0, 256, (50, 3, 4, 5), dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    reader = NpyReader(tmp_path / "a.npy")
    assert reader.shape == array.shape and len(reader) == 50 and reader.nbytes == array.nbytes
    index = np.array([7, 3, 4, 5, 49, 0, 3, 6])  # unsorted, a consecutive run, a repeat
    assert np.array_equal(reader.take(index), array[index])
    assert np.array_equal(reader[10:20], array[10:20]) and np.array_equal(reader[-1], array[-1])
    assert np.array_equal(reader[::7], array[::7]) and np.array_equal(reader.load(), array)
    assert reader.take(np.array([], dtype=np.int64)).shape == (0, 3, 4, 5)
    with pytest.raises(IndexError):
        reader.take(np.array([50]))
    assert np.array_equal(NpyReader(tmp_path / "a.npy", rows=5).load(), array[:5])  # spare capacity unread


def test_streamed_preprocess_writes_the_arrays_and_statistics_of_the_in_memory_one(tmp_path, monkeypatch):
    """Tiny chunks, two workers and a skipped bad file: the streamed stage must write exactly what decoding
    everything in memory and splitting it (the previous implementation) writes."""
    from conftest import make_image_folder

    from imgcls.preprocess import imagefolder, write
    from imgcls.preprocess.images import decode_image
    from imgcls.preprocess.splits import build_meta, channel_stats, make_splits
    from imgcls.preprocess.stage import preprocess

    root = make_image_folder(
        tmp_path / "data" / "raw" / "images" / "pets",
        classes=("a", "b", "c"),
        per_class=9,
        splits=("train",),
        noise=True,
    )
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "data" / "raw" / "source.json").write_text(json.dumps({"dataset": "imagefolder"}))
    monkeypatch.setattr(imagefolder, "CHUNK_BYTES", 3 * 10 * 10 * 4)  # 4 images per decode chunk
    monkeypatch.setattr(write, "COPY_CHUNK_BYTES", 3 * 10 * 10 * 3)  # 3 images per copy chunk
    params = real_params(
        data={"dataset": "imagefolder", "source": "x", "image_size": 10, "on_bad_image": "skip", "test_fraction": 0.25},
        preprocess={"val_fraction": 0.2},
    )
    paths = ProjectPaths(tmp_path)
    preprocess(params, paths)

    # The reference: every good file decoded into one in-memory array, split, statistics over the whole split.
    good = [p for c in ("a", "b", "c") for p in sorted((root / "train" / c).iterdir()) if p.name != "broken.png"]
    images = np.stack([decode_image(str(p), image_size=10, channels=3, max_pixels=10**7) for p in good])
    labels = np.array([("a", "b", "c").index(p.parent.name) for p in good], dtype=np.int64)
    from imgcls.preprocess.formats import DecodedDataset

    expected = make_splits(
        DecodedDataset({"train": (images, labels)}, ["a", "b", "c"]),
        val_fraction=0.2,
        test_fraction=0.25,
        limit=0,
        seed=params.base.seed,
    )
    mean, std = channel_stats(expected["train"][0])
    prepared = load_prepared(paths.prepared_dir, ("train", "val", "test"))
    for split, (split_images, split_labels) in expected.items():
        assert np.array_equal(prepared.splits[split][0].load(), split_images), split
        assert np.array_equal(prepared.splits[split][1], split_labels), split
    assert prepared.meta["mean"] == mean and prepared.meta["std"] == std
    assert prepared.meta["source"] == {"dataset": "imagefolder"}  # the download stage's provenance, kept
    assert (
        prepared.meta["counts"]
        == build_meta(
            dataset="imagefolder",
            class_names=["a", "b", "c"],
            image_shape=[3, 10, 10],
            mean=mean,
            std=std,
            labels={s: split_labels for s, (_, split_labels) in expected.items()},
        )["counts"]
    )
    assert sorted(p.name for p in paths.prepared_dir.iterdir()) == sorted(
        [f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("images", "labels")]
        + [f"{s}_files.json" for s in ("train", "val", "test")]
        + ["meta.json"]
    )
    # Each prepared image names the file it came from (the reports that list images use it): every good
    # file exactly once, in its class folder, the skipped broken one nowhere.
    from imgcls.prepared import load_names

    names = {s: load_names(paths.prepared_dir, s, len(prepared.splits[s][1])) for s in ("train", "val", "test")}
    every = sorted(n for split_names in names.values() for n in split_names)
    assert every == sorted(f"pets/train/{p.parent.name}/{p.name}" for p in good), every[:5]
    for split in names:
        labels = prepared.splits[split][1]
        assert [n.split("/")[2] for n in names[split]] == [["a", "b", "c"][c] for c in labels], split


def test_training_from_disk_gives_the_weights_and_metrics_of_training_in_memory(tmp_path):
    import torch

    runs = {}
    for mode in ("always", "never"):
        paths = ProjectPaths(tmp_path / mode)
        write_good(paths.prepared_dir)
        params = real_params(
            train={
                "model": "fast",
                "width": 8,
                "epochs": 2,
                "min_steps": 0,
                "batch_size": 8,
                "log_images": 4,
                "in_memory": mode,
            },
            evaluate={"tta": False},
        )
        train(params, paths)
        evaluate(params, paths)
        curves = sorted((paths.train_log_dir / "plots" / "metrics").rglob("*.tsv"))
        runs[mode] = (
            torch.load(paths.checkpoint, weights_only=True)["state_dict"],
            json.loads((paths.metrics_dir / "eval.json").read_text()),
            [(p.relative_to(paths.train_log_dir), p.read_text().splitlines()) for p in curves],
        )
    (a, eval_a, log_a), (b, eval_b, log_b) = runs["always"], runs["never"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # translate + flip augmentation, whitening init: same pixels
    assert eval_a == eval_b and log_a == log_b and len(log_a) == 4  # train and val loss/accuracy curves


def test_in_memory_auto_keeps_small_splits_resident_and_streams_large_ones():
    from imgcls.train.batches import RESIDENT_MAX_BYTES, keep_resident

    assert keep_resident("auto", 10 << 20, 24 << 30) and not keep_resident("auto", RESIDENT_MAX_BYTES + 1, 24 << 30)
    assert not keep_resident("auto", 600 << 20, 2 << 30)  # over a quarter of what is free
    assert keep_resident("always", 10 << 40, 1) and not keep_resident("never", 1, 24 << 30)
