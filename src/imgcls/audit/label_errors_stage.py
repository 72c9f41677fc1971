"""The label_errors stage: each training image is scored by a model trained on the other folds (train.model
from scratch with the model's own recipe, audit.label_epochs epochs), then confident learning flags the images
whose given label the out-of-sample model most disagrees with: metrics/label_suspects.csv (ranked, with the
file and both labels), metrics/label_suspects.png and metrics/label_errors.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..cli import log
from ..errors import DataError
from ..fileio import write_json
from ..params.label_errors import LabelErrorsStageParams
from ..params.train import RECIPE_KEYS, params_with_recipe
from ..paths import ProjectPaths
from ..prepared import load_names, load_prepared
from ..runtime import available_memory, resolve_device, resolve_precision, seed_everything, set_threads
from ..tensorboard import write_tensorboard_run
from ..train.optim import run_length
from ..train.stage import model_arguments
from .label_errors import (
    LabelSuspects,
    confident_learning,
    out_of_sample_probabilities,
    plot_suspects,
    write_suspects_csv,
)


def with_own_recipe(params: LabelErrorsStageParams) -> LabelErrorsStageParams:
    """From scratch with the model's own recipe: what the folds measure is the data, not a recipe being tuned
    (and dvc.yaml lists only the train keys read here, so a sweep over train.lr reruns no fold)."""
    own = {key: "auto" for key in RECIPE_KEYS} | {"pretrained": "none", "init_from": "none"}
    return params_with_recipe(params.model_copy(update={"train": params.train.model_copy(update=own)}))


def label_errors(params: LabelErrorsStageParams, paths: ProjectPaths) -> None:
    """The label_errors stage."""
    emit, audit = log("label_errors"), params.audit
    params = with_own_recipe(params)
    prepared = load_prepared(paths.prepared_dir, ("train",))
    images, labels = prepared.splits["train"]
    outputs = (
        paths.metrics_dir / "label_suspects.csv",
        paths.metrics_dir / "label_suspects.png",
        paths.metrics_dir / "label_errors.json",
    )
    if audit.label_folds == 0:
        write_off(outputs, prepared.class_names)
        write_tensorboard_run(paths.stage_tensorboard_dir("label_errors"), {"label_errors/suspects": outputs[1]})
        emit("off (audit.label_folds: 0): no training image was checked; metrics/label_suspects.csv is empty")
        return
    check_memory(images.nbytes, len(labels), resolve_device(params.base.device))
    pixels = torch.from_numpy(images.load())
    started = time.perf_counter()
    probabilities, epochs = score_out_of_sample(params, prepared.meta, pixels, labels, emit)
    seconds = time.perf_counter() - started
    suspects = confident_learning(labels, probabilities)
    names = load_names(paths.prepared_dir, "train", len(labels))
    write_suspects_csv(outputs[0], suspects, names, prepared.class_names)
    drawn = plot_suspects(
        outputs[1], pixels.numpy(), suspects, prepared.class_names, limit=audit.label_suspects_drawn, names=names
    )
    held_out_accuracy = float((probabilities.argmax(1) == labels).mean())
    write_json(
        outputs[2],
        {
            "folds": audit.label_folds,
            "epochs": epochs,  # each fold's, audit.label_epochs raised to reach train.min_steps where needed
            "label_epochs": audit.label_epochs,
            "images": int(len(labels)),
            "out_of_sample_accuracy": held_out_accuracy,
            "suspects": int(len(suspects.indices)),
            "estimated_label_errors": int(suspects.estimated_issues),
            "seconds": seconds,
        },
    )
    write_tensorboard_run(
        paths.stage_tensorboard_dir("label_errors"),
        {"label_errors/suspects": outputs[1]},
        {"label_errors/suspects": len(suspects.indices), "label_errors/out_of_sample_accuracy": held_out_accuracy},
    )
    emit(
        f"{len(suspects.indices)} training image(s) flagged as likely mislabelled (confident learning estimates "
        f"{suspects.estimated_issues}); out-of-sample accuracy {held_out_accuracy:.4f}; {seconds:.1f} s; "
        f"metrics/label_suspects.csv, the first {drawn} in metrics/label_suspects.png"
    )


def check_memory(nbytes: int, count: int, device: torch.device) -> None:
    """The folds hold the training split and each fold's training part (a copy): twice its size, which must
    fit in half the free memory, or the stage stops before loading anything, saying how to go on."""
    need, free = 2 * nbytes, available_memory(device)
    if need > free // 2:
        raise DataError(
            f"the label audit holds the {count:,} training images in memory twice ({need / 1e9:.1f} GB) but "
            f"{free / 1e9:.1f} GB are free on {device.type}",
            advice="set audit.label_folds: 0 to skip it, or a smaller data.image_size",
        )


def score_out_of_sample(
    params: LabelErrorsStageParams, meta: dict, pixels: torch.Tensor, labels: np.ndarray, emit: Callable[[str], None]
) -> tuple[np.ndarray, int]:
    """Each training image's class probabilities from a model trained on the other folds (N, K), and the
    epochs each fold trained."""
    audit = params.audit
    set_threads(params.base.threads)
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    precision = resolve_precision(params.train.precision, device)
    # The epochs each fold trains: audit.label_epochs, raised as a run would be to train.min_steps steps.
    fold_images = len(labels) - len(labels) // audit.label_folds
    epochs = run_length(fold_images, params.train.model_copy(update={"epochs": audit.label_epochs})).epochs
    raised = (
        f" (audit.label_epochs {audit.label_epochs}, raised to reach train.min_steps)"
        if epochs > audit.label_epochs
        else ""
    )
    emit(
        f"{audit.label_folds} folds of {len(labels):,} training images, each scored by train.model = "
        f"{params.train.model!r} trained {epochs} epoch(s){raised} on the other folds (precision {precision})"
    )

    def on_fold(fold: int, folds: int, seconds: float) -> None:
        emit(f"fold {fold}/{folds} trained and scored in {seconds:.1f} s")

    probabilities = out_of_sample_probabilities(
        pixels,
        labels,
        config=params.train,
        arguments=model_arguments(params.train, meta),
        folds=audit.label_folds,
        epochs=audit.label_epochs,
        device=device,
        precision=precision,
        seed=params.base.seed,
        on_fold=on_fold,
    )
    return probabilities, epochs


def write_off(outputs: tuple[Path, Path, Path], class_names: list[str]) -> None:
    """The stage's outputs when it is off: an empty table, a picture saying so, zero counts."""
    empty = np.zeros(0, dtype=np.int64)
    none = LabelSuspects(empty, empty, empty, empty.astype(float), empty.astype(float), empty.astype(float), 0)
    write_suspects_csv(outputs[0], none, [], class_names)
    plot_suspects(outputs[1], np.zeros((0, 1, 8, 8), np.uint8), none, class_names, limit=0)
    write_json(outputs[2], {"folds": 0, "suspects": 0, "estimated_label_errors": 0})
