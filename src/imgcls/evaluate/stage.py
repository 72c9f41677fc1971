"""evaluate stage: test-set accuracy/loss, per-class accuracy/precision/recall, confusion matrix, misclassified
grid; calibration (ECE before and after the checkpoint's temperature, a reliability diagram); the accuracy
without the test images that have a copy in train or val (the duplicates stage's leaks); where the model
looks (class activation maps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arrays import NpyReader
from ..calibration import (
    CALIBRATION_BINS,
    checkpoint_temperature,
    expected_calibration_error,
    probabilities,
    reliability,
)
from ..cli import log
from ..fileio import write_json
from ..model.checkpoint import load_checkpoint
from ..model.inference import evaluate_model
from ..model.networks import TTA_LEVELS, with_tta
from ..params.evaluate import EvaluateStageParams as Params
from ..paths import ProjectPaths
from ..prepared import load_names, load_prepared
from ..report import progress_bar
from ..runtime import resolve_device, resolve_precision, set_threads
from ..stats import Accuracy, accuracy_of, spread_of_confusion
from ..tensorboard import write_tensorboard_run
from .leaks import read_leaks
from .maps import draw_activation_maps
from .metrics import (
    confusion_matrix,
    per_class_metrics,
    plot_confusion_matrix,
    plot_misclassified,
    plot_reliability,
    write_per_class_csv,
    write_predictions_csv,
    write_reliability,
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
    logits: np.ndarray  # float32 (N, K)
    temperature: float  # the checkpoint's (imgcls.calibration); 1: uncalibrated
    probabilities: np.ndarray  # calibrated (N, K): what `imgcls predict` gives for the same images
    class_names: list[str]


def evaluate(params: Params, paths: ProjectPaths) -> None:
    """The evaluate stage: set up the device, load the model and the test split, predict, write eval.json,
    the tables and the pictures to ``paths.metrics_dir``, report one line."""
    config, emit = params.evaluate, log("evaluate")
    set_threads(params.base.threads)
    device = resolve_device(params.base.device)
    precision = resolve_precision(params.train.precision, device)
    model, checkpoint = load_model(paths.checkpoint, device, tta=config.tta)
    class_names = checkpoint["class_names"]
    temperature = checkpoint_temperature(checkpoint, str(paths.checkpoint))
    dataset, images, labels = load_test_split(paths, class_names)
    # images: an NpyReader, read batch by batch (memory holds a batch, not the test split)
    started, bar = time.perf_counter(), progress_bar(len(images), unit="img", label="evaluate")
    try:
        result = evaluate_model(
            model,
            images,
            torch.from_numpy(labels),
            # evaluate.batch_size counts the views the network sees per call: TTA's views share it (one call
            # on 6,000 views ran at half the speed of six on 1,000: activations past the CPU's caches).
            batch_size=max(1, config.batch_size // TTA_LEVELS[config.tta]),
            device=device,
            precision=precision,
            on_batch=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    outcome = score_predictions(result, labels, class_names, temperature)
    figures = write_outputs(params, paths, outcome, images, dataset=dataset, precision=precision, emit=emit)
    emit(f"{len(images):,} test images scored in {seconds:.1f} s ({len(images) / max(seconds, 1e-9):,.0f} images/s)")
    started = time.perf_counter()
    drawn, method = draw_activation_maps(
        paths.metrics_dir / "activation_maps.png",
        model,
        images,
        labels,
        outcome.probabilities,
        class_names,
        config.activation_maps,
        device,
    )
    if drawn:
        emit(
            f"activation maps ({method}) of {drawn} test images, misclassified and right, in "
            f"{time.perf_counter() - started:.1f} s: metrics/activation_maps.png"
        )
    write_tensorboard_run(
        paths.stage_tensorboard_dir("evaluate"),
        {f"evaluate/{name}": paths.metrics_dir / f"{name}.png" for name in PICTURES},
        tensorboard_scalars(figures),
    )


# The evaluate stage's pictures (metrics/<name>.png), also shown in TensorBoard.
PICTURES = ("confusion_matrix", "misclassified", "reliability", "activation_maps")


def tensorboard_scalars(evaluation: dict) -> dict[str, float | None]:
    """eval.json's headline figures (``evaluation``: what it holds) for TensorBoard."""
    calibration, clean = evaluation["calibration"], evaluation.get("test_without_leaks", {})
    return {
        "test/accuracy": evaluation["test"]["accuracy"],
        "test/accuracy_without_leaked_images": clean.get("accuracy"),
        "calibration/temperature": calibration["temperature"],
        "calibration/ece_before": calibration["ece_before"],
        "calibration/ece_after": calibration["ece_after"],
    }


def write_outputs(
    params: Params,
    paths: ProjectPaths,
    outcome: Evaluation,
    images: NpyReader,
    *,
    dataset: str,
    precision: str,
    emit: Callable[[str], None],
) -> dict:
    """eval.json (with calibration and leaks), the tables and the pictures; the stage's summary lines.
    Returns what eval.json holds."""
    config = params.evaluate
    calibration = calibration_summary(outcome)
    leaks = leak_summary(paths, outcome)
    evaluation = write_eval_json(
        paths.metrics_dir / "eval.json",
        outcome,
        tta=config.tta,
        precision=precision,
        extra={"calibration": calibration, **leaks},
    )
    shown = write_tables_and_plots(
        paths.metrics_dir,
        images,
        outcome,
        outcome.class_names,
        title=f"{dataset} test, accuracy {outcome.accuracy:.4f}",
        misclassified_images=config.misclassified_images,
        names=load_names(paths.prepared_dir, "test", len(outcome.labels)),
    )
    report(emit, outcome, shown)
    report_calibration_and_leaks(emit, calibration, leaks)
    return evaluation


