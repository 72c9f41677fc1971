"""Helpers the benchmarks share: a scratch project, params merged over the committed ones, timed child
processes with their peak memory."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from imgcls.host import cpu_info

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR_IMAGES = REPO_ROOT.parent / "shared" / "data" / "cifar10-images.tar.gz"
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def machine() -> dict:
    return {
        "cpu": cpu_info().model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_timed(args: list[str], cwd: Path, log_path: Path | None = None) -> dict:
    """Run a child process; returns wall seconds, exit code and its peak resident memory (MiB)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    started = time.perf_counter()
    with open(log_path or os.devnull, "w") as log:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # rusage of this child alone
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "returncode": os.waitstatus_to_exitcode(status), "peak_rss_mib": usage.ru_maxrss / 1024}


def extract_shared_cifar(folder: Path) -> Path:
    """The CIFAR-10 JPEG archive from ../shared/data extracted into ``folder`` (once; kept between runs)."""
    import tarfile

    if not (folder / "test").is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with tarfile.open(SHARED_CIFAR_IMAGES) as archive:
            archive.extractall(folder, filter="data")
    return folder


def scratch_project(where: Path, params_update: dict) -> Path:
    """A copy of the pipeline (stages, sources, params) to run stages in without touching the checkout."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    for name in ("stages", "sources"):
        shutil.copytree(REPO_ROOT / name, where / name)
    set_params(where, params_update)
    return where


def merge_params(raw: dict, sections: dict) -> dict:
    """``raw`` with ``sections`` ({"train": {"epochs": 2, "augment": {"flip": False}}}) merged in, deeply:
    a mapping updates the one it lands on, any other value replaces it. Neither argument is changed. The one
    params merge of the benchmarks and the tests (tests/conftest.py takes it from here)."""
    merged = dict(raw)
    for key, value in sections.items():
        merged[key] = merge_params(raw.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def set_params(project: Path, update: dict) -> None:
    """``update`` merged into the project's params.yaml (the committed one where it has none yet)."""
    source = project / "params.yaml" if (project / "params.yaml").exists() else REPO_ROOT / "params.yaml"
    params = merge_params(yaml.safe_load(source.read_text()), update)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
