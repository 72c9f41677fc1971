"""evaluate stage: test-set accuracy/loss, per-class accuracy/precision/recall, confusion matrix, misclassified grid."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arrays import NpyReader
from ..cli import log
from ..fileio import write_json
from ..model.checkpoint import load_checkpoint
from ..model.inference import evaluate_model
from ..model.networks import TTAModel
from ..params.evaluate import EvaluateStageParams as Params
from ..paths import ProjectPaths
from ..prepared import load_prepared
from ..report import progress_bar
from ..runtime import resolve_device, resolve_precision, set_threads
from ..stats import Accuracy, accuracy_of, spread_of_confusion
from .metrics import (
    confusion_matrix,
    per_class_metrics,
    plot_confusion_matrix,
    plot_misclassified,
    write_per_class_csv,
    write_predictions_csv,
)


@dataclass
class Evaluation:
    """What the model did on the test split."""

    labels: np.ndarray  # true classes (N,)
    predictions: np.ndarray  # predicted classes (N,)
    confusion: np.ndarray  # counts[true, predicted]
    per_class: dict[str, dict]  # per_class_metrics
    score: Accuracy  # counts and 95% interval
    accuracy: float  # as evaluate_model computed it (float32 mean), the number eval.json has always held
    loss: float


def evaluate(params: Params, paths: ProjectPaths) -> None:
    """The evaluate stage: set up the device, load the model and the test split, predict, write eval.json,
    the tables and the pictures to ``paths.metrics_dir``, report one line."""
    config, emit = params.evaluate, log("evaluate")
    set_threads(params.base.threads)
    device = resolve_device(params.base.device)
    precision = resolve_precision(params.train.precision, device)
    model, class_names = load_model(paths.checkpoint, device, tta=config.tta)
    dataset, images, labels = load_test_split(paths, class_names)
    # images: an NpyReader, read batch by batch (memory holds a batch, not the test split)
    started, bar = time.perf_counter(), progress_bar(len(images), unit="img", label="evaluate")
    try:
        result = evaluate_model(
            model,
            images,
            torch.from_numpy(labels),
            batch_size=config.batch_size,
            device=device,
            precision=precision,
            on_batch=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    outcome = score_predictions(result, labels, class_names)
    write_eval_json(paths.metrics_dir / "eval.json", outcome, tta=config.tta, precision=precision)
    shown = write_tables_and_plots(
        paths.metrics_dir,
        images,
        outcome,
        class_names,
        title=f"{dataset} test, accuracy {outcome.accuracy:.4f}",
        misclassified_images=config.misclassified_images,
    )
    report(emit, outcome, shown)
    emit(f"{len(images):,} test images scored in {seconds:.1f} s ({len(images) / max(seconds, 1e-9):,.0f} images/s)")


def load_model(checkpoint_path: Path, device: torch.device, *, tta: bool) -> tuple[nn.Module, list[str]]:
    """The trained model (wrapped for test-time augmentation with ``tta``) and its class names."""
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    return (TTAModel(model) if tta else model), checkpoint["class_names"]


def load_test_split(paths: ProjectPaths, class_names: list[str]) -> tuple[str, NpyReader, np.ndarray]:
    """The data set's name, the test images and labels, checked against the model's classes."""
    prepared = load_prepared(paths.prepared_dir, ("test",))
    prepared.require_classes(class_names, paths.checkpoint)
    images, labels = prepared.splits["test"]
    return prepared.meta["dataset"], images, labels


def score_predictions(result: dict, labels: np.ndarray, class_names: list[str]) -> Evaluation:
    """Confusion matrix, per-class metrics and the overall accuracy with its interval."""
    predictions = result["predictions"].cpu().numpy()
    confusion = confusion_matrix(labels, predictions, len(class_names))
    return Evaluation(
        labels=labels,
        predictions=predictions,
        confusion=confusion,
        per_class=per_class_metrics(confusion, class_names),
        score=accuracy_of(predictions, labels),
        accuracy=result["accuracy"],
        loss=result["loss"],
    )


def write_eval_json(path: Path, outcome: Evaluation, *, tta: bool, precision: str) -> None:
    """eval.json: test accuracy with its interval and counts, loss, the weakest class, how it was measured.
    Per-class figures go to per_class.csv only: keyed by class name here, they would add a column per class
    of every data set ever run to `dvc exp show`."""
    low, high = outcome.score.ci95
    test = {
        "accuracy": outcome.accuracy,
        "ci95_low": low,
        "ci95_high": high,
        "loss": outcome.loss,
        "images": outcome.score.images,
        "correct": outcome.score.correct,
    }
    scored = {name: values["accuracy"] for name, values in outcome.per_class.items() if values["images"]}
    weakest = min(scored, key=scored.get) if scored else None
    spread = spread_of_confusion(outcome.confusion)
    summary = {
        "weakest_class": weakest,
        "weakest_class_accuracy": scored.get(weakest),
        # One class predicted for (nearly) every image that is not (nearly) every image's class: the model
        # ignores its input (stats.PredictionSpread.constant).
        "constant_classifier": spread.constant,
        "most_predicted_class": list(outcome.per_class)[spread.top_class],
        "most_predicted_share": spread.top_share,
        "chance_accuracy": spread.chance,
    }
    write_json(path, {"test": test, **summary, "tta": tta, "precision": precision})


def write_tables_and_plots(
    metrics_dir: Path,
    images: NpyReader,
    outcome: Evaluation,
    class_names: list[str],
    *,
    title: str,
    misclassified_images: int,
) -> int:
    """per_class.csv, test_predictions.csv (DVC's confusion plot), the confusion matrix and the grid of
    misclassified images; returns how many the grid shows."""
    labels, predictions = outcome.labels, outcome.predictions
    write_per_class_csv(metrics_dir / "per_class.csv", outcome.per_class)
    write_predictions_csv(metrics_dir / "test_predictions.csv", labels, predictions, class_names)
    plot_confusion_matrix(metrics_dir / "confusion_matrix.png", outcome.confusion, class_names, title=title)
    return plot_misclassified(
        metrics_dir / "misclassified.png", images, labels, predictions, class_names, misclassified_images
    )


def report(emit: Callable[[str], None], outcome: Evaluation, shown: int) -> None:
    """The stage's summary line, after a note on classes without test images."""
    per_class = outcome.per_class
    missing = [name for name, values in per_class.items() if values["images"] == 0]
    if missing:
        emit(f"no test images of class(es) {missing}: their accuracy is left empty in per_class.csv, not 0")
    scored = {name: values for name, values in per_class.items() if values["images"]}
    worst = min(scored, key=lambda n: scored[n]["accuracy"])
    low, high = outcome.score.ci95
    spread = spread_of_confusion(outcome.confusion)
    if spread.constant:
        name = list(per_class)[spread.top_class]
        emit(
            f"warning: the model predicts {name!r} for {spread.top_share:.0%} of the test images "
            f"({spread.top_true_share:.0%} are {name!r}): a constant classifier, as good as always guessing "
            "(eval.json: constant_classifier). The train log's warnings name the likely params"
        )
    emit(
        f"test accuracy {outcome.accuracy:.4f} (95% interval {low:.4f}..{high:.4f}), loss {outcome.loss:.4f} "
        f"on {outcome.score.images} images; "
        f"weakest class {worst!r} ({per_class[worst]['accuracy']:.3f}); {shown} misclassified images drawn"
    )
