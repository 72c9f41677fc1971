"""Decoding a folder of images laid out as ``<split>/<class>/<file>`` into uint8 arrays."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arrays import NpyReader, NpyWriter
from ..datasets import IMAGE_SUFFIXES, SPLIT_NAMES
from ..errors import DataError
from ..prefetch import prefetched
from ..report import bullet_list
from .formats import DecodedDataset
from .images import DECODE_ERRORS, decode_image

# Decoding runs in worker processes in chunks of at most this many files and bytes: large enough that task
# and result transfer cost little next to decoding, small enough to keep both cores busy to the end and
# memory small (a 224-pixel RGB chunk of 2,000 files would be 300 MB).
CHUNK_FILES = 2000
CHUNK_BYTES = 32 << 20


def _decode_chunk(
    paths: list[str], image_size: int, channels: int, max_pixels: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode a chunk; returns the stacked images of the good files, the mask of good files and
    (path, reason) for the bad ones."""
    images = np.zeros((len(paths), channels, image_size, image_size), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    bad = []
    for i, path in enumerate(paths):
        try:
            images[i] = decode_image(path, image_size=image_size, channels=channels, max_pixels=max_pixels)
        except DECODE_ERRORS as error:
            ok[i] = False
            bad.append((path, f"{type(error).__name__}: {error}"))
    return images[ok], ok, bad


def is_hidden(name: str) -> bool:
    """Dot-names (.DS_Store, .ipynb_checkpoints, macOS's AppleDouble ._name.jpg) and __MACOSX: never data."""
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class SplitListing:
    class_names: list[str]
    paths: list[Path]
    labels: list[int]
    ignored: int  # files that are not images, by extension
    hidden: int  # files under hidden names or folders


def list_split(split_dir: Path, class_names: list[str] | None) -> SplitListing:
    """Class names, image paths and labels of one split folder, and the counts of files left out."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not is_hidden(d.name))
    names = class_names if class_names is not None else found
    if class_names is not None and found != class_names:
        raise DataError(
            f"class folders differ between splits: train has {class_names}, {split_dir.name} has {found}; "
            "every split needs the same class folders"
        )
    paths, labels, ignored, hidden = [], [], 0, 0
    for label, name in enumerate(names):
        class_dir = split_dir / name
        class_files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        visible = [p for p in class_files if not any(is_hidden(part) for part in p.relative_to(class_dir).parts)]
        hidden += len(class_files) - len(visible)
        images = [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += len(visible) - len(images)
        if not images:
            raise DataError(
                f"class folder {split_dir.name}/{name} holds no images "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add images or remove the folder"
            )
        paths += images
        labels += [label] * len(images)
    loose = [p for p in split_dir.iterdir() if p.is_file()]
    hidden += sum(1 for p in loose if is_hidden(p.name))
    ignored += sum(1 for p in loose if not is_hidden(p.name))
    return SplitListing(names, paths, labels, ignored, hidden)


def _chunk_files(image_size: int, channels: int) -> int:
    return max(1, min(CHUNK_FILES, CHUNK_BYTES // (channels * image_size * image_size)))


def _decode_split(
    pool: ProcessPoolExecutor,
    paths: list[Path],
    destination: Path,
    *,
    image_size: int,
    channels: int,
    max_pixels: int,
    workers: int,
) -> tuple[NpyReader, np.ndarray, list[tuple[str, str]]]:
    """Decode ``paths`` in chunks on the pool, writing the good images in order into ``destination`` as they
    arrive. At most two chunks per worker are in flight, so memory stays bounded by chunks, not the split.
    Returns the written images (a reader over the good rows), the mask of good files and the bad ones."""
    per_chunk = _chunk_files(image_size, channels)
    tasks = (
        ([str(p) for p in paths[i : i + per_chunk]], image_size, channels, max_pixels)
        for i in range(0, len(paths), per_chunk)
    )
    good = np.zeros(len(paths), dtype=bool)
    bad: list[tuple[str, str]] = []
    written = 0
    with NpyWriter(destination, (len(paths), channels, image_size, image_size), np.uint8) as writer:
        chunks = prefetched(pool, _decode_chunk, tasks, ahead=2 * workers)
        for number, (images, ok, chunk_bad) in enumerate(chunks):
            writer.write(written, images)
            written += len(images)
            good[number * per_chunk : number * per_chunk + len(ok)] = ok
            bad += chunk_bad
    return NpyReader(destination, rows=written), good, bad


def decode_image_folder(
    root: Path,
    *,
    image_size: int,
    channels: int,
    on_bad_image: str,
    max_pixels: int,
    workdir: Path,
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> DecodedDataset:
    """Decode every split folder under ``root`` into ``workdir/<split>.npy`` (uint8 (N, C, H, W), streamed:
    memory is bounded by a few chunks per worker); the result's images are readers over those files."""
    train = _list_train(root)  # walk each split's folders once
    class_names = train.class_names
    workers = workers or min(4, os.cpu_count() or 1)
    workdir.mkdir(parents=True, exist_ok=True)
    splits, listings, bad = {}, [], []
    with ProcessPoolExecutor(workers) as pool:
        for split in SPLIT_NAMES:
            if not (root / split).is_dir():
                continue
            listing = train if split == "train" else list_split(root / split, class_names)
            listings.append(listing)
            images, good, split_bad = _decode_split(
                pool,
                listing.paths,
                workdir / f"{split}.npy",
                image_size=image_size,
                channels=channels,
                max_pixels=max_pixels,
                workers=workers,
            )
            if split_bad and on_bad_image == "error":
                raise _unreadable_error(split, split_bad)
            splits[split] = (images, np.asarray(listing.labels, dtype=np.int64)[good])
            bad += split_bad
    _log_left_out(listings, bad, log)
    _require_every_class(splits, class_names)
    return DecodedDataset(splits, class_names)


def _list_train(root: Path) -> SplitListing:
    """The train split's listing, which names the classes every other split must have."""
    listing = list_split(root / "train", None)
    if len(listing.class_names) < 2:
        raise DataError(
            f"{root / 'train'} has {len(listing.class_names)} class folder(s) {listing.class_names}; "
            "a classifier needs at least two"
        )
    return listing


def _unreadable_error(split: str, bad: list[tuple[str, str]]) -> DataError:
    path, reason = bad[0]
    return DataError(
        f"{len(bad)} unreadable image file(s) in {split}/, first {path} ({reason}); "
        "remove or replace them, or set data.on_bad_image: skip"
    )


def _log_left_out(listings: list[SplitListing], bad: list[tuple[str, str]], log: Callable[[str], None]) -> None:
    """One line each for the files left out: not images, hidden, unreadable (listed by name)."""
    ignored = sum(listing.ignored for listing in listings)
    hidden = sum(listing.hidden for listing in listings)
    if ignored:
        log(f"preprocess: ignored {ignored} file(s) that are not images (by extension)")
    if hidden:
        log(
            f"preprocess: ignored {hidden} hidden file(s) (dot-names such as ._name.jpg, .ipynb_checkpoints/, "
            "__MACOSX/)"
        )
    if bad:
        listed = bullet_list([f"{path}: {reason}" for path, reason in bad])
        log(f"preprocess: skipped {len(bad)} unreadable image file(s) (data.on_bad_image: skip):\n{listed}")


def _require_every_class(splits: dict[str, tuple[NpyReader, np.ndarray]], class_names: list[str]) -> None:
    for split, (_, labels) in splits.items():
        empty = [class_names[c] for c in range(len(class_names)) if not (labels == c).any()]
        if empty:
            raise DataError(f"after skipping unreadable files, {split}/ has no images of class(es) {empty}")
