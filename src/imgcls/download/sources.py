"""Download stage: get a data set's files from a location (folder, file, URL or source list) into a
(temporary) raw folder, and verify them."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import datasets
from ..datasets import CIFAR10_ARCHIVE, DATASETS, gunzip
from ..errors import DataError, PermanentFetchError
from ..manifest import MANIFEST_NAME, scan_folder, write_manifest
from ..report import bullet_list
from .archives import ArchiveLimits, extract_archive, is_archive
from .fetch import byte_progress, digest_file, expand_source, fetch_file, is_url, join_location

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------
# Download stage: get the files into a (temporary) raw folder and verify them.


@dataclass(frozen=True)
class FetchOptions:
    retries: int  # attempts per URL
    timeout_s: float  # socket timeout per HTTP request
    limits: ArchiveLimits  # what an archive may unpack to
    on_bad_image: str = "error"  # image folders: "skip" leaves out (and lists) links that cannot be copied

    @property
    def max_download_bytes(self) -> int:
        """The most bytes one download may write: data.max_extract_gb, the most its archive may unpack to. In
        our formats a file is about the size of what it unpacks to or smaller (gzip and zip compress; a tar adds
        a 512-byte header a file and pads each to 512 bytes), so a body past this is not a data set we could
        unpack but an endless or hostile one. Only a plain, uncompressed .tar of tiny files near the limit is
        cut short by it; its message names data.max_extract_gb to raise."""
        return self.limits.max_bytes


def acquire(dataset: str, source: str, raw_dir: Path, options: FetchOptions, *, log: Log = print) -> dict:
    """Fill the empty folder ``raw_dir`` with verified files of ``dataset``; returns provenance for source.json."""
    locations = expand_source(source)
    getter = FETCHERS[dataset]
    failures = []
    for location in locations:
        try:
            provenance = getter(location, raw_dir, options, log=log)
            provenance.update(dataset=dataset, location=location)
            (raw_dir / "source.json").write_text(json.dumps(provenance, indent=2) + "\n")
            log(f"download: {dataset} verified from {location}")
            return provenance
        except DataError as error:  # this location failed: remember why, try the next one
            failures.append(f"{location}: {error}")
        for child in raw_dir.iterdir():  # start the next location from an empty folder
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if len(locations) > 1:
            log(f"download: {location} failed; trying the next location")
    hint = DATASETS[dataset].offline_advice
    raise DataError(f"could not get {dataset} from data.source={source!r}:\n{bullet_list(failures)}\nNext step: {hint}")


def _fetch(location: str, dest: Path, options: FetchOptions, *, log: Log) -> None:
    """Download (or copy) ``location`` to ``dest`` with the stage's retries, timeout and size cap; bytes on a
    terminal as they come, one summary line in the log."""
    started = time.perf_counter()
    with byte_progress(dest.name) as progress:
        fetch_file(
            location,
            dest,
            retries=options.retries,
            timeout_s=options.timeout_s,
            log=log,
            progress=progress.received,
            max_bytes=options.max_download_bytes,
        )
    seconds = time.perf_counter() - started
    size = dest.stat().st_size
    log(f"download: {dest.name}: {size / 1e6:,.1f} MB in {seconds:.1f} s ({size / 1e6 / max(seconds, 1e-9):,.1f} MB/s)")


def _get_fashion_mnist(location: str, raw_dir: Path, options: FetchOptions, *, log: Log) -> dict:
    if not is_url(location) and not Path(location).is_dir():
        raise PermanentFetchError("not a folder; Fashion-MNIST needs a folder (or base URL) with the four .gz files")
    files = {}
    for name, expected in datasets.FASHION_MNIST_FILES.items():
        dest = raw_dir / name
        _fetch(join_location(location, name), dest, options, log=log)
        content = gunzip(dest)
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
    _fetch(url, archive, options, log=log)
    digest = digest_file(archive)
    if digest.md5 != datasets.CIFAR10_ARCHIVE_MD5:
        raise DataError(
            f"checksum mismatch for {CIFAR10_ARCHIVE} from {url}: expected md5 {datasets.CIFAR10_ARCHIVE_MD5}, "
            f"got {digest.md5} ({digest.size} bytes); download it again or point data.source at a good copy"
        )
    extract_archive(archive, raw_dir, options.limits)
    archive.unlink()  # the extracted batches are what preprocess reads; keeping both doubles the cache
    return {"files": {CIFAR10_ARCHIVE: {"md5": digest.md5, "sha256": digest.sha256}}}


def _get_image_folder(location: str, raw_dir: Path, options: FetchOptions, *, log: Log) -> dict:
    if not is_url(location) and Path(location).is_dir():
        return record_folder(Path(location), raw_dir, options, log=log)
    if not is_archive(location):
        raise PermanentFetchError("expected a folder or a .tar, .tar.gz, .tgz or .zip archive")
    name = Path(location.split("?", 1)[0].rstrip("/")).name  # keep the name: messages mention it
    archive = raw_dir / name
    _fetch(location, archive, options, log=log)
    digest = digest_file(archive)
    images_dir = raw_dir / "images"
    images_dir.mkdir()
    started = time.perf_counter()
    with byte_progress(f"extracting {name}") as progress:
        count = extract_archive(archive, images_dir, options.limits, progress=progress)
    archive.unlink()
    manifest = scan_folder(images_dir, on_bad_link="error", log=log)  # extracted: no links, no specials
    manifest_sha256 = write_manifest(raw_dir / MANIFEST_NAME, manifest)
    log(
        f"download: extracted {count} files ({manifest.total_bytes / 1e6:,.1f} MB of images) from {name} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return {
        "files": {name: {"sha256": digest.sha256, "bytes": digest.size}},
        "manifest": {"images": len(manifest.images), "bytes": manifest.total_bytes, "sha256": manifest_sha256},
    }


def record_folder(source: Path, raw_dir: Path, options: FetchOptions, *, log: Log) -> dict:
    """A local folder is read where it is, never copied: check it (links, special files), hash every image and
    write the manifest into ``raw_dir``, which preprocess then reads the images by."""
    if raw_dir.resolve().is_relative_to(source.resolve()):
        raise PermanentFetchError(
            f"{source} contains the project's data folder ({raw_dir.parent}); point data.source "
            "at the folder of images, not at the project"
        )
    started = time.perf_counter()
    with byte_progress(f"hashing {source.name}") as progress:
        manifest = scan_folder(source, on_bad_link=options.on_bad_image, log=log, progress=progress)
    manifest.folder = str(source)
    manifest_sha256 = write_manifest(raw_dir / MANIFEST_NAME, manifest)
    seconds = time.perf_counter() - started
    log(
        f"download: recorded {len(manifest.images)} images ({manifest.total_bytes / 1e6:,.1f} MB) in place in "
        f"{source} in {seconds:.1f} s ({len(manifest.images) / max(seconds, 1e-9):,.0f} images/s); nothing copied"
    )
    return {
        "files": {},
        "in_place": str(source),
        "manifest": {"images": len(manifest.images), "bytes": manifest.total_bytes, "sha256": manifest_sha256},
    }


# How each data set in datasets.DATASETS is fetched into data/raw (one entry per data set, a test checks).
FETCHERS = {"fashion-mnist": _get_fashion_mnist, "cifar10": _get_cifar10, "imagefolder": _get_image_folder}
