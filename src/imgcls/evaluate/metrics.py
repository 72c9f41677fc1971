"""Test-set metrics and the pictures people look at: confusion matrix, misclassified images, reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..calibration import ReliabilityBin
from ..fileio import atomic_path
from ..stats import Accuracy


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_metrics(confusion: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float]]:
    """Per class: accuracy (= recall: share of the class's images classified right) with its 95% Wilson
    interval, precision, and the counts behind them (``images``: test images of the class, ``correct``)."""
    metrics = {}
    for c, name in enumerate(class_names):
        score = Accuracy(correct=int(confusion[c, c]), images=int(confusion[c].sum()))
        predicted = int(confusion[:, c].sum())
        low, high = score.ci95
        # A class never predicted has no precision (as a class without test images has no accuracy).
        metrics[name] = {
            "accuracy": score.value,
            "ci95_low": low,
            "ci95_high": high,
            "precision": score.correct / predicted if predicted else None,
            "recall": score.value,
            "images": score.images,
            "correct": score.correct,
        }
    return metrics


def write_per_class_csv(path: Path, per_class: dict[str, dict[str, float]]) -> None:
    import pandas as pd

    frame = pd.DataFrame.from_dict(per_class, orient="index")
    frame.index.name = "class"
    with atomic_path(path, clean_stale=True) as tmp:
        frame.to_csv(tmp, float_format="%.4f")


def write_predictions_csv(
    path: Path,
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: list[str],
    *,
    confidence: np.ndarray | None = None,
    names: list[str] | None = None,
) -> None:
    """One row per test image (actual, predicted class names; DVC's confusion-matrix plot reads these two),
    with the calibrated probability of the predicted class and the image's file when given."""
    import pandas as pd

    classes = np.array(class_names, dtype=object)
    columns = {"actual": classes[labels], "predicted": classes[predictions]}
    if confidence is not None:
        columns["confidence"] = np.round(np.asarray(confidence, dtype=np.float64), 6)
    if names is not None:
        columns["file"] = names
    frame = pd.DataFrame(columns)
    with atomic_path(path, clean_stale=True) as tmp:
        frame.to_csv(tmp, index=False)


def plot_confusion_matrix(path: Path, confusion: np.ndarray, class_names: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(5.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    row_share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(confusion[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if row_share[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    with atomic_path(path, clean_stale=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_misclassified(
    path: Path, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, class_names: list[str], limit: int
) -> int:
    """Grid of misclassified images (uint8 (N, C, H, W)) titled 'true -> predicted'; returns how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(labels != predictions)[:limit]
    columns = max(1, min(6, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong, strict=False):
        image = images[index].transpose(1, 2, 0)  # (H, W, C)
        ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)
        ax.set_title(f"{class_names[labels[index]]}\n-> {class_names[predictions[index]]}", fontsize=8)
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle("misclassified test images (true -> predicted)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, clean_stale=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return len(wrong)


def write_reliability(folder: Path, before: list[ReliabilityBin], after: list[ReliabilityBin]) -> None:
    """before.csv and after.csv (confidence, accuracy, images per non-empty bin) for `dvc plots`: the
    reliability diagram of the raw and the temperature-scaled probabilities."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (("before", before), ("after", after)):
        frame = pd.DataFrame(
            [
                {"confidence": round(b.confidence, 6), "accuracy": round(b.accuracy, 6), "images": b.images}
                for b in table
                if b.images
            ],
            columns=["confidence", "accuracy", "images"],
        )
        with atomic_path(folder / f"{name}.csv", clean_stale=True) as tmp:
            frame.to_csv(tmp, index=False)


def plot_reliability(
    path: Path, before: list[ReliabilityBin], after: list[ReliabilityBin], *, temperature: float
) -> None:
    """The reliability diagram: accuracy against confidence per bin, before and after temperature scaling,
    with the diagonal a calibrated model follows and the share of images per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..calibration import expected_calibration_error_of_bins

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.2, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True, constrained_layout=True
    )
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    width = 1 / len(before)
    for table, colour, label in (
        (before, "tab:red", f"raw (ECE {expected_calibration_error_of_bins(before):.3f})"),
        (after, "tab:blue", f"temperature {temperature:.2f} (ECE {expected_calibration_error_of_bins(after):.3f})"),
    ):
        filled = [b for b in table if b.images]
        top.plot([b.confidence for b in filled], [b.accuracy for b in filled], "o-", color=colour, label=label)
    total = max(1, sum(b.images for b in after))
    bottom.bar(
        [b.low + width / 2 for b in after], [b.images / total for b in after], width=width * 0.9, color="tab:blue"
    )
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.legend(loc="upper left", fontsize=8)
    top.set_title("reliability on the test split", fontsize=10)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("share of images")
    with atomic_path(path, clean_stale=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
