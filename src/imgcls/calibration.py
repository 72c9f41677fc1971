"""How far to trust a confidence: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017) and the expected calibration error.

One scalar T divides the logits before the softmax: T > 1 softens over-confident probabilities, T < 1
sharpens timid ones; the argmax, so every predicted class, is unchanged. T is fitted by minimising the
negative log-likelihood on the validation split (never the test split, which stays the judge) at the end of
training, stored in the checkpoint (``extra.calibration``) and in the exported models' metadata, and applied
by the evaluate stage and by ``imgcls predict``: the same image gets the same probability from both.

The expected calibration error (ECE) sorts predictions into equal-width confidence bins and averages
|accuracy - mean confidence| over the bins, weighted by their share of images: 0 means "0.9 confident" is right
90% of the time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where a temperature is fitted: `imgcls predict` on ONNX runs without it
    import torch

# T outside this range is no calibration of a trained classifier (a file claiming T = 1e-30 would turn every
# probability into 0 or 1, T = 1e30 every one into 1/K): refused when read from a file.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
CALIBRATION_BINS = 15  # Guo et al.'s 15 equal-width bins: the usual way ECE figures are quoted
# Fewer validation images than this fit no temperature (it stays 1): on a few dozen images the likelihood is
# one or two mistakes, and T chases them. Measured: 32 validation images with one confident mistake gave
# T = 1.82, which raised the test split's ECE from 0.039 to 0.163 (tests/test_know_your_data.py's data).
MIN_CALIBRATION_IMAGES = 200


@dataclass(frozen=True)
class Temperature:
    """A fitted temperature and what it did on the split it was fitted on."""

    temperature: float
    split: str
    images: int
    nll_before: float
    nll_after: float

    def as_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "split": self.split,
            "images": self.images,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
        }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, split: str = "val") -> Temperature:
    """The T minimising the mean cross-entropy of ``logits / T`` (float32 (N, K)) against ``labels``: a
    one-dimensional convex problem in log T, solved by L-BFGS and bounded to MIN..MAX_TEMPERATURE."""
    import torch
    import torch.nn.functional as F

    logits, labels = logits.detach().float().cpu(), labels.detach().cpu().long()
    if not len(labels):
        raise ValueError("no images to fit a temperature on")
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))
    if not math.isfinite(temperature):
        temperature = 1.0
    with torch.no_grad():
        before = float(F.cross_entropy(logits, labels))
        after = float(F.cross_entropy(logits / temperature, labels))
    if after > before:  # never worse than no scaling (a flat or degenerate split)
        temperature, after = 1.0, before
    return Temperature(temperature, split, len(labels), before, after)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` as float64 rows summing to 1 (numerically stable)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    images: int
    confidence: float | None  # mean top-class probability of the bin's images (None: empty bin)
    accuracy: float | None  # share of them predicted right


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> list[ReliabilityBin]:
    """The top-class confidences of ``probs`` (N, K) in ``bins`` equal-width bins over [0, 1]."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == np.asarray(labels)
    # Bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 would need K = infinity, it goes to bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            ReliabilityBin(
                b / bins,
                (b + 1) / bins,
                count,
                float(confidence[members].mean()) if count else None,
                float(correct[members].mean()) if count else None,
            )
        )
    return table


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """sum over bins of (images in bin / N) x |accuracy - confidence| (0 = calibrated)."""
    return expected_calibration_error_of_bins(reliability(probs, labels, bins))


def expected_calibration_error_of_bins(table: list[ReliabilityBin]) -> float:
    """The ECE of a reliability table (see expected_calibration_error)."""
    total = sum(b.images for b in table)
    return float(sum(b.images / total * abs(b.accuracy - b.confidence) for b in table if b.images)) if total else 0.0


def checked_temperature(value: object, where: str, redo: str) -> float:
    """A temperature read from a file (checkpoint, model metadata): a finite number in range, else a
    UserError naming ``where``. A missing value (None: files from before calibration) is 1, no scaling."""
    if value is None:
        return 1.0
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE
    ):
        raise UserError(
            f"{where} = {str(value)[:40]!r} is not a temperature in {MIN_TEMPERATURE}..{MAX_TEMPERATURE}; "
            f"the file is damaged or not from this pipeline; {redo}"
        )
    return float(value)


def checkpoint_temperature(checkpoint: dict, where: str) -> float:
    """The temperature the train stage stored in a checkpoint (1 for checkpoints written before it did)."""
    extra = checkpoint.get("extra")
    calibration = extra.get("calibration") if isinstance(extra, dict) else None
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    return checked_temperature(value, f"{where}: extra.calibration.temperature", "retrain it (dvc repro train)")
