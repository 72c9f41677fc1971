"""Running a model on uint8 images: the float conversion every stage shares, batched prediction and a
labelled evaluation (used by training's validation and by the evaluate stage)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import autocast


def to_float_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float [0, 1], channels-last (faster convolutions on CPU and GPU)."""
    return images_uint8.float().div_(255).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict(
    model: nn.Module,
    images_uint8,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Float32 logits (N, classes) for uint8 images, in eval mode. ``images_uint8`` is a tensor, an array
    or anything sliced into arrays (an NpyReader: each batch is read from disk as it is needed).
    ``on_batch`` hears each batch's image count (a progress bar's update)."""
    model.eval()
    outputs = []
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start : start + batch_size]
        batch = to_float_images((torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch).to(device))
        with autocast(device, precision):
            outputs.append(model(batch).float())
        if on_batch is not None:
            on_batch(len(batch))
    return torch.cat(outputs) if outputs else torch.zeros(0)


def evaluate_model(
    model: nn.Module,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    on_batch: Callable[[int], object] | None = None,
) -> dict:
    """Mean cross-entropy loss, accuracy and predicted classes on a labelled set."""
    logits = predict(model, images_uint8, batch_size=batch_size, device=device, precision=precision, on_batch=on_batch)
    labels = labels.to(logits.device)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "logits": logits,
        "predictions": logits.argmax(1),
    }
