"""Download stage: get a data set's files from a location (folder, file, URL or source list) into a
(temporary) raw folder, and verify them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import datasets
from ..datasets import CIFAR10_ARCHIVE, DATASETS, gunzip
from ..errors import DataError, PermanentFetchError
from ..report import bullet_list
from .archives import ArchiveLimits, extract_archive, is_archive
from .fetch import digest_file, expand_source, fetch_file, is_url, join_location

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
    """Download (or copy) ``location`` to ``dest`` with the stage's retries, timeout and size cap."""
    fetch_file(
        location,
        dest,
        retries=options.retries,
        timeout_s=options.timeout_s,
        log=log,
        max_bytes=options.max_download_bytes,
    )


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
    images_dir = raw_dir / "images"
    if not is_url(location) and Path(location).is_dir():
        count = copy_folder(Path(location), images_dir, on_bad_link=options.on_bad_image, log=log)
        log(f"download: copied {count} files from {location}")
        return {"files": {}}
    if not is_archive(location):
        raise PermanentFetchError("expected a folder or a .tar, .tar.gz, .tgz or .zip archive")
    name = Path(location.split("?", 1)[0].rstrip("/")).name  # keep the name: messages mention it
    archive = raw_dir / name
    _fetch(location, archive, options, log=log)
    digest = digest_file(archive)
    images_dir.mkdir()
    count = extract_archive(archive, images_dir, options.limits)
    archive.unlink()
    log(f"download: extracted {count} files from {name}")
    return {"files": {name: {"sha256": digest.sha256, "bytes": digest.size}}}


# How each data set in datasets.DATASETS is fetched into data/raw (one entry per data set, a test checks).
FETCHERS = {"fashion-mnist": _get_fashion_mnist, "cifar10": _get_cifar10, "imagefolder": _get_image_folder}


def copy_folder(source: Path, dest: Path, *, on_bad_link: str, log: Log) -> int:
    """Copy the files under ``source`` into the new folder ``dest``, never following a link out of ``source``.

    A link to a file inside ``source`` is copied as that file; links to folders, links that lead outside,
    dangling links, link loops and special files (FIFOs, devices) are errors, or skipped and listed when
    ``on_bad_link`` is "skip". Returns the number of files copied."""
    root = source.resolve()
    if dest.resolve().is_relative_to(root):
        raise PermanentFetchError(
            f"{source} contains the project's data folder ({dest.parent}); point data.source "
            "at the folder of images, not at the project"
        )
    bad: list[tuple[Path, str]] = []
    copied = 0

    def unreadable(error: OSError) -> None:  # os.walk would skip an unreadable folder silently
        bad.append((Path(error.filename), f"cannot be read ({error.strerror})"))

    for folder, folder_names, file_names in os.walk(source, onerror=unreadable):  # linked folders are not entered
        here = Path(folder)
        (dest / here.relative_to(source)).mkdir(parents=True, exist_ok=True)
        bad += _leave_out_linked_folders(here, folder_names)
        for name in sorted(file_names):
            problem = _copy_file(here / name, dest / here.relative_to(source) / name, root)
            if problem:
                bad.append((here / name, problem))
            else:
                copied += 1
    if bad:
        _refuse_or_list(bad, source, on_bad_link, log)
    return copied


def _leave_out_linked_folders(here: Path, folder_names: list[str]) -> list[tuple[Path, str]]:
    """Take the links among ``folder_names`` out of os.walk's list (in place), so it never enters them;
    returns them as (path, reason)."""
    left_out = []
    for name in sorted(folder_names):
        if (here / name).is_symlink():
            folder_names.remove(name)
            left_out.append((here / name, "a link to a folder (links to folders are not followed)"))
    return left_out


def _copy_file(path: Path, target: Path, root: Path) -> str | None:
    """Copy ``path`` (a file, or a link to a file inside ``root``) to ``target``; None when copied, else why
    it cannot be copied safely."""
    if path.is_symlink():
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return "a dangling link or a link loop"
        if not resolved.is_relative_to(root):
            return f"a link to {resolved}, outside the source folder"
        path = resolved
    if not stat.S_ISREG(os.stat(path).st_mode):
        return "not a regular file (a FIFO, socket or device)"
    try:
        shutil.copyfile(path, target)
    except PermissionError as error:
        return f"cannot be read ({error.strerror})"
    return None


def _refuse_or_list(bad: list[tuple[Path, str]], source: Path, on_bad_link: str, log: Log) -> None:
    """Files that cannot be copied safely stop the download, or with data.on_bad_image: skip are listed."""
    listed = bullet_list([f"{path}: {reason}" for path, reason in bad])
    if on_bad_link != "skip":
        raise PermanentFetchError(
            f"{len(bad)} file(s) in {source} cannot be copied safely:\n{listed}\n"
            "replace links with the files themselves, or set data.on_bad_image: skip to leave them out"
        )
    log(f"download: skipped {len(bad)} file(s) that cannot be copied safely (data.on_bad_image: skip):\n{listed}")
