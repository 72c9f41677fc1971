"""`imgcls predict` on the inputs a user has: files, folders, globs, archives, a video, a camera; the
exported model describes itself; the int8 model; and the proof that predict and evaluate see the same
pixels (a PNG round trip of the prepared test images gives the evaluate stage's predictions exactly)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import real_params
from PIL import Image

from imgcls.paths import ProjectPaths

CLASSES = ["red", "green", "blue"]
SIZE = 16


def coloured(label: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """An (H, W, 3) uint8 picture dominated by the class colour, with noise."""
    image = rng.integers(0, 90, (size, size, 3))
    image[:, :, label] += 150
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A trained and exported model (3 colour classes, 16 px RGB): train, evaluate and export in-process."""
    from imgcls.deploy.stage import export
    from imgcls.evaluate.stage import evaluate
    from imgcls.prepared import save_prepared
    from imgcls.train.stage import train

    root = tmp_path_factory.mktemp("predict-project")
    paths = ProjectPaths(root)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 240), ("val", 200), ("test", 60)):
        labels = np.arange(n, dtype=np.int64) % 3
        splits[split] = (np.stack([coloured(int(label), rng).transpose(2, 0, 1) for label in labels]), labels)
    paths.prepared_dir.mkdir(parents=True)
    mean = (splits["train"][0].reshape(len(splits["train"][0]), 3, -1).mean(axis=(0, 2)) / 255).tolist()
    save_prepared(
        paths.prepared_dir,
        splits,
        {"dataset": "colours", "class_names": CLASSES, "image_shape": [3, SIZE, SIZE], "mean": mean, "std": [0.3] * 3},
    )
    params = real_params(
        train={
            "model": "convnet",
            "optimizer": "sgd",  # the recipe these colours were tuned with (the small-CNN recipe is AdamW now)
            "lr": 0.1,
            "weight_decay": 0.0005,
            "schedule": "linear",
            "width": 8,
            "epochs": 8,
            "min_steps": 0,
            "batch_size": 16,
            "log_images": 0,
            "precision": "fp32",
        },
        evaluate={"tta": False},
        export={"parity_images": 60, "latency_calls": 200},
    )
    train(params, paths)
    evaluate(params, paths)
    export(params, paths)
    return paths, splits


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """`imgcls predict ARGV` in-process, through the function the console command calls; (exit status,
    stdout, stderr). test_the_console_command_runs_predict covers the installed command itself."""
    from imgcls.predict.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse refusals
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def save_png(path: Path, label: int = 0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coloured(label, np.random.default_rng(seed))).save(path)
    return path


