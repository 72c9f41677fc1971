"""evaluate stage: test-set accuracy/loss, per-class accuracy/precision/recall, confusion matrix, misclassified grid."""

from __future__ import annotations

import torch

from ..cli import log
from ..fileio import write_json
from ..model.checkpoint import load_checkpoint
from ..model.inference import evaluate_model
from ..model.networks import TTAModel
from ..params import Params
from ..paths import ProjectPaths
from ..prepared import load_prepared
from ..runtime import resolve_device, resolve_precision, set_threads
from ..stats import wilson_interval
from .metrics import (
    confusion_matrix,
    per_class_metrics,
    plot_confusion_matrix,
    plot_misclassified,
    write_per_class_csv,
    write_predictions_csv,
)


def evaluate(params: Params, paths: ProjectPaths) -> None:
    config, emit = params.evaluate, log("evaluate")
    set_threads(params.base.threads)
    device = resolve_device(params.base.device)
    precision = resolve_precision(params.train.precision, device)
    model, checkpoint = load_checkpoint(paths.checkpoint, device)
    if config.tta:
        model = TTAModel(model)
    prepared = load_prepared(paths.prepared_dir, ("test",))
    prepared.require_classes(checkpoint["class_names"], paths.checkpoint)
    images, labels = prepared.splits["test"]
    class_names = checkpoint["class_names"]
    # images: an NpyReader, read batch by batch (memory holds a batch, not the test split)
    result = evaluate_model(
        model, images, torch.from_numpy(labels), batch_size=config.batch_size, device=device, precision=precision
    )
    predictions = result["predictions"].cpu().numpy()
    confusion = confusion_matrix(labels, predictions, len(class_names))
    per_class = per_class_metrics(confusion, class_names)
    metrics_dir = paths.metrics_dir
    correct = int((predictions == labels).sum())
    low, high = wilson_interval(correct, len(labels))
    write_json(
        metrics_dir / "eval.json",
        {
            "test": {
                "accuracy": result["accuracy"],
                "ci95_low": low,
                "ci95_high": high,
                "loss": result["loss"],
                "images": int(len(labels)),
                "correct": correct,
            },
            "per_class": per_class,
            "tta": config.tta,
            "precision": precision,
        },
    )
    write_per_class_csv(metrics_dir / "per_class.csv", per_class)
    write_predictions_csv(metrics_dir / "test_predictions.csv", labels, predictions, class_names)
    plot_confusion_matrix(
        metrics_dir / "confusion_matrix.png",
        confusion,
        class_names,
        title=f"{prepared.meta['dataset']} test, accuracy {result['accuracy']:.4f}",
    )
    shown = plot_misclassified(
        metrics_dir / "misclassified.png", images, labels, predictions, class_names, config.misclassified_images
    )
    missing = [name for name, values in per_class.items() if values["images"] == 0]
    if missing:
        emit(f"no test images of class(es) {missing}: their accuracy is reported as null, not 0")
    scored = {name: values for name, values in per_class.items() if values["images"]}
    worst = min(scored, key=lambda n: scored[n]["accuracy"])
    emit(
        f"test accuracy {result['accuracy']:.4f} (95% interval {low:.4f}..{high:.4f}), loss {result['loss']:.4f} "
        f"on {len(labels)} images; "
        f"weakest class {worst!r} ({per_class[worst]['accuracy']:.3f}); {shown} misclassified images drawn"
    )
