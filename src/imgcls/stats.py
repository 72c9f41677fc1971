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
