"""The model card: what the exported model is, what it was trained on, how well it does per class and which
classes it confuses, its input contract, speed, intended use and known limits. Markdown, built from numbers
the export stage measured on the exported graph itself."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from ..evaluate.metrics import per_class_metrics
from ..stats import spread_of_confusion

TTA_WORDS = {
    "none": "no",
    "mirror": "yes, the image and its mirror (2 views, twice the latency)",
    "mirror_shifts": "yes, mirror and one-pixel shifts (6 views, 6x the latency)",
}


def tta_words(level: str) -> str:
    return TTA_WORDS.get(level, str(level))


def confused_pairs(confusion: np.ndarray, class_names: list[str], top: int = 5) -> list[tuple[str, str, int]]:
    """The ``top`` most frequent (true, predicted, images) mistakes, largest first; none with zero images."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = [(class_names[i // len(class_names)], class_names[i % len(class_names)], int(off.flat[i])) for i in order]
    return [p for p in pairs if p[2] > 0]


def start_line(start: dict | None) -> str:
    """Where the weights started: from scratch, torchvision's ImageNet weights or a checkpoint (fine-tuned)."""
    if not start:
        return "- Starting weights: none (trained from scratch)."
    if start["kind"] == "pretrained":
        which = "the published file" if start["official_file"] else "not torchvision's published file"
        return (
            f"- Starting weights: torchvision's {start['weights']} ({which}, sha256 {start['sha256'][:12]}); "
            "the head was replaced for these classes."
        )
    return (
        f"- Starting weights: fine-tuned from the checkpoint {start['file']} (sha256 {start['sha256'][:12]}, "
        f"trained on {start.get('dataset')} classes {', '.join(start['classes'])}); head {start['head']}."
    )


