"""Decoding a folder of images laid out as ``<split>/<class>/<file>`` into uint8 arrays: exactly the files its
manifest lists (manifest.py), each checked against its size and SHA-256 before it is decoded, and each taken
from the decode cache (cache.py) instead when an earlier run decoded the same bytes with the same settings."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import NpyReader, NpyWriter
from ..datasets import IMAGE_SUFFIXES, SPLIT_NAMES
from ..errors import DataError
from ..manifest import ImageFile, Manifest, file_sha256, is_hidden, open_regular, scan_folder
from ..prefetch import prefetched
from ..report import bullet_list, progress_bar
from .cache import CachedImage, DecodeCache, DecodeSettings, PackWriter, read_cached, write_pack
from .formats import DecodedDataset
from .images import DECODE_ERRORS, decode_image

# Decoding runs in worker processes in chunks of at most this many files and bytes: large enough that task
# and result transfer cost little next to decoding, small enough to keep both cores busy to the end and
# memory small (a 224-pixel RGB chunk of 2,000 files would be 300 MB).
CHUNK_FILES = 2000
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class DecodeTask:
    """One chunk of files for a worker: (path, the manifest's size and SHA-256, where its pixels are cached)."""

    files: list[tuple[str, int, str, CachedImage | None]]
    settings: DecodeSettings
    cache: PackWriter | None  # None: no cache (decode everything, store nothing)


@dataclass
class ChunkResult:
    images: np.ndarray  # uint8 (good files, C, H, W)
    ok: np.ndarray  # bool (files,)
    bad: list[tuple[str, str]]  # (path, reason)
    decoded: int  # files read and decoded (the rest came from the cache)
    packs: set[str]  # cache packs read or written


def _decode_chunk(task: DecodeTask) -> ChunkResult:
    """Decode a chunk, taking each image from the cache when a valid entry holds it; the newly decoded images
    are stored as one pack."""
    settings = task.settings
    images = np.zeros((len(task.files), settings.channels, settings.image_size, settings.image_size), np.uint8)
    result = ChunkResult(images, np.ones(len(task.files), dtype=bool), [], 0, set())
    fresh, open_packs = [], {}
    try:
        for i, (path, size, sha256, cached) in enumerate(task.files):
            pixels = read_cached(cached, sha256, task.cache, open_packs) if cached and task.cache else None
            if pixels is not None:
                images[i] = np.frombuffer(pixels, np.uint8).reshape(images.shape[1:])
                result.packs.add(os.path.basename(cached.pack))
                continue
            result.decoded += 1
            try:
                images[i] = _decode_verified(path, size, sha256, settings)
                fresh.append((sha256, images[i].tobytes()))
            except DECODE_ERRORS as error:
                result.ok[i] = False
                result.bad.append((path, f"{type(error).__name__}: {error}"))
    finally:
        for fd in open_packs.values():
            os.close(fd)
    if fresh and task.cache:
        result.packs.add(write_pack(task.cache, fresh) or "")
    result.images = images[result.ok]
    return result


class SourceChanged(Exception):
    """A file that differs from what the download stage recorded (not an unreadable image: a stale manifest)."""


def _decode_verified(path: str, size: int, sha256: str, settings: DecodeSettings) -> np.ndarray:
    """Decode the file at ``path`` after checking it still has the manifest's size and SHA-256, so what is
    decoded is exactly what the download stage verified (a file swapped for a link or another file is refused)."""
    try:
        file = open_regular(Path(path))
    except DataError as error:
        raise SourceChanged(str(error)) from None
    with file:
        actual_size = os.fstat(file.fileno()).st_size
        actual = file_sha256(file) if actual_size == size else None
        if actual != sha256:
            found = f"{actual_size:,} bytes" + (f", sha256 {actual}" if actual else "")
            raise SourceChanged(f"{path}: the manifest says {size:,} bytes, sha256 {sha256}; found {found}")
        file.seek(0)
        return decode_image(
            file,
            image_size=settings.image_size,
            channels=settings.channels,
            max_pixels=settings.max_pixels,
            resize=settings.resize,
        )


@dataclass
class SplitListing:
    class_names: list[str]
    files: list[ImageFile]
    labels: list[int]
    ignored: int  # files that are not images, by extension
    hidden: int  # files under hidden names or folders


class ImageTree:
    """A manifest seen from its image root (the folder holding ``train/``), files grouped by split and class."""

    def __init__(self, manifest: Manifest, folder: Path):
        self.folder = folder  # where the manifest's paths are on disk
        prefix = _image_root(manifest)
        self.root = folder / prefix if prefix else folder
        cut = len(prefix) + 1 if prefix else 0
        self.folders = {f[cut:] for f in manifest.folders if f.startswith(prefix)}
        self.grouped: dict[tuple[str, str | None], list[tuple[str, ImageFile | None]]] = {}
        entries = [(image.path, image) for image in manifest.images] + [(path, None) for path in manifest.other]
        for path, image in sorted(entries, key=lambda entry: entry[0].split("/")):
            if not path.startswith(prefix):
                continue
            parts = path[cut:].split("/")
            if len(parts) >= 2:
                key = (parts[0], parts[1] if len(parts) > 2 else None)  # (split, class) or (split, None): loose
                self.grouped.setdefault(key, []).append(("/".join(parts[2:]) or parts[1], image))

    def class_folders(self, split: str) -> list[str]:
        return sorted(f.split("/")[1] for f in self.folders if f.count("/") == 1 and f.startswith(split + "/"))

    def has_split(self, split: str) -> bool:
        return split in self.folders


def _image_root(manifest: Manifest) -> str:
    """The folder holding ``train/``: the manifest's folder itself or its single visible top-level subfolder."""
    folders = set(manifest.folders)
    if "train" in folders:
        return ""
    children = sorted(f for f in folders if "/" not in f and not is_hidden(f))
    if len(children) == 1 and f"{children[0]}/train" in folders:
        return children[0]
    top = sorted({path.split("/")[0] for path in folders | set(manifest.other) | {i.path for i in manifest.images}})
    raise DataError(
        f"no train/ folder in the image source (found: {top[:10]}); "
        "lay it out as train/<class>/*, test/<class>/* (optional) and val/<class>/* (optional)"
    )


def list_split(tree: ImageTree, split: str, class_names: list[str] | None) -> SplitListing:
    """Class names, image files and labels of one split folder, and the counts of files left out."""
    found = [name for name in tree.class_folders(split) if not is_hidden(name)]
    names = class_names if class_names is not None else found
    if class_names is not None and found != class_names:
        raise DataError(
            f"class folders differ between splits: train has {class_names}, {split} has {found}; "
            "every split needs the same class folders"
        )
    files, labels, ignored, hidden = [], [], 0, 0
    for label, name in enumerate(names):
        entries = tree.grouped.get((split, name), [])
        images = [image for _, image in entries if image is not None]
        left_out = [path for path, image in entries if image is None]
        hidden += sum(1 for path in left_out if any(is_hidden(part) for part in path.split("/")))
        ignored += sum(1 for path in left_out if not any(is_hidden(part) for part in path.split("/")))
        if not images:
            raise DataError(
                f"class folder {split}/{name} holds no images "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add images or remove the folder"
            )
        files += images
        labels += [label] * len(images)
    loose = [name for name, _ in tree.grouped.get((split, None), [])]
    hidden += sum(1 for name in loose if is_hidden(name))
    ignored += sum(1 for name in loose if not is_hidden(name))
    return SplitListing(names, files, labels, ignored, hidden)


def _chunk_files(image_size: int, channels: int) -> int:
    return max(1, min(CHUNK_FILES, CHUNK_BYTES // (channels * image_size * image_size)))


@dataclass
class DecodeRun:
    """What a run shares across splits: the pool, the settings, the cache and the tallies for the log."""

    pool: ProcessPoolExecutor
    workers: int
    settings: DecodeSettings
    cache: DecodeCache | None
    progress: Any = None  # a terminal progress bar, or None
    decoded: int = 0
    reused: int = 0
    packs: set[str] = field(default_factory=set)


def _decode_split(run: DecodeRun, tree: ImageTree, files: list[ImageFile], destination: Path):
    """Decode ``files`` in chunks on the pool, writing the good images in order into ``destination`` as they
    arrive. At most two chunks per worker are in flight, so memory stays bounded by chunks, not the split.
    Returns the written images (a reader over the good rows), the mask of good files and the bad ones."""
    settings = run.settings
    per_chunk = _chunk_files(settings.image_size, settings.channels)
    writer = run.cache.writer() if run.cache else None
    folder = str(tree.folder)  # strings, not Path objects: 60,000 joins through pathlib cost a second
    located = [
        (f"{folder}/{f.path}", f.bytes, f.sha256, run.cache.lookup(f.sha256) if run.cache else None) for f in files
    ]
    tasks = ((DecodeTask(located[i : i + per_chunk], settings, writer),) for i in range(0, len(files), per_chunk))
    good = np.zeros(len(files), dtype=bool)
    bad: list[tuple[str, str]] = []
    written = 0
    row_shape = (settings.channels, settings.image_size, settings.image_size)
    with NpyWriter(destination, (len(files), *row_shape), np.uint8) as out:
        for number, chunk in enumerate(prefetched(run.pool, _decode_chunk, tasks, ahead=2 * run.workers)):
            out.write(written, chunk.images)
            written += len(chunk.images)
            good[number * per_chunk : number * per_chunk + len(chunk.ok)] = chunk.ok
            bad += chunk.bad
            run.decoded += chunk.decoded
            run.reused += len(chunk.ok) - chunk.decoded
            run.packs |= chunk.packs
            if run.progress is not None:
                run.progress.update(len(chunk.ok))
                run.progress.set_postfix(decoded=run.decoded, reused=run.reused)
    return NpyReader(destination, rows=written), good, bad


def decode_image_folder(
    root: Path,
    *,
    image_size: int,
    channels: int,
    on_bad_image: str,
    max_pixels: int,
    workdir: Path,
    resize: str = "squash",
    log: Callable[[str], None] = print,
    workers: int | None = None,
    cache_dir: Path | None = None,
) -> DecodedDataset:
    """Decode every split folder under ``root``, scanned here with the download stage's rules (links, special
    files); see ``decode_manifest``."""
    manifest = scan_folder(root, on_bad_link=on_bad_image, log=log)
    return decode_manifest(
        manifest,
        root,
        image_size=image_size,
        channels=channels,
        on_bad_image=on_bad_image,
        max_pixels=max_pixels,
        workdir=workdir,
        resize=resize,
        log=log,
        workers=workers,
        cache_dir=cache_dir,
    )


def decode_manifest(
    manifest: Manifest,
    folder: Path,
    *,
    image_size: int,
    channels: int,
    on_bad_image: str,
    max_pixels: int,
    workdir: Path,
    resize: str = "squash",
    log: Callable[[str], None] = print,
    workers: int | None = None,
    cache_dir: Path | None = None,
) -> DecodedDataset:
    """Decode the images ``manifest`` lists (paths relative to ``folder``) into ``workdir/<split>.npy`` (uint8
    (N, C, H, W), streamed: memory is bounded by a few chunks per worker), each made square by ``resize``
    (squash | crop | pad, images.py); the result's images are readers over those files. With ``cache_dir``,
    images decoded before with the same settings are reused by their SHA-256."""
    tree = ImageTree(manifest, folder)
    train = _list_train(tree)
    listings = {
        split: train if split == "train" else list_split(tree, split, train.class_names)
        for split in SPLIT_NAMES
        if tree.has_split(split)
    }
    settings = DecodeSettings(image_size, channels, max_pixels, resize)
    cache = DecodeCache(cache_dir, settings, log) if cache_dir is not None else None
    workers = workers or min(4, os.cpu_count() or 1)
    workdir.mkdir(parents=True, exist_ok=True)
    started, total = time.perf_counter(), sum(len(listing.files) for listing in listings.values())
    bar = progress_bar(total, unit="image", label="preprocess: decoding")
    try:
        with ProcessPoolExecutor(workers) as pool:
            run = DecodeRun(pool, workers, settings, cache, bar)
            splits, names, bad = _decode_splits(run, tree, listings, workdir, on_bad_image)
    except SourceChanged as changed:
        raise DataError(
            f"the image folder changed since the download stage listed it: {changed}",
            "rerun the download stage (dvc repro), which records the folder again",
        ) from None
    finally:
        if bar is not None:
            bar.close()
    if cache is not None:
        cache.keep(run.packs)
    _log_left_out(list(listings.values()), bad, log)
    _log_summary(run, total, time.perf_counter() - started, log)
    _require_every_class(splits, train.class_names)
    return DecodedDataset(splits, train.class_names, names)


def _decode_splits(
    run: DecodeRun, tree: ImageTree, listings: dict[str, SplitListing], workdir: Path, on_bad_image: str
) -> tuple[dict[str, tuple[NpyReader, np.ndarray]], dict[str, list[str]], list[tuple[str, str]]]:
    """Each split's images and labels, the files they came from (the good ones, in order) and the bad files."""
    splits, names, bad = {}, {}, []
    for split, listing in listings.items():
        images, good, split_bad = _decode_split(run, tree, listing.files, workdir / f"{split}.npy")
        if split_bad and on_bad_image == "error":
            raise _unreadable_error(split, split_bad)
        splits[split] = (images, np.asarray(listing.labels, dtype=np.int64)[good])
        names[split] = [file.path for file, kept in zip(listing.files, good, strict=True) if kept]
        bad += split_bad
    return splits, names, bad


def _log_summary(run: DecodeRun, total: int, seconds: float, log: Callable[[str], None]) -> None:
    """One line: how many images were decoded and how many reused, the time and the rate."""
    reused = f", {run.reused:,} reused from the decode cache" if run.cache is not None else ""
    log(
        f"preprocess: {total:,} images: {run.decoded:,} decoded{reused} in {seconds:.1f} s "
        f"({total / max(seconds, 1e-9):,.0f} images/s)"
    )


def _list_train(tree: ImageTree) -> SplitListing:
    """The train split's listing, which names the classes every other split must have."""
    listing = list_split(tree, "train", None)
    if len(listing.class_names) < 2:
        raise DataError(
            f"{tree.root / 'train'} has {len(listing.class_names)} class folder(s) {listing.class_names}; "
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
