"""Resume after a kill: at the end of every epoch the train stage saves, atomically, everything needed to
continue exactly (model, optimizer, lookahead average, step, every random generator, the epoch records
that the logs replay), keyed by a digest of the params, the prepared data and the library code.

The state lives in data/train-resume/, which is not a DVC output: DVC deletes a stage's outputs before
running it, and this folder must survive that. A state whose digest differs (other params, data or code)
is discarded with a line saying so; a successful run deletes it, so nothing lingers in the cache or git.

The state is only a convenience, so it never ends a run: a state whose digest matches but whose contents do
not fit this model, optimizer or run (``resume_state_problem``, checked before anything is applied) is
discarded with a line, and a state that cannot be written (full disk, read-only folder) is a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_path
from ..model.checkpoint import unusual_tensor
from ..params.core import as_dict
from ..params.train import TrainStageParams as Params

FORMAT_VERSION = 1
STATE_KEYS = (
    "epoch",
    "step",
    "epoch_progress",
    "model",
    "optimizer",
    "lookahead",
    "random",
    "records",
    "elapsed_seconds",
)  # what fit() saves, next to format_version and digest
PROGRESS_KEYS = ("batches_done", "step", "loss", "correct", "seen", "seconds")  # StopRequested.progress
RECORD_KEYS = ("epoch", "train_loss", "train_accuracy", "images_per_second", "epoch_seconds", "elapsed_seconds")
LIBRARY_ROOT = Path(__file__).resolve().parents[1]  # src/imgcls: a code change makes old state unusable
# The per-parameter optimizer state torch keeps as a 0-dim tensor (Adam's and AdamW's step counter); every other
# buffer (SGD's momentum, Adam's moments) has its parameter's shape: a 0-dim one would broadcast in the update
# and fail there ("output with shape [] doesn't match the broadcast shape").
SCALAR_OPTIMIZER_STATE = {"step"}


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
    return {
        "batches": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }


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


class ResumeStateWriter:
    """``save_state`` for fit(): saves each state, and turns a failure to write one (a full disk: torch's
    RuntimeError; a read-only or missing folder: OSError) into a warning printed once, not the end of the run.
    ``saved`` says whether the latest state reached the disk (the stop message depends on it)."""

    def __init__(self, path: Path, digest: str, log: Callable[[str], None]):
        self.path, self.digest, self.log = path, digest, log
        self.saved, self.warned = False, False

    def __call__(self, state: dict) -> None:
        try:
            save_resume_state(self.path, self.digest, state)
            self.saved = True
        except (OSError, RuntimeError) as error:
            self.saved = False
            if not self.warned:
                self.warned = True
                self.log(
                    f"warning: cannot save the resume state to {self.path} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200] if str(error) else 'no message'}); training goes on, "
                    f"but a stopped run cannot resume from this epoch. Free disk space, or make "
                    f"{self.path.parent} a writable folder"
                )


def discard_resume_state(path: Path) -> None:
    """Delete a state that will not be used; one that cannot be deleted (read-only folder) is only left behind
    (the next run discards it again)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def load_resume_state(path: Path, digest: str, log: Callable[[str], None]) -> dict | None:
    """The saved state if it belongs to this run (same digest), else None, discarding a foreign one.
    Its contents are checked against the model and optimizer later, by fit() (``resume_state_problem``)."""
    try:
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated by a crash mid-write of an older version, not ours, or unreadable
        log(f"discarding unreadable resume state {path} ({type(error).__name__}); training from the start")
        discard_resume_state(path)
        return None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or state.get("digest") != digest:
        log(f"discarding resume state {path}: it was saved with other params, data or code; training from the start")
        discard_resume_state(path)
        return None
    return state


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensors_problem(what: str, found: object, expected: dict[str, torch.Tensor]) -> str | None:
    """Why ``found`` is not a mapping with ``expected``'s names, shapes and dtypes and finite values, or None."""
    if not (
        isinstance(found, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in found.items())
    ):
        return f"its {what} is not a mapping of names to tensors"
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        return f"its {what} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
    for name, tensor in found.items():
        kind = unusual_tensor(tensor)  # first: isfinite on a sparse tensor raises NotImplementedError
        if kind:
            return f"its {what} {name} is {kind}, not a plain dense one"
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            return (
                f"its {what} {name} is {tensor.dtype} {list(tensor.shape)}, this model's is "
                f"{expected[name].dtype} {list(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"its {what} {name} holds NaN or infinite values"
    return None


def _expected_entry_keys(optimizer: torch.optim.Optimizer, group: dict) -> tuple[set[str], set[str]] | None:
    """(required, allowed) keys of a non-empty per-parameter state entry of the optimizers make_optimizer
    builds, or None for another optimizer (then only shapes are checked). AdamW reads its three entries
    unconditionally once a parameter has state (a missing one is a KeyError mid-step); SGD reads
    momentum_buffer with .get() and starts one when it is absent or None."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        return keys, keys
    if isinstance(optimizer, torch.optim.SGD):
        return set(), {"momentum_buffer"}
    return None


def _setting_problem(index: int, key: str, value: object, ours: object, our_group: dict) -> str | None:
    """Why the saved group setting ``value`` cannot stand in for this run's ``ours``, or None.

        Every setting but lr follows from the params and the data (which the digest covers) and torch's defaults,
        so it must equal what this run's fresh optimizer has: a NaN momentum or a changed weight decay would otherwise
    train (and diverge,
        blaming train.lr) on every rerun. lr is the schedule's, rewritten from base_lr before every step
        (loop.set_rate, a factor in 0..1): it only has to be a rate that schedule could have set."""
    if key == "lr":
        ceiling = our_group.get("base_lr", ours)
        if _is_number(value) and math.isfinite(value) and 0 <= value <= ceiling:
            return None
        return f"its optimizer group {index} lr is {value!r}, not a rate in 0..{ceiling} (this run's base rate)"
    if type(value) is type(ours) or (_is_number(value) and _is_number(ours)):
        # A number compared with == is also False for NaN; tuples (AdamW's betas) compare item by item.
        if value == ours:
            return None
    return f"its optimizer group {index} setting {key} is {value!r}, this run's is {ours!r}"


def _buffer_problem(index: object, key: str, value: object, parameter: torch.Tensor, max_step: int) -> str | None:
    """Why ``value`` is not a usable ``key`` state of the parameter saved as ``index``, or None."""
    where = f"its optimizer {key} of parameter {index}"
    if not isinstance(value, torch.Tensor):
        return f"{where} is a {type(value).__name__}, not a tensor"
    kind = unusual_tensor(value)
    if kind:
        return f"{where} is {kind}, not a plain dense one"
    if key in SCALAR_OPTIMIZER_STATE:
        # The count of steps this parameter took part in: Adam's bias correction divides by 1 - beta ** step.
        if (
            value.dim()
            or not value.is_floating_point()
            or not bool(torch.isfinite(value))
            or not 0 <= float(value) <= max_step
            or float(value) != int(float(value))
        ):
            return f"{where} is {value.tolist()!r}, not a step count in 0..{max_step}"
        return None
    if value.shape != parameter.shape or value.dtype != parameter.dtype:
        return (
            f"{where} is {value.dtype} {list(value.shape)}, the parameter is {parameter.dtype} {list(parameter.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        return f"{where} holds NaN or infinite values"
    return None


def _optimizer_problem(found: object, optimizer: torch.optim.Optimizer, step: int) -> str | None:
    """Why ``found`` cannot be loaded into ``optimizer`` (a fresh one: groups, parameters, per-parameter state)
    after ``step`` steps, or None."""
    if not (
        isinstance(found, dict) and isinstance(found.get("state"), dict) and isinstance(found.get("param_groups"), list)
    ):
        return "its optimizer state is not a torch optimizer state_dict"
    ours = optimizer.state_dict()["param_groups"]
    groups = found["param_groups"]
    if len(groups) != len(ours) or not all(isinstance(g, dict) for g in groups):
        return f"its optimizer has {len(groups)} parameter groups, this run's has {len(ours)}"
    parameters = {}  # the saved index of each parameter -> (this run's parameter, its group's expected keys)
    for index, (group, our_group, live_group) in enumerate(zip(groups, ours, optimizer.param_groups, strict=False)):
        if set(group) != set(our_group):
            return f"its optimizer group {index} has settings {sorted(group)}, this run's {sorted(our_group)}"
        if group["params"] != our_group["params"]:
            return f"its optimizer group {index} holds other parameters than this run's"
        for key, value in group.items():
            problem = None if key == "params" else _setting_problem(index, key, value, our_group[key], our_group)
            if problem:
                return problem
        keys = _expected_entry_keys(optimizer, our_group)
        parameters.update(
            (saved, (live, keys)) for saved, live in zip(group["params"], live_group["params"], strict=True)
        )
    for index, entry in found["state"].items():
        if index not in parameters or not isinstance(entry, dict):
            return f"its optimizer state names parameter {index!r}, which this run does not have"
        parameter, keys = parameters[index]
        if entry and keys is not None and not (keys[0] <= set(entry) <= keys[1]):
            return (
                f"its optimizer state of parameter {index} holds {sorted(entry)}, this optimizer keeps "
                f"{sorted(keys[1])}"
            )
        for key, value in entry.items():
            if value is None and key == "momentum_buffer":  # SGD starts a buffer where it finds None
                continue
            problem = _buffer_problem(index, key, value, parameter, step)
            if problem:
                return problem
    return None


def _random_problem(states: object) -> str | None:
    """Why ``states`` cannot be restored by restore_random_states, tried on scratch generators, or None."""
    try:
        if not (isinstance(states, dict) and {"batches", "torch", "numpy", "python"} <= set(states)):
            raise ValueError("not the four generators' states")
        # torch's default CPU generator has the same state layout as any CPU Generator: try it on a scratch one.
        for key in ("batches", "torch"):
            if not isinstance(states[key], torch.Tensor) or unusual_tensor(states[key]):
                raise TypeError(f"{key} is not a plain tensor")
            torch.Generator().set_state(states[key])
        name, keys, position, has_gauss, cached = states["numpy"]
        if not isinstance(keys, torch.Tensor) or unusual_tensor(keys):
            raise TypeError("numpy keys are not a plain tensor")
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        version, internal, gauss = states["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, RuntimeError, IndexError, OverflowError, KeyError) as error:
        return f"its random generator states cannot be restored ({type(error).__name__}: {str(error)[:120]})"
    return None


def _progress_problem(progress: object, steps_per_epoch: int) -> str | None:
    if progress is None:
        return None
    if not (
        isinstance(progress, dict)
        and set(progress) == set(PROGRESS_KEYS)
        and all(_is_number(progress[key]) for key in PROGRESS_KEYS)
    ):
        return f"its epoch_progress is not a mapping of {', '.join(PROGRESS_KEYS)} to numbers"
    if not (
        _is_int(progress["batches_done"])
        and 0 <= progress["batches_done"] <= steps_per_epoch
        and _is_int(progress["seen"])
        and progress["seen"] >= 0
        and progress["seconds"] >= 0
    ):
        return (
            f"its epoch_progress ({progress['batches_done']} batches done) does not fit an epoch of "
            f"{steps_per_epoch} batches"
        )
    return None


def _records_problem(records: object, epochs_done: int) -> str | None:
    """Why ``records`` are not the metrics of ``epochs_done`` finished epochs, or None."""
    if (
        isinstance(records, list)
        and len(records) == epochs_done
        and all(
            isinstance(r, dict)
            and set(RECORD_KEYS) <= set(r)
            and r["epoch"] == i + 1
            and all(_is_number(v) for v in r.values())
            for i, r in enumerate(records)
        )
    ):
        return None
    return f"its records are not the {epochs_done} finished epochs' metrics"


def resume_state_problem(
    state: dict,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lookahead_state: dict[str, torch.Tensor] | None,
    steps_per_epoch: int,
    epochs: int,
) -> str | None:
    """Why ``state`` (as load_resume_state returns it) cannot continue this run, or None when it can: every
    part is checked like a checkpoint (keys, types, tensor shapes against the model's state_dict and the
    optimizer, random states restorable, epoch and step in range) before fit() applies any of it."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    epoch, step = state["epoch"], state["step"]
    if not (_is_int(epoch) and 0 <= epoch < epochs):
        return f"its epoch {epoch!r} is not one of this run's 0..{epochs - 1} finished epochs"
    problem = _progress_problem(state["epoch_progress"], steps_per_epoch)
    if problem:
        return problem
    progress = state["epoch_progress"]
    # fit() takes one step per batch: the step number follows from the epochs and batches done.
    expected_step = epoch * steps_per_epoch + (progress["batches_done"] if progress else 0)
    if not (_is_int(step) and step == expected_step and (progress is None or progress["step"] == step)):
        return f"its step {step!r} does not match epoch {epoch} of {steps_per_epoch} steps (expected {expected_step})"
    elapsed = state["elapsed_seconds"]
    if not (_is_number(elapsed) and math.isfinite(elapsed) and elapsed >= 0):
        return f"its elapsed_seconds {elapsed!r} is not a time"
    problem = _records_problem(state["records"], epoch)
    if problem:
        return problem
    problem = _tensors_problem("model", state["model"], model.state_dict()) or _optimizer_problem(
        state["optimizer"], optimizer, step
    )
    if problem:
        return problem
    if (state["lookahead"] is None) != (lookahead_state is None):
        return "its lookahead average (train.ema) does not match this run's"
    if lookahead_state is not None:
        problem = _tensors_problem("lookahead average", state["lookahead"], lookahead_state)
        if problem:
            return problem
    return _random_problem(state["random"])
