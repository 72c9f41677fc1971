"""Inference over many images a batch at a time, the same way for each runtime the export stage checks
(PyTorch, TorchScript, ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Images per inference call in this stage: 250 at 32 pixels, fewer for larger images, so that activations
# take about the same memory whatever the image size (250 images at 128 pixels would take gigabytes).
BATCH_PIXELS = 250 * 32 * 32


def batch_size_for(image_shape: tuple[int, ...]) -> int:
    """Images per call for images of ``image_shape`` (..., H, W)."""
    return max(1, BATCH_PIXELS // (int(image_shape[-1]) * int(image_shape[-2])))


def in_batches(run: Callable[[np.ndarray], np.ndarray], images) -> np.ndarray:
    """``run`` on ``images`` (N, C, H, W) a batch at a time, the outputs concatenated. ``images``: an array or
    an NpyReader (each batch is read from disk as it is needed)."""
    batch_size = batch_size_for(images.shape[2:])
    return np.concatenate([run(np.asarray(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])