def model_card(
    *,
    facts: dict,
    checkpoint: dict,
    meta: dict,
    confusion: np.ndarray,
    fp32: dict,
    int8: dict | None,
    latency: dict,
    sizes: dict,
    cpu: str,
    trust: dict | None = None,
) -> str:
    """The card in Markdown, one section each: what the files take and give, the data, test results, how
    far to trust them (``trust``: calibration, leaks, label suspects; see trust_section), training recipe,
    speed, intended use and known limits."""
    sections = [
        title_section(facts),
        input_section(facts, int8, sizes),
        data_section(facts, meta),
        results_section(facts["class_names"], confusion, fp32, int8),
        trust_section(trust or {}),
        training_section(checkpoint),
        speed_section(latency, int8, cpu),
        intended_use_section(facts["class_names"]),
        limits_section(facts["class_names"], confusion, fp32),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def title_section(facts: dict) -> list[str]:
    return [
        f"# Model card: {facts['dataset']} classifier ({facts['architecture']})",
        "",
        f"Written by the export stage on {datetime.now(UTC):%Y-%m-%d} from this run's checkpoint. Every "
        "number below was measured by that stage on the exported ONNX graph, on the test split.",
    ]


def input_section(facts: dict, int8: dict | None, sizes: dict) -> list[str]:
    """The input contract (shape, range, normalization, preprocessing), the output and the files."""
    size, channels, names = facts["image_size"], facts["channels"], facts["class_names"]
    pretrained = (facts.get("start") or {}).get("kind") == "pretrained"
    return [
        "## Input and output",
        f"- Input: `images`, float32 (N, {channels}, {size}, {size}), values in [0, 1]; the normalization "
        f"(mean {', '.join(f'{m:.4f}' for m in facts['mean'])}, std {', '.join(f'{s:.4f}' for s in facts['std'])}"
        + (", ImageNet's, which the pretrained weights expect" if pretrained else "")
        + ") is inside the graph.",
        f"- A picture becomes input as in training: {'grayscale' if channels == 1 else 'RGB'} conversion, "
        f"transparency composited onto white, EXIF rotation, bilinear resize to {size}x{size} "
        "(`imgcls.preprocess.images`; `imgcls predict` does all of it).",
        f"- Output: `logits` (N, {len(names)}), classes in this order: {', '.join(names)}.",
        f"- Test-time augmentation inside the graph: {tta_words(facts['tta'])}.",
        f"- Files: model.onnx ({sizes['onnx_bytes'] / 1e6:.2f} MB)"
        + (f", model.int8.onnx ({int8['onnx_bytes'] / 1e6:.2f} MB)" if int8 else "")
        + f", model.torchscript.pt ({sizes['torchscript_bytes'] / 1e6:.2f} MB). The ONNX metadata (`imgcls`) holds "
        "class names, input size, channels, data set and test accuracy.",
    ]


def data_section(facts: dict, meta: dict) -> list[str]:
    return [
        "## Data",
        f"- Data set: {facts['dataset']}, {len(facts['class_names'])} classes; images per split: "
        + ", ".join(f"{split} {sum(counts.values()):,}" for split, counts in meta.get("counts", {}).items())
        + ".",
    ]


def per_class_accuracy(confusion: np.ndarray, class_names: list[str]) -> list[tuple[str, float | None, int]]:
    """(class, test accuracy or None without test images, test images) per class."""
    metrics = per_class_metrics(confusion, class_names)
    return [(name, values["accuracy"], values["images"]) for name, values in metrics.items()]


def results_section(names: list[str], confusion: np.ndarray, fp32: dict, int8: dict | None) -> list[str]:
    """Test accuracy (fp32 and int8), the per-class table and the most confused pairs."""
    lines = ["## Results on the test split"]
    spread = spread_of_confusion(confusion)
    if spread.constant:
        lines.append(
            f"- **Warning: a constant classifier.** It answers {names[spread.top_class]} for "
            f"{spread.top_share:.0%} of the test images ({spread.top_true_share:.0%} are {names[spread.top_class]}): "
            f"it ignores its input and scores what always guessing scores ({spread.chance:.3f}). Do not deploy it; "
            "the train log names the params most likely behind it."
        )
    lines.append(
        f"- Accuracy (fp32 ONNX): **{fp32['test_accuracy']:.4f}** on {fp32['images']:,} images "
        f"(95% interval {fp32['ci95'][0]:.4f} to {fp32['ci95'][1]:.4f}, Wilson; always answering the most common "
        f"class would score {spread.chance:.3f})."
    )
    if int8:
        lines.append(
            f"- Accuracy (int8 ONNX): {int8['test_accuracy']:.4f}, {int8['accuracy_drop_points']:.2f} points "
            f"lower than fp32 ({int8['images_worse_than_fp32']} images now wrong, "
            f"{int8['images_better_than_fp32']} now right; a drop within ±{int8['noise_points']:.2f} points is "
            "noise at this many test images)."
        )
    lines += ["", "| class | test images | accuracy |", "|---|---:|---:|"]
    lines += [
        f"| {name} | {n:,} | {'n/a (no test images)' if acc is None else f'{acc:.3f}'} |"
        for name, acc, n in per_class_accuracy(confusion, names)
    ]
    pairs = confused_pairs(confusion, names)
    if pairs:
        lines += [
            "",
            "Most confused (true -> predicted: images): " + "; ".join(f"{a} -> {b}: {n}" for a, b, n in pairs) + ".",
        ]
    return lines


def trust_section(trust: dict) -> list[str]:
    """How far to trust the numbers above: calibrated confidence (ECE before and after the temperature),
    test images with a copy in train/val (and the accuracy without them), likely label errors found."""
    lines = ["## How far to trust it"]
    calibration = trust.get("calibration")
    if calibration:
        lines.append(
            f"- Confidence: probabilities are softmax(logits / {calibration['temperature']:.3f}), the temperature "
            "fitted on the validation split. Expected calibration error on the test split "
            f"{calibration['ece_before']:.4f} before, **{calibration['ece_after']:.4f}** after (0: a 0.9 "
            "confidence is right 90% of the time). Reliability diagram: metrics/reliability.png."
        )
    leaks = trust.get("leaks")
    if leaks is None:
        lines.append("- Duplicates between splits: not checked (the duplicates stage has not run).")
    else:
        counts, clean = leaks["counts"], leaks["test_without_leaks"]
        if clean["left_out"]:
            accuracy = f"{clean['accuracy']:.4f}" if clean["images"] else "n/a"
            lines.append(
                f"- **{clean['left_out']} test image(s) have an exact or near copy in train or val** "
                f"({counts['cross_split_exact']} exact and {counts['cross_split_near']} near pairs across the "
                f"splits): without them the test accuracy is {accuracy} on {clean['images']:,} images. "
                "Pairs: metrics/duplicates.csv and metrics/duplicates.png."
            )
        else:
            searched = (
                "an exact or near copy" if counts["near_searched"] else "an exact copy (near copies not searched)"
            )
            lines.append(
                f"- Duplicates between splits: none found (no test image has {searched} in train or val; "
                f"{counts['within_split_exact']} exact and {counts['within_split_near']} near pairs within splits)."
            )
    labels = trust.get("label_errors")
    if labels and labels.get("folds"):
        lines.append(
            f"- Labels: {labels['suspects']:,} training image(s) look mislabelled to models trained "
            f"{labels['folds']}-fold without them (confident learning; out-of-sample accuracy "
            f"{labels['out_of_sample_accuracy']:.4f}). Ranked list: metrics/label_suspects.csv; the first ones: "
            "metrics/label_suspects.png."
        )
    elif labels is not None:
        lines.append("- Labels: not checked (audit.label_folds: 0).")
    lines.append("- Where the model looks on test images: metrics/activation_maps.png.")
    return lines


def training_section(checkpoint: dict) -> list[str]:
    """The recipe as the checkpoint recorded it (run length and batch as trained), start and time."""
    train = checkpoint["params"]["train"]
    extra = checkpoint.get("extra", {})
    augment = train["augment"]
    shown = ("flip", "translate", "crop_scale", "color_jitter", "policy", "mixup", "cutmix")
    return [
        "## Training",
        f"- Recipe: `{train['model']}` width {train['width']}, {extra.get('epochs', train['epochs'])} epochs, "
        f"batch {extra.get('batch_size', train['batch_size'])}, "
        f"{train['optimizer']} lr {train['lr']} ({train['schedule']} schedule, "
        f"{train['warmup_epochs']} warm-up epochs), "
        f"label smoothing {train['label_smoothing']}; augmentation "
        + ", ".join(f"{key} {augment[key]}" for key in shown if key in augment)
        + f"; seed {checkpoint['params']['base']['seed']}.",
        start_line(extra.get("start")),
        f"- Training time: {extra.get('train_seconds', float('nan')):.1f} s, precision {extra.get('precision', '?')}"
        + (f", on {extra['device']}" if extra.get("device") else "")
        + ".",
    ]


def speed_section(latency: dict, int8: dict | None, cpu: str) -> list[str]:
    return [
        "## Speed",
        f"- Batch-1 median latency, one thread, on {cpu}: ONNX Runtime fp32 {latency['onnxruntime_median_ms']:.3f} ms"
        + (f", int8 {int8['onnxruntime_median_ms']:.3f} ms" if int8 else "")
        + f", TorchScript {latency['torchscript_median_ms']:.3f} ms.",
    ]


def intended_use_section(names: list[str]) -> list[str]:
    return [
        "## Intended use",
        f"- Sorting pictures like the training pictures (same kind of subject, framing and source) into these "
        f"{len(names)} classes, and as a baseline to compare recipes against with `dvc exp`.",
    ]


def limits_section(names: list[str], confusion: np.ndarray, fp32: dict) -> list[str]:
    """What the model cannot do, its weakest class, and a warning when the test split is small."""
    lines = [
        "## Known limits",
        f"- It always answers one of the {len(names)} classes: a picture of anything else gets a confident-looking "
        "wrong answer. Its probabilities are calibrated on pictures like the validation split, not on others.",
        "- The accuracy above holds for pictures from the same source as the test split; other cameras, "
        "backgrounds, lighting or framing will score lower. Test on your own labelled folder with "
        "`imgcls predict <folder of class folders>`.",
    ]
    scored = [p for p in per_class_accuracy(confusion, names) if p[1] is not None]
    if scored:
        weakest = min(scored, key=lambda p: p[1])
        lines.append(f"- Weakest class: {weakest[0]} ({weakest[1]:.3f}).")
    if fp32["images"] < 1000:
        lines.append(
            f"- The test split has only {fp32['images']} images: the accuracy is uncertain by the interval above."
        )
    return lines
