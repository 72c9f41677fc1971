"""End to end: the real `dvc repro` in a temporary git repository on a small subset."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, SYSTEM_FASHION_MNIST, make_image_folder, make_tar

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).with_name("dvc"))
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "src", "sources", "plots", ".dvcignore")
ALL_STAGES = ["validate", "download", "preprocess", "duplicates", "label_errors", "train", "evaluate", "export"]


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
    shutil.copy(REPO_ROOT / ".dvc" / "config", project / ".dvc" / "config")  # analytics off, offline plot page
    commit(project, "initial")
    return project


def set_params(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    # Models trained for seconds on a few hundred images lose more than the default 0.5 points in int8;
    # these tests are about the pipeline, not the int8 threshold.
    params["export"]["int8_max_drop"] = 100.0
    # The label audit's folds are tested on planted errors in tests/test_label_errors.py; here two short folds
    # show the stage runs in the pipeline without doubling each test's time.
    params["audit"].update(label_folds=2, label_epochs=1)
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit(project: Path, message: str) -> None:
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-q", "-m", message)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.mark.skipif(
    not (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make test installs it when run as root)",
)
def test_full_pipeline_on_a_fashion_mnist_subset(tmp_path):
    project = make_project(
        tmp_path,
        data={"limit": 2000},
        train={"epochs": 3, "min_steps": 0, "batch_size": 64, "log_images": 16},
        export={"parity_images": 300, "latency_calls": 200},
    )
    first = sh(project, DVC, "repro")
    assert ran_stages(first.stdout) == ALL_STAGES

    # Outputs and their values.
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["class_names"][0] == "T-shirt/top" and meta["image_shape"] == [1, 28, 28]
    assert sum(meta["counts"]["test"].values()) == 2000 and sum(meta["counts"]["train"].values()) == 1900
    assert 0.25 < meta["mean"][0] < 0.33 and 0.3 < meta["std"][0] < 0.4  # Fashion-MNIST's known statistics
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    test = evaluation["test"]
    assert test["images"] == 2000 and 0.5 < test["accuracy"] <= 1 and test["correct"] == round(test["accuracy"] * 2000)
    assert test["ci95_low"] < test["accuracy"] < test["ci95_high"] and test["ci95_high"] - test["ci95_low"] < 0.05
    assert "per_class" not in evaluation  # per-class figures live in per_class.csv, not in `dvc exp show`
    per_class = {row["class"]: row for row in csv.DictReader((project / "metrics/per_class.csv").open())}
    assert set(per_class) == set(meta["class_names"])
    trouser = per_class["Trouser"]
    assert set(trouser) == {"class", "accuracy", "ci95_low", "ci95_high", "precision", "recall", "images", "correct"}
    assert int(trouser["images"]) == meta["counts"]["test"]["Trouser"] and int(trouser["correct"]) <= 200
    assert sum(int(row["correct"]) for row in per_class.values()) == test["correct"]
    weakest = min(per_class, key=lambda name: float(per_class[name]["accuracy"]))
    assert evaluation["weakest_class"] == weakest
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
    # A train param changes: validation, then only train, evaluate and export rerun.
    set_params(project, train={"lr": 0.1875})  # half the fast recipe's 0.375 (params.yaml says auto)
    third = sh(project, DVC, "repro")
    assert ran_stages(third.stdout) == ["validate", "train", "evaluate", "export"]
    params_diff = json.loads(sh(project, DVC, "params", "diff", "--json").stdout)
    lr_diff = params_diff["params.yaml"]["train.lr"]
    assert (lr_diff["old"], lr_diff["new"]) == ("auto", 0.1875)
    diff = json.loads(sh(project, DVC, "metrics", "diff", "--json").stdout)
    accuracy = diff["metrics/eval.json"]["test.accuracy"]
    assert accuracy["new"] == pytest.approx(json.loads((project / "metrics/eval.json").read_text())["test"]["accuracy"])
    assert accuracy["old"] == pytest.approx(evaluation["test"]["accuracy"]) and accuracy["new"] != accuracy["old"]
    assert "test.loss" in diff["metrics/eval.json"]
    assert not [key for key in diff["metrics/eval.json"] if key.startswith("per_class")]  # those are in the CSV

    # dvc plots renders the curves and the confusion matrix.
    sh(project, DVC, "plots", "show", "-o", "plots_html")
    html = (project / "plots_html" / "index.html").read_text()
    for expected in (
        "Loss per epoch",
        "Accuracy per epoch",
        "Test confusion matrix",
        "T-shirt/top",
        "misclassified.png",
    ):
        assert expected in html, expected

    # A typo in an -S override stops the run with the key named: DVC refuses unknown keys itself, and a
    # key forced in with '+' is refused by the stage before any work.
    typo = sh(project, DVC, "exp", "run", "-S", "trian.lr=1", check=False)
    assert typo.returncode != 0 and "trian.lr" in typo.stdout + typo.stderr
    forced = sh(project, DVC, "exp", "run", "-S", "+train.lrr=1", check=False)
    assert forced.returncode != 0
    assert "unknown key 'train.lrr' (value 1)" in forced.stdout + forced.stderr


def snapshot_outputs(project: Path) -> dict[str, bytes]:
    """Every file a run leaves in data/ and metrics/, by path."""
    return {
        str(p.relative_to(project)): p.read_bytes()
        for folder in ("data", "metrics")
        for p in sorted((project / folder).rglob("*"))
        if p.is_file()
    }


def test_full_pipeline_on_a_generated_image_folder_never_skips(tmp_path):
    # Needs neither Debian's package nor the network: the test makes its own data set.
    # Noise of +-20 per pixel, as in photos: with flat colours (6 distinct images) the fast model's whitening
    # and its BatchNorm (eps 1e-12) diverge in bf16 on AVX512-BF16 CPUs (a clear TrainingError, tested in
    # test_models_training), which is not what this test is about.
    images = make_image_folder(
        tmp_path / "shapes",
        classes=("ants", "bees", "wasps"),
        per_class=40,
        splits=("train", "test"),
        size=16,
        noise=20,
    )
    archive = make_tar(tmp_path / "shapes.tar.gz", images)
    project = make_project(
        tmp_path,
        data={"dataset": "imagefolder", "source": str(archive), "image_size": 16},
        train={"epochs": 5, "min_steps": 0, "batch_size": 32, "log_images": 8},
        export={"parity_images": 60, "latency_calls": 200},
    )
    first = sh(project, DVC, "repro")
    assert ran_stages(first.stdout) == ALL_STAGES, first.stdout
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["class_names"] == ["ants", "bees", "wasps"] and meta["image_shape"] == [3, 16, 16]
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    per_class = (project / "metrics/per_class.csv").read_text().splitlines()
    assert evaluation["test"]["images"] == 120 and [row.split(",")[0] for row in per_class[1:]] == [
        "ants",
        "bees",
        "wasps",
    ]
    assert evaluation["test"]["accuracy"] > 0.5  # each class is one colour (plus noise): learnable in five epochs
    # Know your data: calibration measured before and after, the duplicates stage's counts and the accuracy
    # without leaked test images beside the plain one, label suspects named by file.
    calibration = evaluation["calibration"]
    assert calibration["ece_after"] <= calibration["ece_before"] + 0.02 and calibration["temperature"] > 0
    leaks = evaluation["test_without_leaks"]
    assert (
        leaks["images"] + leaks["left_out"] == 120
        and leaks["left_out"] == evaluation["duplicates"]["leaked_test_images"]
    )
    suspects = list(csv.DictReader((project / "metrics/label_suspects.csv").open()))
    assert all(row["file"].startswith("train/") for row in suspects), suspects[:3]
    predictions = list(csv.DictReader((project / "metrics/test_predictions.csv").open()))
    assert {row["file"].split("/")[0] for row in predictions} == {"test"} and len(predictions) == 120
    for picture in ("duplicates", "label_suspects", "reliability", "activation_maps"):
        assert (project / "metrics" / f"{picture}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert "How far to trust it" in (project / "metrics/model_card.md").read_text()
    exported = json.loads((project / "metrics/export.json").read_text())
    assert exported["parity"]["onnx"]["same_predictions"]
    commit(project, "baseline run")
    before = snapshot_outputs(project)

    # A change to training code makes train (and, through its outputs, what follows) out of date, never the
    # data stages; a change to the model code reaches train, evaluate and export directly.
    loop = project / "src/imgcls/train/loop.py"
    loop.write_text(loop.read_text() + "\n# a change\n")
    status = json.loads(sh(project, DVC, "status", "--json").stdout)
    changed = [{"changed deps": {"src/imgcls/train": "modified"}}]
    assert status == {"train": changed, "label_errors": changed}, status  # the folds train with it too
    networks = project / "src/imgcls/model/networks.py"
    networks.write_text(networks.read_text() + "\n# a change\n")
    # (validate checks train.model against the model table, so it reruns too; its stamp is constant, so the
    # data stages after it stay up to date.)
    assert sorted(json.loads(sh(project, DVC, "status", "--json").stdout)) == [
        "evaluate",
        "export",
        "label_errors",
        "train",
        "validate",
    ]

    # A params typo fails validation before DVC deletes anything: the previous model, metrics, curves and
    # TensorBoard logs are all still there, byte for byte.
    bad = sh(project, DVC, "exp", "run", "-S", "train.lr=abc", check=False)
    assert bad.returncode != 0
    expected = "validate: error: params: train.lr = 'abc' has the wrong type; expected auto or a number"
    assert expected in bad.stdout + bad.stderr
    assert ran_stages(bad.stdout) == ["validate"]
    after = snapshot_outputs(project)
    assert {k: v for k, v in after.items() if not k.startswith("data/params-valid")} == {
        k: v for k, v in before.items() if not k.startswith("data/params-valid")
    }
    assert not [p for p in (project / "data").iterdir() if p.name.startswith(".")]  # nothing half-written

    # A stage that fails after validation keeps the previous outputs too (persist: true, atomic publishing):
    # a trusted weights file that is no checkpoint fails train; a parity tolerance no export meets fails export.
    sh(project, "git", "checkout", "--", "params.yaml", "src")
    (project / "data" / "not-a-checkpoint.pt").write_bytes(b"not a checkpoint")
    before = snapshot_outputs(project)
    for changes, failing in (
        (["train.init_from=data/not-a-checkpoint.pt", "train.trust_weights_file=true"], "train"),
        (["export.parity_atol=1e-12"], "export"),
    ):
        failed = sh(project, DVC, "exp", "run", *(f"-S{change}" for change in changes), check=False)
        assert failed.returncode != 0 and f"{failing}: error:" in failed.stdout + failed.stderr, failed.stdout
        assert ran_stages(failed.stdout) == ["validate", failing], failed.stdout
        after = snapshot_outputs(project)
        assert {k for k in after if k not in before} <= {"data/params-valid.txt"}
        changed = [k for k in before if after.get(k) != before[k] and not k.startswith("data/params-valid")]
        assert changed == [], (failing, changed)
        sh(project, "git", "checkout", "--", "params.yaml")

    # YAML 1.2 numbers, as DVC reads them: lr: 1e-3 is a number and the run goes through.
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(re.sub(r"\n  lr: [^\s#]+", "\n  lr: 1e-3", text, count=1))
    again = sh(project, DVC, "repro")
    assert ran_stages(again.stdout) == ["validate", "train", "evaluate", "export"], again.stdout
    import torch

    checkpoint = torch.load(project / "data/model/checkpoint.pt", weights_only=True)
    assert checkpoint["params"]["train"]["lr"] == 0.001

    # `.venv/bin/dvc repro` without activating the environment: the stages still find the project's Python.
    (project / ".venv").symlink_to(Path(sys.prefix))
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    bare.update(PATH="/usr/bin:/bin", DVC_NO_ANALYTICS="1")
    unactivated = subprocess.run(
        [".venv/bin/dvc", "repro", "-f", "validate"], cwd=project, env=bare, capture_output=True, text=True, timeout=300
    )
    assert unactivated.returncode == 0 and ran_stages(unactivated.stdout) == ["validate"], unactivated.stderr


def test_image_folder_source_change_reruns_download(tmp_path):
    archive = make_tar(tmp_path / "bugs.tar.gz", make_image_folder(tmp_path / "bugs", per_class=8))
    project = make_project(tmp_path, data={"dataset": "imagefolder", "source": str(archive), "image_size": 12})
    assert ran_stages(sh(project, DVC, "repro", "preprocess").stdout) == ["validate", "download", "preprocess"]
    assert ran_stages(sh(project, DVC, "repro", "preprocess").stdout) == []
    make_tar(archive, make_image_folder(tmp_path / "bugs2", classes=("ants", "bees", "wasps"), per_class=8))
    assert ran_stages(sh(project, DVC, "repro", "preprocess").stdout) == ["download", "preprocess"]
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["class_names"] == ["ants", "bees", "wasps"]


def test_a_killed_dvc_repro_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    images = make_image_folder(
        tmp_path / "shapes",
        classes=("ants", "bees", "wasps"),
        per_class=150,
        splits=("train", "test"),
        size=16,
        noise=40,
    )
    archive = make_tar(tmp_path / "shapes.tar.gz", images)
    settings = dict(
        data={"dataset": "imagefolder", "source": str(archive), "image_size": 16},
        train={"epochs": 8, "min_steps": 0, "batch_size": 32, "width": 8, "log_images": 0},
        export={"parity_images": 30, "latency_calls": 200},
        audit={"label_folds": 0},  # off: the stage still writes its outputs (an empty table)
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = make_project(tmp_path / "a", **settings)
    sh(straight, DVC, "repro")
    killed = make_project(tmp_path / "b", **settings)
    sh(killed, DVC, "repro", "duplicates", "label_errors")
    state = killed / "data/train-resume/state.pt"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    process = subprocess.Popen(
        [DVC, "repro"],
        cwd=killed,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the train stage under it, as an OOM kill or a closed lid
    process.wait()
    assert state.is_file() and not (killed / "data/model/checkpoint.pt").exists(), "killed too late to test"

    resumed = sh(killed, DVC, "repro")
    assert ran_stages(resumed.stdout) == ["train", "evaluate", "export"]
    assert re.search(r"resuming at step \d+ \(epoch \d of 8\)", resumed.stdout), resumed.stdout
    assert not state.parent.exists()  # a finished run leaves no resume state behind

    import torch

    a = torch.load(straight / "data/model/checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "data/model/checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "metrics/eval.json").read_text() == (killed / "metrics/eval.json").read_text()
    assert json.loads((killed / "metrics/eval.json").read_text())["test"]["accuracy"] > 0.5  # it learned: no NaN
    curve = "metrics/train/plots/metrics/val/accuracy.tsv"  # the logs continue at the right step
    assert (straight / curve).read_text() == (killed / curve).read_text()


def small_run(tmp_path: Path, epochs: int) -> Path:
    """A project on a generated two-class image folder in the ants/bees layout (train/ and val/, no test/),
    after one `dvc repro`: for the tests of what happens around a run (remotes, queues, plots)."""
    images = make_image_folder(
        tmp_path / "shapes", classes=("ants", "bees"), per_class=30, size=16, noise=40, splits=("train", "val")
    )
    archive = make_tar(tmp_path / "shapes.tar.gz", images)
    project = make_project(
        tmp_path,
        data={"dataset": "imagefolder", "source": str(archive), "image_size": 16},
        train={"epochs": epochs, "min_steps": 0, "batch_size": 16, "width": 8, "log_images": 0},
        export={"parity_images": 20, "latency_calls": 200},
    )
    run = sh(project, DVC, "repro")
    # data.val_folder: test (the default): every val/ image tests; validation is carved from train/.
    assert "train 56, test 60 (from val/), val 4 (from train/)" in run.stdout, run.stdout
    assert json.loads((project / "metrics/eval.json").read_text())["test"]["images"] == 60
    return project


def test_a_remote_shares_every_output_so_a_fresh_clone_runs_nothing(tmp_path):
    project = small_run(tmp_path, epochs=1)
    remote = tmp_path / "remote"
    sh(project, DVC, "remote", "add", "-d", "shared", str(remote))
    commit(project, "results and the remote")
    sh(project, DVC, "push", "--run-cache")

    for name, fetch in (("pulled", ["pull"]), ("repro_pull", ["repro", "--pull"])):
        clone = tmp_path / name
        sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
        assert not (clone / "data").exists()
        fetched = sh(clone, DVC, *fetch)
        assert ran_stages(fetched.stdout) == [], fetched.stdout  # nothing retrained
        status = sh(clone, DVC, "status")
        assert "Data and pipelines are up to date" in status.stdout, status.stdout
        assert ran_stages(sh(clone, DVC, "repro").stdout) == []
        for output in ("data/model/checkpoint.pt", "data/export/model.onnx", "data/prepared/meta.json"):
            assert (clone / output).read_bytes() == (project / output).read_bytes(), output
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "pulled/data/export/model.onnx"), providers=["CPUExecutionProvider"])
    test_images = np.load(tmp_path / "pulled/data/prepared/test_images.npy").astype(np.float32) / 255
    assert session.run(None, {"images": test_images[:4]})[0].shape == (4, 2)


def test_queued_sweep_runs_two_jobs_in_parallel_and_both_show_up(tmp_path):
    project = small_run(tmp_path, epochs=1)
    commit(project, "baseline")
    # One thread per job: two jobs on two cores, each with one core.
    sh(project, DVC, "exp", "run", "--queue", "-S", "train.model=convnet,lenet", "-S", "base.threads=1")
    queued = sh(project, DVC, "queue", "status").stdout
    assert queued.count("Queued") == 2, queued
    sh(project, DVC, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh(project, DVC, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status + sh(project, DVC, "queue", "logs", "--help", check=False).stdout
    shown = json.loads(sh(project, DVC, "exp", "show", "--json").stdout)
    runs = {}
    for commit_entry in shown:
        for experiment in commit_entry.get("experiments") or []:
            for revision in experiment.get("revs", []):
                data = revision.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("metrics/eval.json", {}).get("data", {})
                if metrics:
                    runs[params["train"]["model"]] = metrics
    assert set(runs) == {"convnet", "lenet"}, shown
    for metrics in runs.values():  # a few columns per experiment: no per-class ones (they are in per_class.csv)
        assert "per_class" not in metrics and metrics["weakest_class"] in {"ants", "bees"}
        assert 0 <= metrics["test"]["accuracy"] <= 1
    sh(project, DVC, "queue", "stop", check=False)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here (apt-get install chromium); make test does not install a browser"
)
def test_dvc_plots_show_draws_the_curves_offline_in_a_real_browser(tmp_path):
    project = small_run(tmp_path, epochs=2)
    sh(project, DVC, "plots", "show", "-o", "plots_html")
    page = project / "plots_html" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()  # nothing to fetch: this machine has no network
    # Chromium runs the page's scripts (with every network feature off) and prints the DOM they built:
    # vega-embed draws each plot into a <canvas> only if Vega loaded and parsed the data.
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    assert dom.count("<canvas") == 4, dom[-2000:]  # loss, accuracy, confusion matrix, reliability
    for title in ("Loss per epoch", "Accuracy per epoch", "Test confusion matrix", "Reliability on the test split"):
        assert title in page.read_text()
    # The pictures (know your data among them) are on the page as images DVC copied beside it.
    for picture in ("reliability.png", "activation_maps.png", "duplicates.png", "label_suspects.png"):
        assert picture in dom, picture
