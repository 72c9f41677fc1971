"""Copy the planned splits into the prepared folder chunk by chunk, with the training split's statistics
accumulated on the way: memory is bounded by one chunk whatever the data set's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..arrays import NpyWriter
from ..prepared import images_file, save_labels, save_meta, save_names
from .formats import DecodedDataset
from .splits import ChannelStats, SplitPlan, build_meta, gather

# Rows copied per read/write: 32 MB of images (about 1,100 RGB images at 96 pixels).
COPY_CHUNK_BYTES = 32 << 20


def write_splits(
    directory: Path, decoded: DecodedDataset, plan: SplitPlan, *, dataset: str, source: dict, resize: str | None = None
) -> dict:
    """Write ``<split>_images.npy``/``<split>_labels.npy``/``<split>_files.json`` for every planned split and
    meta.json; returns meta.
    ``resize``: how the images were made square (data.resize), recorded in meta.json; None for data sets whose
    images come square at their fixed size (nothing was resized, and their meta.json stays as it was)."""
    first_images = next(iter(decoded.splits.values()))[0]
    image_shape = list(first_images.shape[1:])
    row_bytes = int(np.prod(image_shape))
    per_chunk = max(1, COPY_CHUNK_BYTES // row_bytes)
    stats = ChannelStats(image_shape[0])  # training split only: val and test stay unseen
    labels = {}
    for split, (origin, rows) in plan.items():
        images, origin_labels = decoded.splits[origin]
        with NpyWriter(images_file(directory, split), (len(rows), *image_shape), np.uint8) as writer:
            for start in range(0, len(rows), per_chunk):
                chunk = gather(images, rows[start : start + per_chunk])
                writer.write(start, chunk)
                if split == "train":
                    stats.update(chunk)
        labels[split] = origin_labels[rows]
        save_labels(directory, split, labels[split])
        # Where each image came from, for the reports that name images (duplicates, label suspects).
        origin_names = decoded.names[origin] if decoded.names is not None else None
        save_names(
            directory,
            split,
            [origin_names[row] if origin_names else f"{dataset} {origin} #{row}" for row in rows.tolist()],
        )
    mean, std = stats.result()
    meta = build_meta(
        dataset=dataset, class_names=decoded.class_names, image_shape=image_shape, labels=labels, mean=mean, std=std
    )
    meta["source"] = source
    if resize is not None:
        meta["resize"] = resize
    save_meta(directory, meta)
    return meta
