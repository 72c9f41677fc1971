"""The evaluate stage's picture of where the model looks: class activation maps (imgcls.evaluate.cam) of a
sample of test images, half misclassified and half right, for the class the model predicted."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..arrays import NpyReader
from .cam import class_activation_maps, pick_cam_sample, plot_cam_grid

if TYPE_CHECKING:
    from .stage import Evaluation


def draw_activation_maps(
    path: Path,
    model: nn.Module,
    images: NpyReader,
    outcome: Evaluation,
    class_names: list[str],
    count: int,
    device: torch.device,
) -> tuple[int, str]:
    """Write the grid to ``path``; returns (images drawn, the method used)."""
    rows = pick_cam_sample(outcome.labels, outcome.predictions, count)
    picked = images.take(rows) if isinstance(images, NpyReader) else np.asarray(images)[rows]
    predicted = outcome.predictions[rows]
    maps, layer = class_activation_maps(model, picked, predicted.tolist(), device=device)
    confidence = outcome.probabilities[rows, predicted]
    drawn = plot_cam_grid(
        path,
        picked,
        maps,
        outcome.labels[rows],
        predicted,
        confidence,
        class_names,
        title=f"where the model looks ({layer.method} at {layer.name}): predicted class",
    )
    return drawn, layer.method
