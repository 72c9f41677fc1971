"""tools/exp.sh (make exp): each experiment starts from the committed params.yaml, with real DVC in a temp repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO_ROOT

DVC = str(Path(sys.executable).with_name("dvc"))
STAGE = "python -c \"import json, yaml; json.dump(yaml.safe_load(open('params.yaml')), open('metrics.json', 'w'))\""


def run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", DVC=DVC)
    result = subprocess.run(args, cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_each_experiment_starts_from_the_committed_params_not_the_last_ones(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("train:\n  lr: 0.1\n  model: fast\n")
    stage = {"cmd": STAGE, "deps": ["params.yaml"], "metrics": [{"metrics.json": {"cache": False}}]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"echo": stage}}))
    run(project, "git", "init", "-q")
    run(project, "git", "config", "user.email", "t@example.com")
    run(project, "git", "config", "user.name", "t")
    run(project, DVC, "init", "-q")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "initial")
    exp = str(REPO_ROOT / "tools" / "exp.sh")

    run(project, exp, "train.model=resnet18", "train.lr=0.01")
    assert json.loads((project / "metrics.json").read_text())["train"] == {"lr": 0.01, "model": "resnet18"}
    run(project, exp, "train.lr=0.5")  # plain `dvc exp run -S` would keep model: resnet18 from the last run
    assert json.loads((project / "metrics.json").read_text())["train"] == {"lr": 0.5, "model": "fast"}

    (project / "params.yaml").write_text("train:\n  lr: 0.3\n  model: mine\n")  # the user's uncommitted edit
    result = run(project, exp, "train.lr=0.2")
    assert "saved as params.yaml.before-exp" in result.stdout
    assert (project / "params.yaml.before-exp").read_text() == "train:\n  lr: 0.3\n  model: mine\n"
    assert json.loads((project / "metrics.json").read_text())["train"] == {"lr": 0.2, "model": "fast"}
