"""The evaluate stage's picture of where the model looks: class activation maps (imgcls.evaluate.cam) of a
sample of test images, half misclassified and half right, for the class the model predicted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arrays import NpyReader
from .cam import class_activation_maps, pick_cam_sample, plot_cam_grid


def draw_activation_maps(
    path: Path,
    model: nn.Module,
    images: NpyReader,
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    count: int,
    device: torch.device,
) -> tuple[int, str]:
    """Write the grid of ``count`` test images (``probabilities``: the calibrated ones, (N, K)) to ``path``;
    returns (images drawn, the method used)."""
    predictions = probabilities.argmax(axis=1)
    if count == 0:  # off: the picture (a DVC output) says so
        empty = np.zeros(0, dtype=np.int64)
        shape = (0, *images.shape[1:]) if hasattr(images, "shape") else (0, 1, 8, 8)
        plot_cam_grid(
            path,
            np.zeros(shape, np.uint8),
            np.zeros((0, *shape[2:]), np.float32),
            empty,
            empty,
            np.zeros(0),
            class_names,
            title="activation maps off (evaluate.activation_maps: 0)",
        )
        return 0, "off"
    rows = pick_cam_sample(labels, predictions, count)
    picked = images.take(rows) if isinstance(images, NpyReader) else np.asarray(images)[rows]
    predicted = predictions[rows]
    maps, layer = class_activation_maps(model, picked, predicted.tolist(), device=device)
    confidence = probabilities[rows, predicted]
    drawn = plot_cam_grid(
        path,
        picked,
        maps,
        labels[rows],
        predicted,
        confidence,
        class_names,
        title=f"where the model looks ({layer.method} at {layer.name}): predicted class",
    )
    return drawn, layer.method
