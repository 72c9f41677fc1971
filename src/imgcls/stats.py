"""Small-sample statistics shared by the stages that report accuracies (train's warnings, evaluate, export):
one home for an accuracy and its interval."""

from __future__ import annotations

import math
from dataclasses import dataclass


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy of ``correct`` / ``total`` (sound for small samples and for
    accuracies near 0 or 1, where the normal approximation is not)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``images`` classified right: the share, and its 95% Wilson interval. Without images
    there is no accuracy (None, which JSON writes as null), not an accuracy of 0."""

    correct: int
    images: int

    @property
    def value(self) -> float | None:
        return self.correct / self.images if self.images else None

    @property
    def ci95(self) -> tuple[float, float] | tuple[None, None]:
        return wilson_interval(self.correct, self.images) if self.images else (None, None)


def accuracy_of(predictions, labels) -> Accuracy:
    """The accuracy of predicted class indices against true ones (arrays or tensors of the same length)."""
    return Accuracy(int((predictions == labels).sum()), len(labels))


@dataclass(frozen=True)
class PairedDrop:
    """How much worse a second model (int8) scores than a first (fp32) on the same images, and how much of
    that a test split of this size cannot tell from chance. Only the images the two models disagree on
    carry information: ``worse`` the first got right and the second wrong, ``better`` the reverse."""

    images: int
    worse: int
    better: int

    @property
    def drop_points(self) -> float:
        """Accuracy lost, in percentage points (negative: the second model scores higher)."""
        return 100 * (self.worse - self.better) / self.images

    @property
    def noise_points(self) -> float:
        """Half-width of the 95% interval of the drop when the models are equally good (McNemar's normal
        approximation: the difference of the disagreements has variance worse + better), in points, with
        at least one disagreement assumed: one flipped image on a small split is always noise."""
        return 100 * 1.959964 * math.sqrt(max(self.worse + self.better, 1)) / self.images


def paired_drop(first_predictions, second_predictions, labels) -> PairedDrop:
    """Compare two models' predictions (class indices) on the same labelled images."""
    first_right = first_predictions == labels
    second_right = second_predictions == labels
    return PairedDrop(
        images=int(len(labels)),
        worse=int((first_right & ~second_right).sum()),
        better=int((~first_right & second_right).sum()),
    )


# A classifier that gives one class to at least this share of the images, when far fewer of them are of that
# class, has stopped looking at the images: a constant classifier (the collapse of a diverged run, or of
# BatchNorm statistics that no longer fit the weights).
CONSTANT_SHARE = 0.95
CONSTANT_MAX_TRUE_SHARE = 0.85  # a class that really is 95% of the images may be predicted for 95% of them
CONSTANT_MIN_IMAGES = 10


@dataclass(frozen=True)
class PredictionSpread:
    """How a model's predictions spread over the classes on labelled images: its most predicted class, the
    share of images it gets, the share that truly are of it, and chance (the most common true class's share:
    what always answering it scores)."""

    images: int
    top_class: int
    top_share: float
    top_true_share: float
    chance: float

    @property
    def constant(self) -> bool:
        return bool(
            self.images >= CONSTANT_MIN_IMAGES
            and self.top_share >= CONSTANT_SHARE
            and self.top_true_share <= CONSTANT_MAX_TRUE_SHARE
        )


def prediction_spread(predictions, labels, num_classes: int) -> PredictionSpread:
    """The spread of predicted class indices against the true ones (NumPy arrays or tensors)."""
    import numpy as np

    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    images = len(labels)
    if images == 0:
        return PredictionSpread(0, 0, 0.0, 0.0, 0.0)
    predicted = np.bincount(predictions, minlength=num_classes)
    true = np.bincount(labels, minlength=num_classes)
    top = int(predicted.argmax())
    return PredictionSpread(
        images, top, float(predicted[top] / images), float(true[top] / images), float(true.max() / images)
    )


def spread_of_confusion(confusion) -> PredictionSpread:
    """prediction_spread from a confusion matrix (counts[true, predicted])."""
    import numpy as np

    confusion = np.asarray(confusion)
    images = int(confusion.sum())
    if images == 0:
        return PredictionSpread(0, 0, 0.0, 0.0, 0.0)
    predicted, true = confusion.sum(axis=0), confusion.sum(axis=1)
    top = int(predicted.argmax())
    return PredictionSpread(
        images, top, float(predicted[top] / images), float(true[top] / images), float(true.max() / images)
    )
