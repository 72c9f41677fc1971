"""The README's own-images flow with real DVC, as a user and a teammate would run it: images in the project
folder -> dvc add -> dvc repro -> commit -> dvc push to a local remote -> a fresh clone -> dvc pull -> nothing
to rerun, the same metrics -> a few images added -> dvc add -> dvc repro decodes only those."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, make_image_folder
from PIL import Image

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).with_name("dvc"))
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "src", "sources", "plots", ".dvcignore", ".gitignore")


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


# What new images rerun: everything after validate.
FROM_DOWNLOAD = ["download", "preprocess", "duplicates", "label_errors", "train", "evaluate", "export"]


def new_project(root: Path) -> Path:
    """The repository as a user clones it (the committed .gitignore included), with small-run params."""
    project = root / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            shutil.copy(source, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", source="data/images", image_size=16)
    params["train"].update(epochs=3, min_steps=0, batch_size=32, log_images=0)
    params["evaluate"].update(misclassified_images=4)
    params["audit"].update(label_folds=2, label_epochs=1)  # the label audit runs, briefly (its own tests: planted)
    params["export"].update(parity_images=40, latency_calls=200, int8_max_drop=100.0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "init", "-q")
    sh(project, "git", "config", "user.email", "test@example.com")
    sh(project, "git", "config", "user.name", "test")
    sh(project, DVC, "init", "-q")
    shutil.copy(REPO_ROOT / ".dvc" / "config", project / ".dvc" / "config")
    commit_all(project, "the project as cloned")
    return project


def commit_all(cwd: Path, message: str) -> None:
    sh(cwd, "git", "add", "-A")
    sh(cwd, "git", "commit", "-q", "-m", message)


def metrics(cwd: Path) -> dict[str, bytes]:
    return {name: (cwd / "metrics" / name).read_bytes() for name in ("eval.json", "per_class.csv")}


def test_own_images_are_versioned_shared_and_reproduced_on_a_fresh_clone(tmp_path):
    project = new_project(tmp_path)
    make_image_folder(project / "data" / "images", ("cats", "dogs"), per_class=30, size=16, noise=20)

    # dvc add in the place the README names: the committed .gitignore lets git track data/images.dvc.
    sh(project, DVC, "add", "data/images")
    untracked = sh(project, "git", "status", "--porcelain", "-uall", "data").stdout.split()
    assert "data/images.dvc" in untracked and not [p for p in untracked if p.startswith("data/images/")]
    first = sh(project, DVC, "repro")
    assert ran_stages(first.stdout) == ["validate", *FROM_DOWNLOAD]
    assert "120 images: 120 decoded" in first.stdout  # 60 train + 60 test, nothing cached yet
    raw = project / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["manifest.json", "source.json"]  # read in place: no copy
    remote = tmp_path / "remote"
    sh(project, DVC, "remote", "add", "-d", "shared", str(remote))
    commit_all(project, "photos v1 and their run")
    sh(project, DVC, "push")

    # A teammate: a fresh clone, dvc pull, and nothing to rerun: the same metrics, byte for byte.
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    sh(clone, DVC, "pull")
    assert "up to date" in sh(clone, DVC, "status").stdout
    assert ran_stages(sh(clone, DVC, "repro").stdout) == []
    assert metrics(clone) == metrics(project)

    # New photos in the user's workspace: dvc add again; dvc diff lists them and preprocess decodes only
    # those (the decode cache is local: a fresh clone's first preprocess decodes everything once).
    before = metrics(project)
    cats = project / "data" / "images" / "train" / "cats"
    rng = np.random.default_rng(7)
    for i in range(3):
        pixels = np.clip(np.array([200, 40, 40]) + rng.integers(-20, 21, (18, 18, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(cats / f"new-{i}.png")
    sh(project, DVC, "add", "data/images")
    diff = sh(project, DVC, "diff").stdout
    assert all(f"data/images/train/cats/new-{i}.png" in diff for i in range(3)), diff
    second = sh(project, DVC, "repro")
    assert ran_stages(second.stdout) == FROM_DOWNLOAD, second.stdout
    assert "123 images: 3 decoded, 120 reused from the decode cache" in second.stdout, second.stdout
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert sum(sum(meta["counts"][split].values()) for split in meta["counts"]) == 123
    assert metrics(project) != before  # the model and its metrics follow the new photos