def load_model(checkpoint_path: Path, device: torch.device, *, tta: str) -> tuple[nn.Module, dict]:
    """The trained model (wrapped for test-time augmentation at level ``tta``) and its checkpoint."""
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    return with_tta(model, tta), checkpoint


def load_test_split(paths: ProjectPaths, class_names: list[str]) -> tuple[str, NpyReader, np.ndarray]:
    """The data set's name, the test images and labels, checked against the model's classes."""
    prepared = load_prepared(paths.prepared_dir, ("test",))
    prepared.require_classes(class_names, paths.checkpoint)
    images, labels = prepared.splits["test"]
    return prepared.meta["dataset"], images, labels


def score_predictions(result: dict, labels: np.ndarray, class_names: list[str], temperature: float = 1.0) -> Evaluation:
    """Confusion matrix, per-class metrics and the overall accuracy with its interval."""
    predictions = result["predictions"].cpu().numpy()
    logits = result["logits"].float().cpu().numpy()
    confusion = confusion_matrix(labels, predictions, len(class_names))
    return Evaluation(
        labels=labels,
        predictions=predictions,
        confusion=confusion,
        per_class=per_class_metrics(confusion, class_names),
        score=accuracy_of(predictions, labels),
        accuracy=result["accuracy"],
        loss=result["loss"],
        logits=logits,
        temperature=temperature,
        probabilities=probabilities(logits, temperature),
        class_names=list(class_names),
    )


def calibration_summary(outcome: Evaluation) -> dict:
    """ECE and negative log-likelihood before and after the temperature (eval.json's calibration)."""
    before, after = probabilities(outcome.logits, 1.0), outcome.probabilities
    rows = np.arange(len(outcome.labels))
    return {
        "temperature": outcome.temperature,
        "ece_before": expected_calibration_error(before, outcome.labels),
        "ece_after": expected_calibration_error(after, outcome.labels),
        "nll_before": float(-np.log(np.maximum(before[rows, outcome.labels], 1e-12)).mean()),
        "nll_after": float(-np.log(np.maximum(after[rows, outcome.labels], 1e-12)).mean()),
        "bins": CALIBRATION_BINS,
    }


def leak_summary(paths: ProjectPaths, outcome: Evaluation) -> dict:
    """The test accuracy without the test images that have an exact or near copy in train or val (the
    duplicates stage's data/audit/duplicates.json), beside the counts; empty when that stage has not run."""
    leaks = read_leaks(paths.audit_dir / "duplicates.json", len(outcome.labels))
    if leaks is None:
        return {}
    keep = np.ones(len(outcome.labels), dtype=bool)
    keep[leaks["leaked_test_rows"]] = False
    clean = accuracy_of(outcome.predictions[keep], outcome.labels[keep])
    low, high = clean.ci95
    return {
        "duplicates": leaks["counts"],
        "test_without_leaks": {
            "accuracy": clean.value,
            "ci95_low": low,
            "ci95_high": high,
            "images": clean.images,
            "left_out": int((~keep).sum()),
        },
    }


def report_calibration_and_leaks(emit: Callable[[str], None], calibration: dict, leaks: dict) -> None:
    emit(
        f"calibration: expected calibration error {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} "
        f"with temperature {calibration['temperature']:.3f} (fitted on the validation split); "
        "metrics/reliability.png"
    )
    if leaks:
        clean, counts = leaks["test_without_leaks"], leaks["duplicates"]
        text = f"{clean['accuracy']:.4f} on {clean['images']} images" if clean["images"] else "no image left"
        copies = "an exact or near copy" if counts["near_searched"] else "an exact copy (near copies not searched)"
        emit(
            f"{clean['left_out']} test image(s) have {copies} in train/val "
            f"({counts['cross_split_exact']} exact, {counts['cross_split_near']} near pairs across splits); "
            f"test accuracy without them {text} (eval.json: test_without_leaks; metrics/duplicates.csv)"
        )


def write_eval_json(path: Path, outcome: Evaluation, *, tta: str, precision: str, extra: dict | None = None) -> dict:
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
    evaluation = {"test": test, **summary, **(extra or {}), "tta": tta, "precision": precision}
    write_json(path, evaluation)
    return evaluation


def write_tables_and_plots(
    metrics_dir: Path,
    images: NpyReader,
    outcome: Evaluation,
    class_names: list[str],
    *,
    title: str,
    misclassified_images: int,
    names: list[str] | None = None,
) -> int:
    """per_class.csv, test_predictions.csv (DVC's confusion plot), the confusion matrix, the reliability
    diagram and the grid of misclassified images; returns how many the grid shows."""
    labels, predictions = outcome.labels, outcome.predictions
    calibrated = outcome.probabilities
    write_per_class_csv(metrics_dir / "per_class.csv", outcome.per_class)
    write_predictions_csv(
        metrics_dir / "test_predictions.csv",
        labels,
        predictions,
        class_names,
        confidence=calibrated.max(axis=1),
        names=names,
    )
    before = reliability(probabilities(outcome.logits, 1.0), labels)
    after = reliability(calibrated, labels)
    write_reliability(metrics_dir / "reliability", before, after)
    plot_reliability(metrics_dir / "reliability.png", before, after, temperature=outcome.temperature)
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
