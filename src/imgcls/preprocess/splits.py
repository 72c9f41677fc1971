"""Splits (train/val/test, stratified and seeded) and the normalization statistics of the training split."""

from __future__ import annotations

import numpy as np

from ..arrays import NpyReader
from ..errors import DataError
from .formats import DecodedDataset


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): ``fraction`` of each class held out, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)  # every class keeps and holds out at least one image
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` images with the class mix of ``labels`` (seeded)."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    _, held = stratified_split(labels, limit / len(labels), seed)
    return held


class ChannelStats:
    """Per-channel mean and std of uint8 images (N, C, H, W), accumulated chunk by chunk with exact integer
    sums (no float64 copy of the data: that would be 8x its size)."""

    def __init__(self, channels: int):
        self.sums = np.zeros(channels, dtype=np.int64)
        self.squares = np.zeros(channels, dtype=np.int64)  # 255^2 x 10^14 values would still fit
        self.count = 0

    def update(self, images: np.ndarray) -> None:
        values = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1)  # (C, N*H*W)
        self.sums += values.sum(axis=1, dtype=np.int64)
        self.squares += np.array([np.dot(v.astype(np.int64), v) for v in values], dtype=np.int64)
        self.count += values.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        """(mean, std) per channel in [0, 1] units."""
        mean = self.sums / max(self.count, 1)
        std = np.sqrt(np.maximum(self.squares.astype(np.float64) / max(self.count, 1) - mean**2, 0.0))
        return (mean / 255.0).tolist(), (std / 255.0).tolist()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    stats = ChannelStats(images.shape[1])
    stats.update(images)
    return stats.result()


SplitPlan = dict[str, tuple[str, np.ndarray]]  # final split -> (decoded split it comes from, sorted row indices)


def plan_splits(
    labels: dict[str, np.ndarray],
    *,
    val_fraction: float,
    test_fraction: float,
    limit: int,
    seed: int,
    val_folder: str = "test",
) -> SplitPlan:
    """Which decoded rows make train/val/test. A decoded val split without a test split (the ants/bees
    layout) is the test split when ``val_folder`` is "test"; then test (if still absent) and val are carved
    out of train, and limit applies. Works on labels only, so the images stay on disk until copied once."""
    plan = {name: (name, np.arange(len(split_labels))) for name, split_labels in labels.items()}
    if "test" not in plan and "val" in plan and val_folder == "test":
        plan["test"] = plan.pop("val")

    def pick(name: str, keep: np.ndarray) -> tuple[str, np.ndarray]:
        source, rows = plan[name]
        return source, rows[keep]

    def labels_of(name: str) -> np.ndarray:
        source, rows = plan[name]
        return labels[source][rows]

    if "test" not in plan:
        kept, held = stratified_split(labels_of("train"), test_fraction, seed)
        plan["test"], plan["train"] = pick("train", held), pick("train", kept)
    if limit:
        plan["train"] = pick("train", stratified_subset(labels_of("train"), limit, seed))
        plan["test"] = pick("test", stratified_subset(labels_of("test"), limit, seed + 1))
    if "val" not in plan and val_fraction > 0:
        kept, held = stratified_split(labels_of("train"), val_fraction, seed)
        plan["val"], plan["train"] = pick("train", held), pick("train", kept)
    return plan


def gather(images, rows: np.ndarray) -> np.ndarray:
    """Rows of an in-memory array or an NpyReader."""
    return images.take(rows) if isinstance(images, NpyReader) else images[rows]


def make_splits(
    decoded: DecodedDataset,
    *,
    val_fraction: float,
    test_fraction: float,
    limit: int,
    seed: int,
    val_folder: str = "test",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The planned splits as in-memory arrays (small data; the stage streams them: write.py)."""
    plan = plan_splits(
        {name: labels for name, (_, labels) in decoded.splits.items()},
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        limit=limit,
        seed=seed,
        val_folder=val_folder,
    )
    return {
        name: (gather(decoded.splits[source][0], rows), decoded.splits[source][1][rows])
        for name, (source, rows) in plan.items()
    }


def build_meta(
    *,
    dataset: str,
    class_names: list[str],
    image_shape: list[int],
    labels: dict[str, np.ndarray],
    mean: list[float],
    std: list[float],
) -> dict:
    if min(std) == 0:
        raise DataError("training images have zero variance in a channel; the data set is empty or constant")
    return {
        "dataset": dataset,
        "class_names": class_names,
        "image_shape": list(image_shape),  # (C, H, W)
        "counts": {
            split: {name: int((split_labels == c).sum()) for c, name in enumerate(class_names)}
            for split, split_labels in labels.items()
        },
        "mean": mean,
        "std": std,
    }
