"""Small-sample statistics shared by the stages that report accuracies (train's warnings, evaluate, export)."""

from __future__ import annotations

import math


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
