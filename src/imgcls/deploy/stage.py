"""export stage: TorchScript + ONNX with normalization inside (no TTA unless export.tta), self-describing
(class names, input size, data set, test accuracy in the files), parity-checked, the exported graph's own
test accuracy, an int8 ONNX model that must stay within export.int8_max_drop, batch-1 latency, a model card."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arrays import NpyReader
from ..calibration import expected_calibration_error, probabilities
from ..cli import log
from ..errors import ExportError
from ..evaluate.leaks import read_leaks
from ..evaluate.metrics import confusion_matrix
from ..fileio import atomic_dir, write_json, write_text
from ..model.checkpoint import load_checkpoint
from ..model.networks import with_tta
from ..params.export import ExportParams
from ..params.export import ExportStageParams as Params
from ..paths import ProjectPaths
from ..prepared import load_prepared
from ..runtime import cpu_model, set_threads
from ..stats import PairedDrop, accuracy_of, paired_drop
from .card import model_card
from .export import check_parity, export_onnx, export_torchscript, measure_latency, onnx_median_ms
from .metadata import add_onnx_metadata, model_facts
from .onnx_session import onnx_logits
from .quantize import quantize_int8


@dataclass
class Fp32Export:
    """The fp32 exports (model.onnx, model.torchscript.pt): what they say about themselves and what was
    measured on them."""

    facts: dict  # the self-description written into both files
    logits: np.ndarray  # the ONNX graph's logits on the test split (N, classes)
    accuracy: dict  # test_accuracy, images, ci95
    parity: dict
    latency: dict
    sizes: dict


def export(params: Params, paths: ProjectPaths) -> None:
    """The export stage: load the model and the data, write the fp32 and int8 exports and the model card
    into data/export (published only when every check holds), then the metrics."""
    config, emit = params.export, log("export")
    set_threads(params.base.threads)
    model, checkpoint = load_model(paths.checkpoint, tta=config.tta)
    prepared = load_prepared(paths.prepared_dir, ("train", "test"))
    prepared.require_classes(checkpoint["class_names"], paths.checkpoint)
    test_images, test_labels = prepared.splits["test"]  # NpyReaders: read batch by batch
    images01 = test_images.read(0, config.parity_images).astype(np.float32) / 255  # (N, C, H, W) in [0, 1]
    # Nothing is published unless parity and the int8 check hold.
    with atomic_dir(paths.export_dir, clean_stale=True) as folder:
        fp32 = export_fp32(
            model, checkpoint, prepared.meta["dataset"], test_images, test_labels, images01, folder, config
        )
        calibration = calibration_images(prepared.splits["train"][0], config.int8_calibration_images, params.base.seed)
        int8 = export_int8(fp32, calibration, test_images, test_labels, images01, folder, config)
        card = model_card(
            facts=fp32.facts,
            checkpoint=checkpoint,
            meta=prepared.meta,
            confusion=confusion_matrix(np.asarray(test_labels), fp32.logits.argmax(1), len(fp32.facts["class_names"])),
            fp32=fp32.accuracy,
            int8=int8,
            latency=fp32.latency,
            sizes=fp32.sizes,
            cpu=cpu_model(),
            trust=trust_findings(paths, fp32, np.asarray(test_labels)),
        )
        (folder / "model_card.md").write_text(card)
    write_metrics(paths.metrics_dir, card, fp32, int8, tta=config.tta)
    emit(summary_line(fp32, int8))


def trust_findings(paths: ProjectPaths, fp32: Fp32Export, labels: np.ndarray) -> dict:
    """The model card's "how far to trust it": calibration measured on the exported graph's test logits,
    the duplicates stage's leaks (the graph's accuracy without the leaked test images), the label_errors
    stage's summary (metrics/label_errors.json)."""
    calibrated = probabilities(fp32.logits, fp32.facts["temperature"])
    findings: dict = {
        "calibration": {
            "temperature": fp32.facts["temperature"],
            "ece_before": expected_calibration_error(probabilities(fp32.logits, 1.0), labels),
            "ece_after": expected_calibration_error(calibrated, labels),
        }
    }
    leaks = read_leaks(paths.audit_dir / "duplicates.json", len(labels))
    if leaks is not None:
        keep = np.ones(len(labels), dtype=bool)
        keep[leaks["leaked_test_rows"]] = False
        clean = accuracy_of(fp32.logits.argmax(1)[keep], labels[keep])
        findings["leaks"] = {
            "counts": leaks["counts"],
            "test_without_leaks": {"accuracy": clean.value, "images": clean.images, "left_out": int((~keep).sum())},
        }
    summary = paths.metrics_dir / "label_errors.json"
    if summary.is_file():
        try:
            findings["label_errors"] = json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            findings["label_errors"] = None
    return findings


