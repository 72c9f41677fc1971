"""Preprocess stage: decode a verified raw folder into uint8 arrays. Nothing here unpickles anything:
Fashion-MNIST is parsed from IDX files, CIFAR-10 from the fixed-size records of the official *binary*
archive, image folders with Pillow (imagefolder.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import datasets
from ..datasets import (
    CIFAR10_FOLDER,
    CIFAR10_RECORD_BYTES,
    CIFAR10_TEST_FILES,
    CIFAR10_TRAIN_FILES,
    FASHION_MNIST_CLASSES,
    gunzip,
)
from ..errors import DataError


@dataclass
class DecodedDataset:
    # name -> (images uint8 (N, C, H, W): an array in memory or an NpyReader over a scratch file, labels int64 (N,))
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    # name -> each image's file (image folders: its path in the source, as the manifest names it); None for the
    # built-in data sets, whose images are rows of the official files (named by split and row when written)
    names: dict[str, list[str]] | None = None


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parse an IDX file (unsigned-byte data only, as in (Fashion-)MNIST) into an array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: IDX header is truncated ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{name}: IDX records of the wrong size: header says shape {shape} ({expected} bytes), "
            f"file has {len(data)} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def decode_fashion_mnist(raw_dir: Path) -> DecodedDataset:
    def load(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = parse_idx(gunzip(raw_dir / f"{prefix}-images-idx3-ubyte.gz"), f"{prefix}-images")
        labels = parse_idx(gunzip(raw_dir / f"{prefix}-labels-idx1-ubyte.gz"), f"{prefix}-labels")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{prefix}: {images.shape} images do not match {labels.shape} labels")
        return images[:, None, :, :].copy(), labels.astype(np.int64)  # (N, 1, 28, 28)

    return DecodedDataset({"train": load("train"), "test": load("t10k")}, list(FASHION_MNIST_CLASSES))


def parse_cifar_records(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % CIFAR10_RECORD_BYTES != 0:
        raise DataError(
            f"{name}: CIFAR records of the wrong size: {len(data)} bytes is not a multiple of "
            f"{CIFAR10_RECORD_BYTES}; the file is truncated or corrupt"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{name}: label {labels.max()} out of range 0..9; not a CIFAR-10 binary file")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def decode_cifar10(raw_dir: Path) -> DecodedDataset:
    folder = raw_dir / CIFAR10_FOLDER

    def load(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DataError(f"{path} is missing; delete data/raw and rerun the download stage")
            images, labels = parse_cifar_records(path.read_bytes(), name)
            if len(labels) != datasets.CIFAR10_RECORDS_PER_FILE:
                raise DataError(f"{name}: {len(labels)} records, expected {datasets.CIFAR10_RECORDS_PER_FILE}")
            parts.append((images, labels))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    meta = folder / "batches.meta.txt"
    class_names = [line.strip() for line in meta.read_text().splitlines() if line.strip()] if meta.is_file() else []
    if len(class_names) != 10:
        raise DataError(f"{meta}: expected 10 class names, found {len(class_names)}")
    return DecodedDataset({"train": load(CIFAR10_TRAIN_FILES), "test": load(CIFAR10_TEST_FILES)}, class_names)