@pytest.fixture
def torch_threads_kept():
    """Loading a TorchScript file or a checkpoint sets torch's thread count (as the command does); in-process,
    the rest of the session keeps its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def onnx_model(paths: ProjectPaths) -> str:
    return str(paths.export_dir / "model.onnx")


def onnx_metadata(paths: ProjectPaths) -> str:
    import onnx

    return {p.key: p.value for p in onnx.load(onnx_model(paths)).metadata_props}["imgcls"]


def test_png_round_trip_gives_exactly_the_evaluate_stage_predictions(project, tmp_path, capsys):
    paths, splits = project
    images, labels = splits["test"]
    folder = tmp_path / "test"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / CLASSES[label] / f"{i:03d}.png")
    code, out, err = run_main(capsys, str(folder), "--model", onnx_model(paths), "--output", str(tmp_path / "p.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "p.json").read_text())
    by_index = {int(Path(r["source"]).stem): r["top"][0] for r in rows}
    with open(paths.metrics_dir / "test_predictions.csv") as f:
        evaluated = list(csv.DictReader(f))
    assert [by_index[i]["class"] for i in range(len(images))] == [row["predicted"] for row in evaluated]
    # The same calibrated probability from both: the temperature travels in the ONNX metadata and both apply
    # it (within the graph's parity tolerance); and it is a real calibration, not 1 (the fixture's 200
    # validation images are what MIN_CALIBRATION_IMAGES asks for).
    temperature = json.loads(onnx_metadata(paths))["temperature"]
    assert temperature != 1.0 and 0.01 <= temperature <= 100
    predicted = np.array([by_index[i]["probability"] for i in range(len(images))])
    np.testing.assert_allclose(predicted, [float(row["confidence"]) for row in evaluated], atol=2e-4)
    accuracy = json.loads((paths.metrics_dir / "eval.json").read_text())["test"]["accuracy"]
    assert f"accuracy {accuracy:.4f} on {len(images)}" in out
    assert all(r["true_class"] == CLASSES[labels[int(Path(r["source"]).stem)]] for r in rows)


def test_the_onnx_file_describes_itself(project):
    import onnx

    paths, _ = project
    for graph in ("model.onnx", "model.int8.onnx"):  # each key once: the full check refuses duplicates
        loaded = onnx.load(str(paths.export_dir / graph))
        onnx.checker.check_model(loaded, full_check=True)
        assert [p.key for p in loaded.metadata_props].count("imgcls") == 1, graph
    metadata = {p.key: p.value for p in onnx.load(onnx_model(paths)).metadata_props}
    facts = json.loads(metadata["imgcls"])
    assert facts["class_names"] == CLASSES and facts["image_size"] == SIZE and facts["channels"] == 3
    assert facts["dataset"] == "colours" and 0 <= facts["test_accuracy"] <= 1 and facts["tta"] == "none"
    exported = json.loads((paths.metrics_dir / "export.json").read_text())
    assert exported["fp32"]["test_accuracy"] == facts["test_accuracy"] and exported["tta"] == "none"
    card = (paths.metrics_dir / "model_card.md").read_text()
    assert card == (paths.export_dir / "model_card.md").read_text()
    for fragment in ("red", "Intended use", "Known limits", f"{SIZE}x{SIZE}", "colours", "points lower than fp32"):
        assert fragment in card


def test_files_globs_jpeg_and_the_output_formats(project, tmp_path, capsys):
    paths, _ = project
    rng = np.random.default_rng(5)
    Image.fromarray(coloured(0, rng, 40)).save(tmp_path / "a.jpg", quality=95)  # JPEG, other size: resized
    Image.fromarray(coloured(2, rng, 30)).convert("RGBA").save(tmp_path / "b.png")
    Image.fromarray(coloured(1, rng, 24)).save(tmp_path / "c.png")
    code, out, err = run_main(
        capsys,
        str(tmp_path / "a.jpg"),
        str(tmp_path / "*.png"),
        "--model",
        onnx_model(paths),
        "--top-k",
        "2",
        "--output",
        str(tmp_path / "out.csv"),
    )
    assert code == 0, err
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["source"]).name for r in rows] == ["a.jpg", "b.png", "c.png"]
    assert [r["class_1"] for r in rows] == ["red", "blue", "green"]
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)
    code, _, err = run_main(
        capsys, str(tmp_path / "c.png"), "--model", onnx_model(paths), "--output", str(tmp_path / "o.jsonl")
    )
    assert code == 0 and json.loads((tmp_path / "o.jsonl").read_text())["top"][0]["class"] == "green"


def test_archives_are_read_under_the_download_rules(project, tmp_path, capsys):
    paths, _ = project
    rng = np.random.default_rng(6)
    buffer = io.BytesIO()
    Image.fromarray(coloured(2, rng)).save(buffer, format="PNG")
    with zipfile.ZipFile(tmp_path / "batch.zip", "w") as archive:
        archive.writestr("blue/x.png", buffer.getvalue())
        archive.writestr("notes.txt", "not an image")
    with tarfile.open(tmp_path / "batch.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("inner/y.png")
        info.size = len(buffer.getvalue())
        archive.addfile(info, io.BytesIO(buffer.getvalue()))
    code, out, err = run_main(
        capsys, str(tmp_path / "batch.zip"), str(tmp_path / "batch.tar.gz"), "--model", onnx_model(paths)
    )
    assert code == 0, err
    assert "batch.zip:blue/x.png" in out and "batch.tar.gz:inner/y.png" in out and "2 images" in out
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../escape.png", buffer.getvalue())
    code, _, err = run_main(capsys, str(tmp_path / "evil.zip"), "--model", onnx_model(paths))
    assert code == 1 and "'..'" in err and "escape" in err and not (tmp_path.parent / "escape.png").exists()


def test_a_video_file_every_nth_frame(project, tmp_path, capsys):
    import av

    paths, _ = project
    rng = np.random.default_rng(7)
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):  # 4 frames of each colour
            picture = np.kron(coloured(i // 4, rng, 16), np.ones((3, 4, 1), np.uint8))  # 48x64
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    code, out, err = run_main(
        capsys, str(video), "--every", "2", "--model", onnx_model(paths), "--output", str(tmp_path / "v.json")
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "v.json").read_text())
    assert [r["source"].rsplit("=", 1)[1] for r in rows] == ["0", "2", "4", "6", "8", "10"]
    assert [r["top"][0]["class"] for r in rows] == ["red", "red", "green", "green", "blue", "blue"]


def test_bad_input_is_named_and_the_rest_still_run(project, tmp_path, capsys):
    paths, _ = project
    rng = np.random.default_rng(8)
    Image.fromarray(coloured(0, rng)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = run_main(capsys, str(tmp_path), "--model", onnx_model(paths))
    assert code == 1 and "broken.png" in err and "1 images" in out and "1 unreadable" in out
    code, _, _ = run_main(capsys, str(tmp_path), "--model", onnx_model(paths), "--skip-bad")
    assert code == 0
    code, _, err = run_main(capsys, str(tmp_path / "nothing-here"), "--model", onnx_model(paths))
    assert code == 1 and "nothing-here" in err and "no such file" in err
    missing = tmp_path / "data" / "export" / "model.onnx"
    code, _, err = run_main(capsys, str(tmp_path / "good.png"), "--model", str(missing))
    assert code == 1 and str(missing) in err and "dvc repro" in err and "dvc pull" in err
    code, _, err = run_main(capsys, "--camera", "7", "--model", onnx_model(paths))
    assert code == 1 and "/dev/video7" in err and "does not exist" in err


def test_grayscale_pictures_are_converted_as_training_converted_them(project, tmp_path, capsys):
    paths, _ = project
    Image.new("L", (16, 16), 128).save(tmp_path / "gray.png")  # one channel: the model takes three
    Image.new("RGB", (16, 16), (128, 128, 128)).save(tmp_path / "rgb.png")
    output = tmp_path / "r.json"
    code, _, err = run_main(
        capsys,
        str(tmp_path / "gray.png"),
        str(tmp_path / "rgb.png"),
        "--model",
        onnx_model(paths),
        "--top-k",
        "3",
        "--output",
        str(output),
    )
    assert code == 0, err
    gray, rgb = json.loads(output.read_text())
    assert len(gray["top"]) == 3 and gray["top"] == rgb["top"]  # the same pixels reached the model


def test_torchscript_checkpoint_and_int8_models_agree_with_onnx(project, tmp_path, capsys, torch_threads_kept):
    paths, splits = project
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(splits["test"][0][:12]):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")
    for untrusted in (paths.export_dir / "model.torchscript.pt", paths.checkpoint):  # code-carrying formats
        code, out, err = run_main(capsys, str(folder), "--model", str(untrusted), "--output", str(tmp_path / "no.json"))
        assert code == 1 and "--trust-model" in err and "Traceback" not in err, err
        assert not (tmp_path / "no.json").exists()
    results = {}
    for name, extra in (
        ("onnx", []),
        ("torchscript", ["--model", str(paths.export_dir / "model.torchscript.pt"), "--trust-model"]),
        ("checkpoint", ["--model", str(paths.checkpoint), "--trust-model"]),
        ("int8", ["--int8"]),
    ):
        model = [] if extra and extra[0] == "--model" else ["--model", onnx_model(paths)]
        code, _, err = run_main(capsys, str(folder), *model, *extra, "--output", str(tmp_path / f"{name}.json"))
        assert code == 0, (name, err)
        results[name] = [r["top"][0]["class"] for r in json.loads((tmp_path / f"{name}.json").read_text())]
    assert results["onnx"] == results["torchscript"] == results["checkpoint"]
    assert (
        sum(a == b for a, b in zip(results["onnx"], results["int8"], strict=True)) >= 11
    )  # int8 may flip a borderline one
    exported = json.loads((paths.metrics_dir / "export.json").read_text())
    int8 = exported["int8"]
    assert int8["accuracy_drop_points"] <= max(int8["max_drop_points"], int8["noise_points"])
    assert exported["int8"]["onnx_bytes"] < exported["files"]["onnx_bytes"]


def test_the_console_command_runs_predict(project, tmp_path):
    """The installed `imgcls` command (and `python -m imgcls`) as a user runs it: the one test of the console
    entry itself; every other test calls cli.main in-process."""
    paths, splits = project
    Image.fromarray(splits["test"][0][0].transpose(1, 2, 0)).save(tmp_path / "one.png")
    arguments = [
        "predict",
        str(tmp_path / "one.png"),
        "--model",
        onnx_model(paths),
        "--output",
        str(tmp_path / "r.json"),
    ]
    for command in ([str(Path(sys.executable).parent / "imgcls")], [sys.executable, "-m", "imgcls"]):
        process = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=120)
        assert process.returncode == 0 and "1 images" in process.stdout, process.stderr
        assert json.loads((tmp_path / "r.json").read_text())[0]["top"][0]["class"] in CLASSES
        process = subprocess.run([*command, "predict"], capture_output=True, text=True, timeout=120)
        assert process.returncode == 2 and "SOURCE" in process.stderr  # argparse's refusal reaches the exit status


# --- Hostile inputs (issue 20): each test is a finding of a hostile review that it would have caught. -------------
# In-process through cli.main, as the tests above.


def test_code_carrying_model_files_are_not_even_opened_without_trust(project, tmp_path, capsys, monkeypatch):
    import torch

    paths, _ = project
    opened = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: opened.append(a))  # a crafted file's code runs in here
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a))
    image = save_png(tmp_path / "a.png")
    for model in (paths.export_dir / "model.torchscript.pt", paths.checkpoint):
        code, _, err = run_main(capsys, str(image), "--model", str(model))
        assert code == 1 and "--trust-model" in err and str(model) in err
    assert opened == []


def crafted_onnx(paths: ProjectPaths, target: Path, **changes) -> Path:
    """The project's ONNX export with its imgcls metadata changed (``changes`` None removes a field; a str
    value for key "raw" replaces the whole document)."""
    import onnx

    model = onnx.load(onnx_model(paths))
    entry = next(p for p in model.metadata_props if p.key == "imgcls")
    facts = json.loads(entry.value)
    if "raw" in changes:
        entry.value = changes["raw"]
    else:
        facts.update(changes)
        entry.value = json.dumps(facts)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"image_size": 200000}, "image_size"),  # was: allocation until the out-of-memory killer, 22.8 GB
        ({"image_size": True}, "image_size"),
        ({"image_size": 24}, "image_size"),  # within range, but the graph declares 16
        ({"channels": 1}, "channels"),  # the graph takes 3
        ({"class_names": ["a", "b"]}, "class_names"),  # the graph answers 3
        ({"class_names": ["a", "a", "b"]}, "class_names"),
        ({"raw": "{not json"}, "not valid JSON"),
        ({"raw": "[1, 2]"}, "not a JSON object"),
    ],
)
def test_crafted_onnx_metadata_is_refused_naming_the_field(project, tmp_path, capsys, changes, field):
    import resource

    paths, _ = project
    model = crafted_onnx(paths, tmp_path / "crafted.onnx", **changes)
    image = save_png(tmp_path / "a.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = run_main(capsys, str(image), "--model", str(model), "--output", str(tmp_path / "r.csv"))
    assert code == 1 and field in err and str(model) in err and "Traceback" not in err, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing sized from it
    assert not (tmp_path / "r.csv").exists()


def test_crafted_torchscript_metadata_is_one_line_even_when_trusted(project, tmp_path, capsys):
    import torch

    paths, _ = project
    module = torch.jit.load(str(paths.export_dir / "model.torchscript.pt"))
    crafted = tmp_path / "crafted.torchscript.pt"
    for document, expected in (
        ("{not json", "not valid JSON"),
        (json.dumps({"class_names": ["a", "b"], "image_size": 16, "channels": 3}), "logits of shape"),
    ):
        module.save(str(crafted), _extra_files={"imgcls.json": document})
        code, _, err = run_main(capsys, str(save_png(tmp_path / "a.png")), "--model", str(crafted), "--trust-model")
        assert code == 1 and expected in err and "Traceback" not in err, err


def test_output_never_deletes_neighbours_that_look_like_temporaries(project, tmp_path, capsys):
    paths, _ = project
    image = save_png(tmp_path / "in" / "a.png")
    out_dir = tmp_path / "reports"
    out_dir.mkdir()
    precious = [
        out_dir / ".report.csv.old",
        out_dir / ".report.csv.999999999.abcd.tmp",
        out_dir / ".report.csv.imgcls.999999999.abcd1234.tmp",
    ]
    for folder in precious:
        folder.mkdir()
        (folder / "mine.txt").write_text("the user's")
    code, _, err = run_main(capsys, str(image), "--model", onnx_model(paths), "--output", str(out_dir / "report.csv"))
    assert code == 0, err
    assert all((folder / "mine.txt").read_text() == "the user's" for folder in precious)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["report.csv"] + [p.name for p in precious])


def test_a_fifo_among_images_neither_hangs_nor_is_opened(project, tmp_path, capsys):
    import os
    import signal

    paths, _ = project
    folder = tmp_path / "imgs"
    save_png(folder / "a.png")
    os.mkfifo(folder / "p.png")  # opening it for reading would wait for a writer forever
    signal.alarm(60)  # a hang fails the test instead of the whole run
    try:
        code, out, err = run_main(capsys, str(folder), "--model", onnx_model(paths))
        assert code == 1 and "p.png" in err and "not a regular file" in err and "1 images" in out
        code, _, err = run_main(capsys, str(folder / "p.png"), "--model", onnx_model(paths))
        assert code == 1 and "not a regular file" in err
    finally:
        signal.alarm(0)


def test_globs_and_folders_never_follow_links_to_folders(project, tmp_path, capsys):
    import os

    from imgcls.predict.sources import glob_images

    paths, _ = project
    root = tmp_path / "d"
    save_png(root / "a" / "b" / "x.png")
    save_png(root / "y.png")
    os.symlink("../..", root / "a" / "b" / "up")  # two links to ancestors: glob.glob walks 2^40 paths
    os.symlink("..", root / "a" / "back")
    assert glob_images(f"{root}/**/*.png") == [root / "a" / "b" / "x.png", root / "y.png"]
    assert glob_images(f"{root}/*/b/*.png") == [root / "a" / "b" / "x.png"]
    assert glob_images(f"{root}/*.png") == [root / "y.png"]
    code, out, err = run_main(capsys, f"{root}/**/*.png", "--model", onnx_model(paths))
    assert code == 0 and "2 images" in out, err
    code, out, err = run_main(capsys, str(root), "--model", onnx_model(paths))  # a folder: links reported, not walked
    assert code == 1 and "2 images" in out and "a link to a folder: not followed" in err and "2 unreadable" in out


def test_names_with_terminal_escapes_and_undecodable_bytes(project, tmp_path, capsys):
    import os

    paths, _ = project
    folder = tmp_path / "imgs"
    save_png(folder / "evil\x1b[2J\nname.png")
    save_png(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")))  # Latin-1 bytes: not UTF-8
    for suffix in (".csv", ".json", ".jsonl"):
        output = tmp_path / f"out{suffix}"
        code, out, err = run_main(capsys, str(folder), "--model", onnx_model(paths), "--output", str(output))
        assert code == 0 and "\x1b" not in out + err and "\\x1b[2J\\nname.png" in out, err
        assert b"caf\xe9.png" in output.read_bytes() or b"caf\\udce9.png" in output.read_bytes()
    rows = json.loads((tmp_path / "out.json").read_text())
    assert len(rows) == 2 and {os.fsencode(r["source"]).endswith(b"caf\xe9.png") for r in rows} == {True, False}


def test_an_output_that_cannot_be_written_fails_before_any_inference(project, tmp_path, capsys, monkeypatch):
    from imgcls.predict import cli

    paths, _ = project
    image = save_png(tmp_path / "a.png")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("inference started"))
    (tmp_path / "results.csv").mkdir()
    code, _, err = run_main(capsys, str(image), "--model", onnx_model(paths), "--output", str(tmp_path / "results.csv"))
    assert code == 2 and "is a folder" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(
        capsys, str(image), "--model", onnx_model(paths), "--output", str(tmp_path / "file" / "r.csv")
    )
    assert code == 1 and "Traceback" not in err and "file" in err


def _decode_or_die(jobs, image_size, channels, resize):
    """A decode task whose worker is killed (as by the out-of-memory killer) when it meets die.png."""
    import os

    from imgcls.predict.sources import Item

    if any(name.endswith("die.png") for _, name, _ in jobs):
        os._exit(9)
    return [Item(name, label, np.zeros((channels, image_size, image_size), np.uint8)) for _, name, label in jobs]


def test_a_killed_decode_worker_is_one_line_and_finished_rows_are_kept(project, tmp_path, capsys, monkeypatch):
    from imgcls.predict import sources

    paths, _ = project
    folder = tmp_path / "imgs"
    for name in ("a", "b", "c", "d", "die", "e"):
        save_png(folder / f"{name}.png")
    monkeypatch.setattr(sources, "FILES_PER_TASK", 2)
    monkeypatch.setattr(sources, "_decode_files", _decode_or_die)
    monkeypatch.setattr(sources.os, "cpu_count", lambda: 2)
    code, _, err = run_main(
        capsys,
        str(folder),
        "--model",
        onnx_model(paths),
        "--threads",
        "2",
        "--batch-size",
        "1",
        "--output",
        str(tmp_path / "r.jsonl"),
    )
    assert code == 1 and "worker process died" in err and "Traceback" not in err, err
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [Path(r["source"]).name for r in rows][:2] == ["a.png", "b.png"] and "kept the" in err


def test_decode_workers_never_outnumber_the_work_or_the_cores(monkeypatch, tmp_path, capsys):
    from imgcls.predict import cli, sources

    created = []

    class Recorder(sources.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            created.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(sources, "ProcessPoolExecutor", Recorder)
    jobs = [sources.FileJob(save_png(tmp_path / f"{i}.png", seed=i), f"{i}.png", None) for i in range(3)]
    assert len(list(sources.decode_jobs(jobs, image_size=8, channels=3, workers=64))) == 3 and created == []
    monkeypatch.setattr(sources, "FILES_PER_TASK", 1)
    assert len(list(sources.decode_jobs(jobs, image_size=8, channels=3, workers=64))) == 3
    assert created == [min(3, __import__("os").cpu_count())]
    code, _, err = run_main(capsys, str(tmp_path), "--threads", "-1")
    assert code == 2 and "--threads" in err
    assert cli.MAX_THREADS >= 64


def test_sources_that_yield_no_image_exit_1(project, tmp_path, capsys):
    paths, _ = project
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("notes.txt", "no pictures here")
    code, _, err = run_main(capsys, str(tmp_path / "empty.zip"), "--model", onnx_model(paths))
    assert code == 1 and "empty.zip" in err and "without images" in err


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])  # SIGHUP: the terminal or SSH session closed
def test_a_stop_signal_removes_the_scratch_folder_and_keeps_finished_rows(project, tmp_path, stop):
    import os
    import signal
    import time

    paths, _ = project
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(coloured(1, np.random.default_rng(1))).save(buffer, format="PNG")
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as archive:
        for i in range(3000):
            archive.writestr(f"{i:05d}.png", buffer.getvalue())
    script = Path(sys.executable).parent / "imgcls"
    process = subprocess.Popen(
        [
            str(script),
            "predict",
            str(tmp_path / "many.zip"),
            "--model",
            onnx_model(paths),
            "--batch-size",
            "1",
            "--quiet",
            "--output",
            str(tmp_path / "r.jsonl"),
        ],
        env=dict(os.environ, TMPDIR=str(scratch_parent)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is predicting: rows are being written
        temporaries = list(tmp_path.glob(".r.jsonl.imgcls.*.tmp"))
        if temporaries and temporaries[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    assert list(scratch_parent.glob("imgcls-predict-*")), "predict never started"
    process.send_signal(signal.Signals[stop])
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.Signals[stop] and f"terminated ({stop})" in err, err
    assert "Traceback" not in err
    assert list(scratch_parent.glob("imgcls-predict-*")) == []  # the extracted archive is gone
    rows = (tmp_path / "r.jsonl").read_text().splitlines()
    assert 0 < len(rows) < 3000 and all(
        json.loads(row)["source"].startswith(str(tmp_path / "many.zip")) for row in rows
    )
    assert list(tmp_path.glob(".r.jsonl.*")) == []


def hostile_onnx(path: Path, make_nodes, *, batch: int | str = "N", opset: int = 17) -> Path:
    """A small graph (N, 3, 16, 16) -> (N, 3) with correct imgcls metadata around nodes a stranger wrote:
    ``make_nodes(h, nh)`` returns the nodes from ``m`` (N, 3: the image's channel means) to ``y``."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes = [h.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)] + make_nodes(h, nh)
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    model.metadata_props.append(
        onnx.StringStringEntryProto(
            key="imgcls", value=json.dumps({"class_names": CLASSES, "image_size": SIZE, "channels": 3})
        )
    )
    onnx.save(model, str(path))
    return path


def endless_loop(h, nh):
    from onnx import TensorProto

    body = h.make_graph(
        [h.make_node("Identity", ["c"], ["c2"]), h.make_node("Identity", ["acc"], ["acc2"])],
        "body",
        [
            h.make_tensor_value_info("i", TensorProto.INT64, []),
            h.make_tensor_value_info("c", TensorProto.BOOL, []),
            h.make_tensor_value_info("acc", TensorProto.FLOAT, ["N", 3]),
        ],
        [
            h.make_tensor_value_info("c2", TensorProto.BOOL, []),
            h.make_tensor_value_info("acc2", TensorProto.FLOAT, ["N", 3]),
        ],
    )
    return [
        h.make_node("Constant", [], ["M"], value=nh.from_array(np.array(10**15, np.int64))),
        h.make_node("Constant", [], ["cond"], value=nh.from_array(np.array(True))),
        h.make_node("Loop", ["M", "cond", "m"], ["y"], body=body),
    ]


def test_an_onnx_graph_that_never_ends_is_stopped_by_its_time_limit_and_by_sigterm(tmp_path, capsys, monkeypatch):
    import os
    import signal
    import threading
    import time

    from imgcls.predict import models

    model = hostile_onnx(tmp_path / "loop.onnx", endless_loop)  # 458 bytes, "needs no trust", runs for ever
    image = save_png(tmp_path / "a.png")
    monkeypatch.setattr(models, "PROBE_SECONDS", 2.0)
    started = time.monotonic()
    code, _, err = run_main(capsys, str(image), "--model", str(model))
    assert code == 1 and "longer than 2 s" in err and time.monotonic() - started < 30, err
    # A stop while the runtime's C++ loop holds the call: the main thread still handles it.
    monkeypatch.setattr(models, "PROBE_SECONDS", 600.0)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    code, _, err = run_main(capsys, str(image), "--model", str(model))
    assert code == 143 and "terminated (SIGTERM)" in err and time.monotonic() - started < 30, err


def test_an_onnx_graph_asking_for_more_memory_than_the_cap_is_refused_without_allocating(tmp_path, capsys):
    import resource

    def expand(h, nh):  # (N, 3) -> (N, 3, 2^31): 24 GiB of float32 for one image
        return [
            h.make_node("Constant", [], ["axis"], value=nh.from_array(np.array([2], np.int64))),
            h.make_node("Constant", [], ["big"], value=nh.from_array(np.array([1, 3, 1 << 31], np.int64))),
            h.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
            h.make_node("Expand", ["m3", "big"], ["e"]),
            h.make_node("ReduceMean", ["e"], ["y"], axes=[2], keepdims=0),
        ]

    model = hostile_onnx(tmp_path / "expand.onnx", expand)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = run_main(capsys, str(save_png(tmp_path / "a.png")), "--model", str(model))
    assert code == 1 and "more memory" in err and "GiB" in err and "--batch-size" in err, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: under 1 GiB grew


@pytest.mark.parametrize(
    "make_nodes, batch, expected",
    [
        (
            lambda h, nh: [
                h.make_node("Constant", [], ["z"], value=nh.from_array(np.array([np.nan, 1, 2], np.float32))),
                h.make_node("Add", ["m", "z"], ["y"]),
            ],
            "N",
            "NaN or infinite logits",
        ),
        (lambda h, nh: [h.make_node("Identity", ["m"], ["y"])], 1, "failed on a batch of 2"),  # fixed batch of 1
        (
            lambda h, nh: [
                h.make_node("Constant", [], ["s"], value=nh.from_array(np.array([1, 3], np.int64))),
                h.make_node("Reshape", ["m", "s"], ["y"], name="\x1b[2J\x1b[32mmodel verified\x1b[0m\nFAKE"),
            ],
            "N",
            "failed on a batch of 2",
        ),
    ],
)
def test_graphs_that_fail_or_answer_nan_are_one_line_and_print_nothing_raw(
    tmp_path, capfd, make_nodes, batch, expected
):
    from imgcls.predict.cli import main

    model = hostile_onnx(tmp_path / "bad.onnx", make_nodes, batch=batch)
    code = main([str(save_png(tmp_path / "a.png")), "--model", str(model), "--output", str(tmp_path / "r.json")])
    out, err = capfd.readouterr()  # file descriptors: ONNX Runtime's own logger writes there, not to sys.stderr
    assert code == 1 and expected in err and "Traceback" not in err, err
    assert "\x1b" not in out + err and "FAKE" not in out + err.replace("\\nFAKE", "")
    assert not (tmp_path / "r.json").exists()


def test_a_video_that_is_a_playlist_or_concat_script_opens_nothing_else(project, tmp_path, capsys):
    import os
    import signal

    paths, _ = project
    os.mkfifo(tmp_path / "pipe.ts")  # FFmpeg's concat demuxer would open it and wait for ever
    (tmp_path / "concat.mp4").write_text("ffconcat version 1.0\nfile pipe.ts\n")
    (tmp_path / "playlist.mp4").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\npipe.ts\n#EXT-X-ENDLIST\n")
    signal.alarm(60)
    try:
        for video in ("concat.mp4", "playlist.mp4"):
            code, _, err = run_main(capsys, str(tmp_path / video), "--model", onnx_model(paths))
            assert code == 1 and "not a readable video" in err, err
    finally:
        signal.alarm(0)


def test_trees_nested_thousands_deep_are_refused_or_cut_not_a_recursion_traceback(project, tmp_path, capsys):
    import os

    paths, _ = project
    buffer = io.BytesIO()
    Image.fromarray(coloured(0, np.random.default_rng(0))).save(buffer, format="PNG")
    deep_name = "/".join(["a"] * 1100) + "/x.png"
    with tarfile.open(tmp_path / "deep.tar", "w") as archive:
        info = tarfile.TarInfo(deep_name)
        info.size = len(buffer.getvalue())
        archive.addfile(info, io.BytesIO(buffer.getvalue()))
    code, _, err = run_main(capsys, str(tmp_path / "deep.tar"), "--model", onnx_model(paths))
    assert code == 1 and "1101" in err and "64" in err and "Traceback" not in err
    folder = tmp_path / "deep"
    save_png(folder / "top.png")
    os.chdir(folder)  # a 1,100-level path is longer than PATH_MAX: build it one level at a time
    try:
        for _ in range(1100):
            os.mkdir("a")
            os.chdir("a")
        save_png(Path("x.png"))
    finally:
        os.chdir(tmp_path)
    code, out, err = run_main(capsys, str(folder), "--model", onnx_model(paths))
    assert code == 1 and "1 images" in out and "more than 64 deep" in err and "Traceback" not in err
    code, out, err = run_main(capsys, f"{folder}/**/*.png", "--model", onnx_model(paths))
    assert code == 0 and "1 images" in out and "Traceback" not in err
    remove_deep_chain(folder)  # pytest's own clean-up of old temporary folders is recursive too


def remove_deep_chain(folder: Path) -> None:
    """Remove ``folder``/a/a/.../a (any depth) bottom up, one level at a time."""
    import os
    import shutil

    depth = 0
    os.chdir(folder)
    while os.path.isdir("a"):
        os.chdir("a")
        depth += 1
    for _ in range(depth):
        for name in os.listdir("."):
            os.remove(name)
        os.chdir("..")
        os.rmdir("a")
    os.chdir(folder.parent)
    shutil.rmtree(folder)


def test_more_threads_than_cores_are_cut_to_the_cores(project, tmp_path, capsys, monkeypatch):
    import os

    paths, _ = project
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    code, _, err = run_main(
        capsys, str(save_png(tmp_path / "a.png")), "--model", onnx_model(paths), "--threads", "1024"
    )
    assert code == 0 and "--threads 1024" in err and "using 2" in err