def load_model(checkpoint_path: Path, *, tta: str) -> tuple[nn.Module, dict]:
    """The trained model on the CPU (exports are fp32 CPU graphs), wrapped for test-time augmentation with
    ``tta``, and its checkpoint."""
    model, checkpoint = load_checkpoint(checkpoint_path, "cpu")
    return with_tta(model, tta).eval(), checkpoint


def graph_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    """An exported graph's test accuracy, the images behind it and its 95% Wilson interval."""
    score = accuracy_of(logits.argmax(1), labels)
    return {"test_accuracy": score.value, "images": score.images, "ci95": list(score.ci95)}


def export_fp32(
    model: nn.Module,
    checkpoint: dict,
    dataset: str,
    test_images: NpyReader,
    test_labels: np.ndarray,
    images01: np.ndarray,
    folder: Path,
    config: ExportParams,
) -> Fp32Export:
    """model.onnx and model.torchscript.pt in ``folder``: self-describing, parity-checked on ``images01``,
    timed at batch 1, the ONNX graph's own test accuracy measured."""
    example = torch.from_numpy(images01[:2])
    torchscript_path, onnx_path = folder / "model.torchscript.pt", folder / "model.onnx"
    export_onnx(model, example, onnx_path, config.opset)
    logits = onnx_logits(onnx_path, test_images)
    accuracy = graph_accuracy(logits, test_labels)
    facts = model_facts(checkpoint, dataset=dataset, test_accuracy=accuracy["test_accuracy"], tta=config.tta)
    add_onnx_metadata(onnx_path, facts)
    export_torchscript(model, example, torchscript_path, facts)
    parity = check_parity(model, torchscript_path, onnx_path, images01, config.parity_atol)
    latency = measure_latency(torchscript_path, onnx_path, images01[0], config.latency_calls)
    sizes = {"torchscript_bytes": torchscript_path.stat().st_size, "onnx_bytes": onnx_path.stat().st_size}
    return Fp32Export(facts, logits, accuracy, parity, latency, sizes)


