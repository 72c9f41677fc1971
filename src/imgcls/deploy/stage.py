"""export stage: TorchScript + ONNX with normalization inside (no TTA unless export.tta), self-describing
(class names, input size, data set, test accuracy in the files), parity-checked, the exported graph's own
test accuracy, an int8 ONNX model that must stay within export.int8_max_drop, batch-1 latency, a model card."""

from __future__ import annotations

import numpy as np
import torch

from ..cli import log
from ..errors import ExportError
from ..evaluate.metrics import confusion_matrix
from ..fileio import atomic_dir, write_json, write_text
from ..model.checkpoint import load_checkpoint
from ..model.networks import TTAModel
from ..params import Params
from ..paths import ProjectPaths
from ..prepared import load_prepared
from ..runtime import cpu_model, set_threads
from ..stats import wilson_interval
from .card import model_card
from .export import check_parity, export_onnx, export_torchscript, measure_latency, median_latency_ms
from .metadata import add_onnx_metadata, model_facts
from .onnx_session import onnx_session
from .quantize import onnx_logits, quantize_int8


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    correct = int((logits.argmax(1) == labels).sum())
    return {
        "test_accuracy": correct / len(labels),
        "images": int(len(labels)),
        "ci95": list(wilson_interval(correct, len(labels))),
    }


def export(params: Params, paths: ProjectPaths) -> None:
    config, emit = params.export, log("export")
    set_threads(params.base.threads)
    model, checkpoint = load_checkpoint(paths.checkpoint, "cpu")  # exports are fp32 CPU graphs
    if config.tta:
        model = TTAModel(model).eval()
    prepared = load_prepared(paths.prepared_dir, ("train", "test"))
    prepared.require_classes(checkpoint["class_names"], paths.checkpoint)
    test_images, test_labels = prepared.splits["test"]  # NpyReaders: read batch by batch
    images01 = test_images.read(0, config.parity_images).astype(np.float32) / 255  # (N, C, H, W) in [0, 1]
    example = torch.from_numpy(images01[:2])
    with atomic_dir(
        paths.export_dir, clean_stale=True
    ) as tmp:  # nothing is published unless parity and the int8 check hold
        torchscript_path, onnx_path, int8_path = (
            tmp / "model.torchscript.pt",
            tmp / "model.onnx",
            tmp / "model.int8.onnx",
        )
        export_onnx(model, example, onnx_path, config.opset)
        logits = onnx_logits(onnx_path, test_images)
        fp32 = _accuracy(logits, test_labels)
        facts = model_facts(
            checkpoint, dataset=prepared.meta["dataset"], test_accuracy=fp32["test_accuracy"], tta=config.tta
        )
        add_onnx_metadata(onnx_path, facts)
        export_torchscript(model, example, torchscript_path, facts)
        parity = check_parity(model, torchscript_path, onnx_path, images01, config.parity_atol)
        latency = measure_latency(torchscript_path, onnx_path, images01[0], config.latency_calls)
        sizes = {"torchscript_bytes": torchscript_path.stat().st_size, "onnx_bytes": onnx_path.stat().st_size}

        train_images = prepared.splits["train"][0]
        rng = np.random.default_rng(params.base.seed)
        rows = np.sort(
            rng.choice(len(train_images), min(config.int8_calibration_images, len(train_images)), replace=False)
        )
        quantize_int8(onnx_path, int8_path, train_images.take(rows).astype(np.float32) / 255)
        int8_logits = onnx_logits(int8_path, test_images)
        int8 = _accuracy(int8_logits, test_labels)
        int8["accuracy_drop_points"] = 100 * (fp32["test_accuracy"] - int8["test_accuracy"])
        int8["max_drop_points"] = config.int8_max_drop
        int8["calibration_images"] = int(len(rows))
        if int8["accuracy_drop_points"] > config.int8_max_drop:
            raise ExportError(
                f"the int8 model scores {int8['test_accuracy']:.4f} on the test split, "
                f"{int8['accuracy_drop_points']:.2f} "
                f"points below fp32 ({fp32['test_accuracy']:.4f}), over export.int8_max_drop ({config.int8_max_drop}); "
                "nothing was exported. Raise export.int8_max_drop or export.int8_calibration_images"
            )
        add_onnx_metadata(int8_path, {**facts, "test_accuracy": int8["test_accuracy"], "int8": True})
        session = onnx_session(int8_path, threads=1)
        one = np.ascontiguousarray(images01[:1])
        int8["onnxruntime_median_ms"] = median_latency_ms(
            lambda: session.run(None, {"images": one}), config.latency_calls
        )
        int8["onnx_bytes"] = int8_path.stat().st_size
        int8["speedup_vs_fp32"] = latency["onnxruntime_median_ms"] / int8["onnxruntime_median_ms"]

        confusion = confusion_matrix(np.asarray(test_labels), logits.argmax(1), len(facts["class_names"]))
        card = model_card(
            facts=facts,
            checkpoint=checkpoint,
            meta=prepared.meta,
            confusion=confusion,
            fp32=fp32,
            int8=int8,
            latency=latency,
            sizes=sizes,
            cpu=cpu_model(),
        )
        (tmp / "model_card.md").write_text(card)
    write_text(paths.metrics_dir / "model_card.md", card)
    write_json(
        paths.metrics_dir / "export.json",
        {
            "files": sizes,
            "parity": parity,
            "latency": latency,
            "tta": config.tta,
            "fp32": fp32,
            "int8": int8,
            "cpu": cpu_model(),
        },
    )
    emit(
        f"parity on {parity['images']} images: max |diff| "
        f"torchscript {parity['torchscript']['max_abs_logit_diff']:.2e}, "
        f"onnx {parity['onnx']['max_abs_logit_diff']:.2e}; test accuracy fp32 {fp32['test_accuracy']:.4f}, int8 "
        f"{int8['test_accuracy']:.4f} ({int8['accuracy_drop_points']:+.2f} points); batch-1 median latency onnxruntime "
        f"{latency['onnxruntime_median_ms']:.3f} ms (int8 {int8['onnxruntime_median_ms']:.3f} ms), torchscript "
        f"{latency['torchscript_median_ms']:.3f} ms"
    )
