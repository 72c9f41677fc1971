"""Resume after a kill: at the end of every epoch the train stage saves, atomically, everything needed to
continue exactly (model, optimizer, lookahead average, step, every random generator, the epoch records
that the logs replay), keyed by a digest of the params, the prepared data and the library code.

The state lives in data/train-resume/, which is not a DVC output: DVC deletes a stage's outputs before
running it, and this folder must survive that. A state whose digest differs (other params, data or code)
is discarded with a line saying so; a successful run deletes it, so nothing lingers in the cache or git.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..fileio import atomic_path
from ..params import Params, as_dict

FORMAT_VERSION = 1
LIBRARY_ROOT = Path(__file__).resolve().parents[1]  # src/imgcls: a code change makes old state unusable


def run_digest(params: Params, prepared_dir: Path, extra: str = "") -> str:
    """sha256 of what decides a run's result: base and train params, every prepared file, the library code,
    and ``extra`` (the starting weights' sha256 when fine-tuning)."""
    digest = hashlib.sha256(extra.encode())
    digest.update(json.dumps({"base": as_dict(params.base), "train": as_dict(params.train)}, sort_keys=True).encode())
    for root in (prepared_dir, LIBRARY_ROOT):
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(root)).encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def random_states(generator: torch.Generator) -> dict:
    """Every generator a run may draw from, as plain tensors and numbers (loadable with weights_only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"batches": generator.get_state(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "python": random.getstate()}


def restore_random_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["batches"])
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_resume_state(path: Path, digest: str, state: dict) -> None:
    with atomic_path(path) as tmp:  # a kill during the write leaves the previous epoch's state intact
        torch.save({"format_version": FORMAT_VERSION, "digest": digest, **state}, tmp)


def load_resume_state(path: Path, digest: str, log: Callable[[str], None]) -> dict | None:
    """The saved state if it belongs to this run (same digest), else None, discarding a foreign one."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated by a crash mid-write of an older version, or not ours
        log(f"discarding unreadable resume state {path} ({type(error).__name__}); training from the start")
        path.unlink()
        return None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or state.get("digest") != digest:
        log(f"discarding resume state {path}: it was saved with other params, data or code; training from the start")
        path.unlink()
        return None
    return state