def calibration_images(train_images: NpyReader, count: int, seed: int) -> np.ndarray:
    """Up to ``count`` training images drawn at random (never the test split), float32 [0, 1]."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train_images), min(count, len(train_images)), replace=False))
    return train_images.take(rows).astype(np.float32) / 255


def export_int8(
    fp32: Fp32Export,
    calibration01: np.ndarray,
    test_images: NpyReader,
    test_labels: np.ndarray,
    images01: np.ndarray,
    folder: Path,
    config: ExportParams,
) -> dict:
    """model.int8.onnx in ``folder``, quantized from model.onnx with ``calibration01``; an ExportError when its
    test accuracy drops more than export.int8_max_drop points below fp32 *and* more than the test split's
    noise. Returns its accuracy, the drop with its noise, speed and size."""
    int8_path = folder / "model.int8.onnx"
    quantize_int8(folder / "model.onnx", int8_path, calibration01)
    int8_logits = onnx_logits(int8_path, test_images)
    int8 = graph_accuracy(int8_logits, test_labels)
    drop = paired_drop(fp32.logits.argmax(1), int8_logits.argmax(1), test_labels)
    int8["accuracy_drop_points"] = drop.drop_points
    int8["noise_points"] = drop.noise_points
    int8["images_worse_than_fp32"], int8["images_better_than_fp32"] = drop.worse, drop.better
    int8["max_drop_points"] = config.int8_max_drop
    int8["calibration_images"] = int(len(calibration01))
    more_calibration = len(calibration01) >= config.int8_calibration_images  # the training set was not exhausted
    check_int8_drop(
        drop,
        fp32.accuracy["test_accuracy"],
        int8["test_accuracy"],
        config.int8_max_drop,
        more_calibration=more_calibration,
    )
    add_onnx_metadata(int8_path, {**fp32.facts, "test_accuracy": int8["test_accuracy"], "int8": True})
    int8["onnxruntime_median_ms"] = onnx_median_ms(int8_path, images01[0], config.latency_calls)
    int8["onnx_bytes"] = int8_path.stat().st_size
    int8["speedup_vs_fp32"] = fp32.latency["onnxruntime_median_ms"] / int8["onnxruntime_median_ms"]
    return int8


def int8_drop_summary(drop: PairedDrop, fp32_accuracy: float, int8_accuracy: float) -> str:
    return (
        f"int8 {int8_accuracy:.4f} against fp32 {fp32_accuracy:.4f} on {drop.images:,} test images: "
        f"{drop.drop_points:.2f} points lower ({drop.worse} images now wrong, {drop.better} now right); "
        f"a drop within +-{drop.noise_points:.2f} points is noise at this size"
    )


def check_int8_drop(
    drop: PairedDrop, fp32_accuracy: float, int8_accuracy: float, max_drop: float, *, more_calibration: bool = True
) -> None:
    """Refuse an int8 model that is worse by more than export.int8_max_drop *and* by more than the noise of
    this many test images: on 153 images one flipped image is 0.65 points, which proves nothing.
    ``more_calibration``: whether more training images exist than calibration took (else raising
    export.int8_calibration_images cannot help, and the message does not offer it)."""
    if drop.drop_points > max(max_drop, drop.noise_points):
        allow = f"export.int8_max_drop={math.ceil(drop.drop_points)}"
        calibrate = "export.int8_calibration_images, or " if more_calibration else ""
        raise ExportError(
            f"{int8_drop_summary(drop, fp32_accuracy, int8_accuracy)}, and export.int8_max_drop allows "
            f"{max_drop}; nothing was exported (the previous exports are kept). Raise {calibrate}accept this "
            f"drop with -S {allow} (small models trained on little data often quantize poorly)"
        )


def write_metrics(metrics_dir: Path, card: str, fp32: Fp32Export, int8: dict, *, tta: str) -> None:
    """metrics/model_card.md (a copy of the exported card) and metrics/export.json."""
    write_text(metrics_dir / "model_card.md", card)
    write_json(
        metrics_dir / "export.json",
        {
            "files": fp32.sizes,
            "parity": fp32.parity,
            "latency": fp32.latency,
            "tta": tta,
            "fp32": fp32.accuracy,
            "int8": int8,
            "cpu": cpu_model(),
        },
    )


def summary_line(fp32: Fp32Export, int8: dict) -> str:
    parity, latency = fp32.parity, fp32.latency
    return (
        f"parity on {parity['images']} images: max |diff| "
        f"torchscript {parity['torchscript']['max_abs_logit_diff']:.2e}, "
        f"onnx {parity['onnx']['max_abs_logit_diff']:.2e}; test accuracy fp32 {fp32.accuracy['test_accuracy']:.4f}, "
        f"int8 {int8['test_accuracy']:.4f} "
        f"({int8['accuracy_drop_points']:.2f} points lower, noise +-{int8['noise_points']:.2f}); "
        "batch-1 median latency "
        f"onnxruntime {latency['onnxruntime_median_ms']:.3f} ms (int8 {int8['onnxruntime_median_ms']:.3f} ms), "
        f"torchscript {latency['torchscript_median_ms']:.3f} ms"
    )
