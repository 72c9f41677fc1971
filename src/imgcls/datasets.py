"""The data sets: where their files come from, how they are verified, and how they decode to uint8 tensors.

Nothing here unpickles anything: Fashion-MNIST is parsed from IDX files, CIFAR-10 from the fixed-size
records of the official *binary* archive, image folders with Pillow.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .archives import ArchiveLimits, extract_archive, is_archive
from .fetch import DataError, PermanentFetchError, digest_file, expand_source, fetch_file, is_url, join_location

Log = Callable[[str], None]

DATASETS = ("fashion-mnist", "cifar10", "imagefolder")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class ExpectedIdx:
    """Checksum of the *decompressed* IDX bytes: Debian repacks the .gz files (other gzip bytes, same
    data), so hashing the content verifies the system copy and the official mirrors alike."""

    content_sha256: str
    content_bytes: int


FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": ExpectedIdx(
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte.gz": ExpectedIdx(
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte.gz": ExpectedIdx(
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte.gz": ExpectedIdx(
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then 1024 R, 1024 G, 1024 B bytes
CIFAR10_RECORDS_PER_FILE = 10000

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------------
# Download stage: get the files into a (temporary) raw folder and verify them.


@dataclass(frozen=True)
class FetchOptions:
    retries: int  # attempts per URL
    timeout_s: float  # socket timeout per HTTP request
    limits: ArchiveLimits  # what an archive may unpack to
    on_bad_image: str = "error"  # image folders: "skip" leaves out (and lists) links that cannot be copied


def acquire(dataset: str, source: str, raw_dir: Path, options: FetchOptions, *, log: Log = print) -> dict:
    """Fill the empty folder ``raw_dir`` with verified files of ``dataset``; returns provenance for source.json."""
    locations = expand_source(source)
    getter = {"fashion-mnist": _get_fashion_mnist, "cifar10": _get_cifar10, "imagefolder": _get_image_folder}[dataset]
    failures = []
    for location in locations:
        try:
            provenance = getter(location, raw_dir, options, log=log)
            provenance.update(dataset=dataset, location=location)
            (raw_dir / "source.json").write_text(json.dumps(provenance, indent=2) + "\n")
            log(f"download: {dataset} verified from {location}")
            return provenance
        except DataError as error:  # this location failed: remember why, try the next one
            failures.append(f"  - {location}: {error}")
        for child in raw_dir.iterdir():  # start the next location from an empty folder
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if len(locations) > 1:
            log(f"download: {location} failed; trying the next location")
    hint = {
        "fashion-mnist": "set data.source to a folder holding the four .gz files, or install Debian's package "
                         "(apt-get install dataset-fashion-mnist) which puts them in /usr/share/datasets/fashion-mnist",
        "cifar10": f"download {CIFAR10_ARCHIVE} where you have a network and set data.source to that file",
        "imagefolder": "set data.source to a folder or a .tar/.tar.gz/.zip archive laid out as train/<class>/*",
    }[dataset]
    raise DataError(f"could not get {dataset} from data.source={source!r}:\n" + "\n".join(failures) + f"\nNext step: {hint}")


def _get_fashion_mnist(location: str, raw_dir: Path, options: FetchOptions, *, log: Log) -> dict:
    if not is_url(location) and not Path(location).is_dir():
        raise PermanentFetchError("not a folder; Fashion-MNIST needs a folder (or base URL) with the four .gz files")
    files = {}
    for name, expected in FASHION_MNIST_FILES.items():
        dest = raw_dir / name
        fetch_file(join_location(location, name), dest, retries=options.retries, timeout_s=options.timeout_s, log=log)
        content = _gunzip(dest)
        actual = hashlib.sha256(content).hexdigest()
        if len(content) != expected.content_bytes or actual != expected.content_sha256:
            raise DataError(
                f"checksum mismatch for {name}: expected sha256 {expected.content_sha256} "
                f"({expected.content_bytes} bytes decompressed), got {actual} ({len(content)} bytes); "
                "the copy is damaged or not Fashion-MNIST"
            )
        files[name] = {"content_sha256": actual}
    return {"files": files}


def _get_cifar10(location: str, raw_dir: Path, options: FetchOptions, *, log: Log) -> dict:
    if is_url(location):
        url = location if location.lower().endswith((".tar.gz", ".tgz")) else join_location(location, CIFAR10_ARCHIVE)
    else:
        url = str(Path(location) / CIFAR10_ARCHIVE) if Path(location).is_dir() else location
    archive = raw_dir / CIFAR10_ARCHIVE
    fetch_file(url, archive, retries=options.retries, timeout_s=options.timeout_s, log=log)
    digest = digest_file(archive)
    if digest.md5 != CIFAR10_ARCHIVE_MD5:
        raise DataError(
            f"checksum mismatch for {CIFAR10_ARCHIVE} from {url}: expected md5 {CIFAR10_ARCHIVE_MD5}, "
            f"got {digest.md5} ({digest.size} bytes); download it again or point data.source at a good copy"
        )
    extract_archive(archive, raw_dir, options.limits)
    archive.unlink()  # the extracted batches are what preprocess reads; keeping both doubles the cache
    return {"files": {CIFAR10_ARCHIVE: {"md5": digest.md5, "sha256": digest.sha256}}}


def _get_image_folder(location: str, raw_dir: Path, options: FetchOptions, *, log: Log) -> dict:
    images_dir = raw_dir / "images"
    if not is_url(location) and Path(location).is_dir():
        count = copy_folder(Path(location), images_dir, on_bad_link=options.on_bad_image, log=log)
        log(f"download: copied {count} files from {location}")
        return {"files": {}}
    if not is_archive(location):
        raise PermanentFetchError("expected a folder or a .tar, .tar.gz, .tgz or .zip archive")
    name = Path(location.split("?", 1)[0].rstrip("/")).name  # keep the name: messages mention it
    archive = raw_dir / name
    fetch_file(location, archive, retries=options.retries, timeout_s=options.timeout_s, log=log)
    digest = digest_file(archive)
    images_dir.mkdir()
    count = extract_archive(archive, images_dir, options.limits)
    archive.unlink()
    log(f"download: extracted {count} files from {name}")
    return {"files": {name: {"sha256": digest.sha256, "bytes": digest.size}}}


def copy_folder(source: Path, dest: Path, *, on_bad_link: str, log: Log) -> int:
    """Copy the files under ``source`` into the new folder ``dest``, never following a link out of ``source``.

    A link to a file inside ``source`` is copied as that file; links to folders, links that lead outside,
    dangling links, link loops and special files (FIFOs, devices) are errors, or skipped and listed when
    ``on_bad_link`` is "skip". Returns the number of files copied."""
    root = source.resolve()
    bad: list[tuple[Path, str]] = []
    copied = 0
    for folder, folder_names, file_names in os.walk(source):  # followlinks=False: linked folders are not entered
        here = Path(folder)
        (dest / here.relative_to(source)).mkdir(parents=True, exist_ok=True)
        for name in sorted(folder_names):
            if (here / name).is_symlink():
                folder_names.remove(name)
                bad.append((here / name, "a link to a folder (links to folders are not followed)"))
        for name in sorted(file_names):
            path = here / name
            if path.is_symlink():
                try:
                    resolved = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    bad.append((path, "a dangling link or a link loop"))
                    continue
                if not resolved.is_relative_to(root):
                    bad.append((path, f"a link to {resolved}, outside the source folder"))
                    continue
                path_to_copy = resolved
            else:
                path_to_copy = path
            if not stat.S_ISREG(os.stat(path_to_copy).st_mode):
                bad.append((path, "not a regular file (a FIFO, socket or device)"))
                continue
            shutil.copyfile(path_to_copy, dest / here.relative_to(source) / name)
            copied += 1
    if bad:
        listed = "\n".join(f"  - {path}: {reason}" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if on_bad_link != "skip":
            raise PermanentFetchError(
                f"{len(bad)} file(s) in {source} cannot be copied safely:\n{listed}{more}\n"
                "replace links with the files themselves, or set data.on_bad_image: skip to leave them out")
        log(f"download: skipped {len(bad)} file(s) that cannot be copied safely (data.on_bad_image: skip):\n{listed}{more}")
    return copied


def _gunzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise DataError(f"{path.name} is not a valid gzip file ({error}); the copy is truncated or corrupt") from None


# ----------------------------------------------------------------------------------------------------
# Preprocess stage: decode the verified raw folder into uint8 arrays.


@dataclass
class DecodedDataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (images uint8 (N, C, H, W), labels int64 (N,))
    class_names: list[str]


def decode(dataset: str, raw_dir: Path, *, image_size: int, channels: int, on_bad_image: str, log: Log = print) -> DecodedDataset:
    if dataset == "fashion-mnist":
        return _decode_fashion_mnist(raw_dir)
    if dataset == "cifar10":
        return _decode_cifar10(raw_dir)
    from .imagefolder import decode_image_folder

    return decode_image_folder(find_image_root(raw_dir / "images"), image_size=image_size, channels=channels,
                               on_bad_image=on_bad_image, log=log)


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parse an IDX file (unsigned-byte data only, as in (Fashion-)MNIST) into an array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: IDX header is truncated ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{name}: IDX records of the wrong size: header says shape {shape} ({expected} bytes), "
            f"file has {len(data)} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _decode_fashion_mnist(raw_dir: Path) -> DecodedDataset:
    def load(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = parse_idx(_gunzip(raw_dir / f"{prefix}-images-idx3-ubyte.gz"), f"{prefix}-images")
        labels = parse_idx(_gunzip(raw_dir / f"{prefix}-labels-idx1-ubyte.gz"), f"{prefix}-labels")
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


def _decode_cifar10(raw_dir: Path) -> DecodedDataset:
    folder = raw_dir / CIFAR10_FOLDER

    def load(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DataError(f"{path} is missing; delete data/raw and rerun the download stage")
            images, labels = parse_cifar_records(path.read_bytes(), name)
            if len(labels) != CIFAR10_RECORDS_PER_FILE:
                raise DataError(f"{name}: {len(labels)} records, expected {CIFAR10_RECORDS_PER_FILE}")
            parts.append((images, labels))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    meta = folder / "batches.meta.txt"
    class_names = [line.strip() for line in meta.read_text().splitlines() if line.strip()] if meta.is_file() else []
    if len(class_names) != 10:
        raise DataError(f"{meta}: expected 10 class names, found {len(class_names)}")
    return DecodedDataset({"train": load(CIFAR10_TRAIN_FILES), "test": load(CIFAR10_TEST_FILES)}, class_names)


def find_image_root(images_dir: Path) -> Path:
    """The folder holding ``train/``: the extracted folder itself or its single top-level subfolder."""
    if (images_dir / "train").is_dir():
        return images_dir
    children = [c for c in images_dir.iterdir() if c.is_dir() and not c.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise DataError(
        f"no train/ folder in the image source (found: {sorted(c.name for c in images_dir.iterdir())[:10]}); "
        "lay it out as train/<class>/*, test/<class>/* (optional) and val/<class>/* (optional)"
    )
