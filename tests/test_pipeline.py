"""End to end: the real `dvc repro` in a temporary git repository on a small subset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, SYSTEM_FASHION_MNIST, make_image_folder, make_tar
from imgcls.paths import ProjectPaths

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).with_name("dvc"))
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "src", "sources", ".dvcignore")


def sh(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    result = subprocess.run(args, cwd=project, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(tmp_path: Path, **sections) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            shutil.copy(source, project / name)
    set_params(project, **sections)
    (project / ".gitignore").write_text("/data/\n")
    sh(project, "git", "init", "-q")
    sh(project, "git", "config", "user.email", "test@example.com")
    sh(project, "git", "config", "user.name", "test")
    sh(project, DVC, "init", "-q")
    sh(project, DVC, "config", "core.analytics", "false")
    commit(project, "initial")
    return project


def set_params(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit(project: Path, message: str) -> None:
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-q", "-m", message)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_dvc_yaml_paths_agree_with_the_paths_module():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    outs = {stage: [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]
            for stage, spec in stages.items()}
    paths = ProjectPaths(Path("."))
    assert str(paths.raw_dir) in outs["download"] and str(paths.prepared_dir) in outs["preprocess"]
    assert {str(paths.model_dir), str(paths.tensorboard_dir), str(paths.train_log_dir)} <= set(outs["train"])
    assert str(paths.export_dir) in outs["export"]
    assert str(paths.metrics_dir / "eval.json") in outs["evaluate"]


@pytest.mark.skipif(not (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (make test installs it when run as root)")
def test_full_pipeline_on_a_fashion_mnist_subset(tmp_path):
    project = make_project(tmp_path, data={"limit": 2000}, train={"epochs": 3, "batch_size": 64, "log_images": 16},
                           export={"parity_images": 300, "latency_calls": 200})
    first = sh(project, DVC, "repro")
    assert ran_stages(first.stdout) == ["download", "preprocess", "train", "evaluate", "export"]

    # Outputs and their values.
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["class_names"][0] == "T-shirt/top" and meta["image_shape"] == [1, 28, 28]
    assert sum(meta["counts"]["test"].values()) == 2000 and sum(meta["counts"]["train"].values()) == 1800
    assert 0.25 < meta["mean"][0] < 0.33 and 0.3 < meta["std"][0] < 0.4  # Fashion-MNIST's known statistics
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["test"]["images"] == 2000 and 0.5 < evaluation["test"]["accuracy"] <= 1
    assert set(evaluation["per_class"]) == set(meta["class_names"])
    assert set(evaluation["per_class"]["Trouser"]) == {"accuracy", "precision", "recall"}
    per_class = (project / "metrics/per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,accuracy,precision,recall,support" and len(per_class) == 11
    exported = json.loads((project / "metrics/export.json").read_text())
    assert exported["parity"]["onnx"]["same_predictions"] and exported["parity"]["onnx"]["max_abs_logit_diff"] <= 1e-4
    assert exported["latency"]["calls"] == 200 and exported["files"]["onnx_bytes"] > 100_000
    assert (project / "data/export/model.onnx").is_file() and (project / "data/export/model.torchscript.pt").is_file()
    for picture in ("confusion_matrix.png", "misclassified.png"):
        assert (project / "metrics" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_metrics = json.loads((project / "metrics/train/metrics.json").read_text())
    assert train_metrics["step"] == 3 and "val" in train_metrics and "train_seconds" in train_metrics

    # TensorBoard's own reader finds the scalars and the image grid.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(project / "data/tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/accuracy")] == [1, 2, 3]
    assert events.Tags()["images"] == ["samples"]

    commit(project, "baseline run")
    # Nothing changed: nothing runs.
    second = sh(project, DVC, "repro")
    assert ran_stages(second.stdout) == [], second.stdout
    # A train param changes: only train, evaluate and export rerun.
    set_params(project, train={"lr": 0.2})
    third = sh(project, DVC, "repro")
    assert ran_stages(third.stdout) == ["train", "evaluate", "export"]
    params_diff = json.loads(sh(project, DVC, "params", "diff", "--json").stdout)
    assert params_diff["params.yaml"]["train.lr"]["old"] == 0.375 and params_diff["params.yaml"]["train.lr"]["new"] == 0.2
    diff = json.loads(sh(project, DVC, "metrics", "diff", "--json").stdout)
    accuracy = diff["metrics/eval.json"]["test.accuracy"]
    assert accuracy["new"] == pytest.approx(json.loads((project / "metrics/eval.json").read_text())["test"]["accuracy"])
    assert accuracy["old"] == pytest.approx(evaluation["test"]["accuracy"]) and accuracy["new"] != accuracy["old"]
    assert "per_class.Trouser.precision" in diff["metrics/eval.json"]

    # dvc plots renders the curves and the confusion matrix.
    sh(project, DVC, "plots", "show", "-o", "plots_html")
    html = (project / "plots_html" / "index.html").read_text()
    for expected in ("Loss per epoch", "Accuracy per epoch", "Test confusion matrix", "T-shirt/top", "misclassified.png"):
        assert expected in html, expected

    # A typo in an -S override stops the run with the key named: DVC refuses unknown keys itself, and a
    # key forced in with '+' is refused by the stage before any work.
    typo = sh(project, DVC, "exp", "run", "-S", "trian.lr=1", check=False)
    assert typo.returncode != 0 and "trian.lr" in typo.stdout + typo.stderr
    forced = sh(project, DVC, "exp", "run", "-S", "+train.lrr=1", check=False)
    assert forced.returncode != 0
    assert "unknown key 'train.lrr' (value 1)" in forced.stdout + forced.stderr


def test_image_folder_source_change_reruns_download(tmp_path):
    archive = make_tar(tmp_path / "bugs.tar.gz", make_image_folder(tmp_path / "bugs", per_class=8))
    project = make_project(tmp_path, data={"dataset": "imagefolder", "source": str(archive), "image_size": 12})
    assert ran_stages(sh(project, DVC, "repro", "preprocess").stdout) == ["download", "preprocess"]
    assert ran_stages(sh(project, DVC, "repro", "preprocess").stdout) == []
    make_tar(archive, make_image_folder(tmp_path / "bugs2", classes=("ants", "bees", "wasps"), per_class=8))
    assert ran_stages(sh(project, DVC, "repro", "preprocess").stdout) == ["download", "preprocess"]
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["class_names"] == ["ants", "bees", "wasps"]
