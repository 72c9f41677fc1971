"""evaluate stage: test-set accuracy/loss, per-class accuracy/precision/recall, confusion matrix, misclassified grid."""

import torch

from imgcls.checkpoint import load_checkpoint
from imgcls.cli import log, run_stage
from imgcls.evaluation import (confusion_matrix, per_class_metrics, plot_confusion_matrix, plot_misclassified,
                               write_per_class_csv, write_predictions_csv)
from imgcls.fileio import write_json
from imgcls.models import TTAModel
from imgcls.prepare import load_prepared
from imgcls.runtime import resolve_device, resolve_precision
from imgcls.training import evaluate


def main() -> None:
    def body(params, paths):
        config, emit = params.evaluate, log("evaluate")
        device = resolve_device(params.base.device)
        precision = resolve_precision(params.train.precision, device)
        model, checkpoint = load_checkpoint(paths.checkpoint, device)
        if config.tta:
            model = TTAModel(model)
        prepared = load_prepared(paths.prepared_dir, ("test",))
        images, labels = prepared.splits["test"]
        class_names = checkpoint["class_names"]
        result = evaluate(model, torch.from_numpy(images), torch.from_numpy(labels), batch_size=config.batch_size,
                          device=device, precision=precision)
        predictions = result["predictions"].cpu().numpy()
        confusion = confusion_matrix(labels, predictions, len(class_names))
        per_class = per_class_metrics(confusion, class_names)
        metrics_dir = paths.metrics_dir
        write_json(metrics_dir / "eval.json", {
            "test": {"accuracy": result["accuracy"], "loss": result["loss"], "images": int(len(labels))},
            "per_class": {name: {k: v for k, v in values.items() if k != "support"} for name, values in per_class.items()},
            "tta": config.tta, "precision": precision,
        })
        write_per_class_csv(metrics_dir / "per_class.csv", per_class)
        write_predictions_csv(metrics_dir / "test_predictions.csv", labels, predictions, class_names)
        plot_confusion_matrix(metrics_dir / "confusion_matrix.png", confusion, class_names,
                              title=f"{prepared.meta['dataset']} test, accuracy {result['accuracy']:.4f}")
        shown = plot_misclassified(metrics_dir / "misclassified.png", images, labels, predictions, class_names,
                                   config.misclassified_images)
        worst = min(per_class, key=lambda n: per_class[n]["accuracy"])
        emit(f"test accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} on {len(labels)} images; "
             f"weakest class {worst!r} ({per_class[worst]['accuracy']:.3f}); {shown} misclassified images drawn")

    run_stage("evaluate", body)


if __name__ == "__main__":
    main()
