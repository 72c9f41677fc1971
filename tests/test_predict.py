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
from PIL import Image

from conftest import real_params
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
    for split, n in (("train", 240), ("val", 30), ("test", 60)):
        labels = np.arange(n, dtype=np.int64) % 3
        splits[split] = (np.stack([coloured(int(l), rng).transpose(2, 0, 1) for l in labels]), labels)
    paths.prepared_dir.mkdir(parents=True)
    mean = (splits["train"][0].reshape(len(splits["train"][0]), 3, -1).mean(axis=(0, 2)) / 255).tolist()
    save_prepared(paths.prepared_dir, splits, {"dataset": "colours", "class_names": CLASSES,
                                               "image_shape": [3, SIZE, SIZE], "mean": mean, "std": [0.3] * 3})
    params = real_params(train={"model": "convnet", "width": 8, "epochs": 8, "min_steps": 0, "batch_size": 16, "log_images": 0,
                                "precision": "fp32"},
                         evaluate={"tta": False}, export={"parity_images": 60, "latency_calls": 200})
    train(params, paths)
    evaluate(params, paths)
    export(params, paths)
    return paths, splits


def predict(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the installed console script as a user would."""
    script = Path(sys.executable).parent / "imgcls"
    process = subprocess.run([str(script), "predict", *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    return process.returncode, process.stdout, process.stderr


def onnx_model(paths: ProjectPaths) -> str:
    return str(paths.export_dir / "model.onnx")


def test_png_round_trip_gives_exactly_the_evaluate_stage_predictions(project, tmp_path):
    paths, splits = project
    images, labels = splits["test"]
    folder = tmp_path / "test"
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / CLASSES[label] / f"{i:03d}.png")
    code, out, err = predict(str(folder), "--model", onnx_model(paths), "--output", str(tmp_path / "p.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "p.json").read_text())
    by_index = {int(Path(r["source"]).stem): r["top"][0]["class"] for r in rows}
    with open(paths.metrics_dir / "test_predictions.csv") as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)]
    assert [by_index[i] for i in range(len(images))] == evaluated
    accuracy = json.loads((paths.metrics_dir / "eval.json").read_text())["test"]["accuracy"]
    assert f"labelled folder: accuracy {accuracy:.4f} on {len(images)}" in out
    assert all(r["true_class"] == CLASSES[labels[int(Path(r["source"]).stem)]] for r in rows)


def test_the_onnx_file_describes_itself(project):
    import onnx

    paths, _ = project
    metadata = {p.key: p.value for p in onnx.load(onnx_model(paths)).metadata_props}
    facts = json.loads(metadata["imgcls"])
    assert facts["class_names"] == CLASSES and facts["image_size"] == SIZE and facts["channels"] == 3
    assert facts["dataset"] == "colours" and 0 <= facts["test_accuracy"] <= 1 and facts["tta"] is False
    exported = json.loads((paths.metrics_dir / "export.json").read_text())
    assert exported["fp32"]["test_accuracy"] == facts["test_accuracy"] and exported["tta"] is False
    card = (paths.metrics_dir / "model_card.md").read_text()
    assert card == (paths.export_dir / "model_card.md").read_text()
    for fragment in ("red", "Intended use", "Known limits", f"{SIZE}x{SIZE}", "colours"):
        assert fragment in card


def test_files_globs_jpeg_and_the_output_formats(project, tmp_path):
    paths, _ = project
    rng = np.random.default_rng(5)
    Image.fromarray(coloured(0, rng, 40)).save(tmp_path / "a.jpg", quality=95)  # JPEG, other size: resized
    Image.fromarray(coloured(2, rng, 30)).convert("RGBA").save(tmp_path / "b.png")
    Image.fromarray(coloured(1, rng, 24)).save(tmp_path / "c.png")
    code, out, err = predict(str(tmp_path / "a.jpg"), str(tmp_path / "*.png"), "--model", onnx_model(paths),
                             "--top-k", "2", "--output", str(tmp_path / "out.csv"))
    assert code == 0, err
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["source"]).name for r in rows] == ["a.jpg", "b.png", "c.png"]
    assert [r["class_1"] for r in rows] == ["red", "blue", "green"]
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)
    code, _, err = predict(str(tmp_path / "c.png"), "--model", onnx_model(paths), "--output", str(tmp_path / "o.jsonl"))
    assert code == 0 and json.loads((tmp_path / "o.jsonl").read_text())["top"][0]["class"] == "green"


def test_archives_are_read_under_the_download_rules(project, tmp_path):
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
    code, out, err = predict(str(tmp_path / "batch.zip"), str(tmp_path / "batch.tar.gz"), "--model", onnx_model(paths))
    assert code == 0, err
    assert "batch.zip:blue/x.png" in out and "batch.tar.gz:inner/y.png" in out and "2 images" in out
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../escape.png", buffer.getvalue())
    code, _, err = predict(str(tmp_path / "evil.zip"), "--model", onnx_model(paths))
    assert code == 1 and "'..' would escape the target" in err and not (tmp_path.parent / "escape.png").exists()


def test_a_video_file_every_nth_frame(project, tmp_path):
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
    code, out, err = predict(str(video), "--every", "2", "--model", onnx_model(paths), "--output",
                             str(tmp_path / "v.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "v.json").read_text())
    assert [r["source"].rsplit("=", 1)[1] for r in rows] == ["0", "2", "4", "6", "8", "10"]
    assert [r["top"][0]["class"] for r in rows] == ["red", "red", "green", "green", "blue", "blue"]


def test_bad_input_is_named_and_the_rest_still_run(project, tmp_path):
    paths, _ = project
    rng = np.random.default_rng(8)
    Image.fromarray(coloured(0, rng)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = predict(str(tmp_path), "--model", onnx_model(paths))
    assert code == 1 and "cannot read" in err and "broken.png" in err and "1 images" in out and "1 unreadable" in out
    code, _, _ = predict(str(tmp_path), "--model", onnx_model(paths), "--skip-bad")
    assert code == 0
    code, _, err = predict(str(tmp_path / "nothing-here"), "--model", onnx_model(paths))
    assert code == 1 and "no such file or folder" in err
    code, _, err = predict(str(tmp_path / "good.png"), "--model", str(tmp_path / "data" / "export" / "model.onnx"))
    assert code == 1 and "no model at" in err and "dvc repro" in err and "dvc pull" in err
    code, _, err = predict("--camera", "7", "--model", onnx_model(paths))
    assert code == 1 and "camera 7 (/dev/video7) does not exist" in err


def test_grayscale_pictures_are_converted_as_training_converted_them(project, tmp_path):
    paths, _ = project
    Image.new("L", (16, 16), 128).save(tmp_path / "gray.png")
    code, out, err = predict(str(tmp_path / "gray.png"), "--model", onnx_model(paths))
    assert code == 0, err


def test_torchscript_checkpoint_and_int8_models_agree_with_onnx(project, tmp_path):
    paths, splits = project
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(splits["test"][0][:12]):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")
    for untrusted in (paths.export_dir / "model.torchscript.pt", paths.checkpoint):  # code-carrying formats
        code, out, err = predict(str(folder), "--model", str(untrusted), "--output", str(tmp_path / "no.json"))
        assert code == 1 and "--trust-model" in err and "Traceback" not in err, err
        assert not (tmp_path / "no.json").exists()
    results = {}
    for name, extra in (("onnx", []),
                        ("torchscript", ["--model", str(paths.export_dir / "model.torchscript.pt"), "--trust-model"]),
                        ("checkpoint", ["--model", str(paths.checkpoint), "--trust-model"]), ("int8", ["--int8"])):
        model = [] if extra and extra[0] == "--model" else ["--model", onnx_model(paths)]
        code, _, err = predict(str(folder), *model, *extra, "--output", str(tmp_path / f"{name}.json"))
        assert code == 0, (name, err)
        results[name] = [r["top"][0]["class"] for r in json.loads((tmp_path / f"{name}.json").read_text())]
    assert results["onnx"] == results["torchscript"] == results["checkpoint"]
    assert sum(a == b for a, b in zip(results["onnx"], results["int8"])) >= 11  # int8 may flip a borderline one
    exported = json.loads((paths.metrics_dir / "export.json").read_text())
    assert exported["int8"]["accuracy_drop_points"] <= exported["int8"]["max_drop_points"]
    assert exported["int8"]["onnx_bytes"] < exported["files"]["onnx_bytes"]


def test_python_dash_m_runs_the_same_command(project, tmp_path):
    paths, splits = project
    Image.fromarray(splits["test"][0][0].transpose(1, 2, 0)).save(tmp_path / "one.png")
    process = subprocess.run([sys.executable, "-m", "imgcls", "predict", str(tmp_path / "one.png"), "--model",
                              onnx_model(paths)], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0 and "1 images" in process.stdout, process.stderr
