"""The manifest of an image folder: every image file's relative path, size and SHA-256, written by the download
stage into data/raw/manifest.json, read by the preprocess stage. A local folder is read where it is (no second
copy): the manifest is what DVC sees change when an image changes, what preprocess reads (exactly those files,
each checked against its size and hash), and the key of the decode cache. Torch-free: download uses it.

``scan_folder`` is the one walk over a folder a user gives. It never follows a link out of the folder: links to
folders, links that lead outside, dangling links, link loops and special files (FIFOs, devices) are refused,
or skipped and listed with data.on_bad_image: skip. A link to a file inside the folder counts as that file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .datasets import IMAGE_SUFFIXES
from .errors import DataError, PermanentFetchError
from .report import bullet_list

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK_BYTES = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
Log = Callable[[str], None]
Progress = Callable[[int], None]  # called with the bytes just read


def is_hidden(name: str) -> bool:
    """Dot-names (.DS_Store, .ipynb_checkpoints, macOS's AppleDouble ._name.jpg) and __MACOSX: never data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(relative: str) -> bool:
    """An image the preprocess stage decodes: an image suffix, no hidden part anywhere in its path."""
    path = PurePosixPath(relative)
    return path.suffix.lower() in IMAGE_SUFFIXES and not any(is_hidden(part) for part in path.parts)


@dataclass(frozen=True)
class ImageFile:
    path: str  # relative to the manifest's folder, POSIX separators
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a folder holds: its images (hashed), the other files (hidden or not images: counted, never read)
    and every folder (an empty class folder is an error preprocess names)."""

    images: list[ImageFile] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    folder: str | None = None  # where the files are: a source folder read in place, or None (data/raw/images)

    @property
    def total_bytes(self) -> int:
        return sum(image.bytes for image in self.images)


# ----------------------------------------------------------------------------------------------------
# Reading a file safely: regular files only, never blocking on a FIFO swapped in after the scan.


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is (or links to) a regular file; DataError otherwise. O_NONBLOCK: a FIFO
    put there after the scan makes open() return at once instead of waiting for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise DataError(f"{path} cannot be opened ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def file_sha256(file: BinaryIO, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Scanning a folder.


def scan_folder(source: Path, *, on_bad_link: str, log: Log, progress: Progress | None = None) -> Manifest:
    """The manifest of ``source`` (images hashed), walked without following any link out of it. Files that
    cannot be read safely stop the scan, or with ``on_bad_link`` "skip" are left out and listed."""
    root = source.resolve()
    manifest, bad = Manifest(), []
    for relative, problem in _walk(source, root, manifest):
        bad.append((source / relative, problem))
    hashed = []
    for relative in manifest.other:
        if is_image_name(relative):
            try:
                with open_regular(source / relative) as file:
                    hashed.append(ImageFile(relative, os.fstat(file.fileno()).st_size, file_sha256(file, progress)))
            except (DataError, OSError) as error:
                bad.append((source / relative, f"cannot be read ({getattr(error, 'strerror', None) or error})"))
    manifest.images = hashed
    manifest.other = [relative for relative in manifest.other if not is_image_name(relative)]
    if bad:
        _refuse_or_list(bad, source, on_bad_link, log)
    return manifest


def _walk(source: Path, root: Path, manifest: Manifest) -> Iterator[tuple[str, str]]:
    """Fill ``manifest.folders`` and (for now, every file) ``manifest.other`` in sorted order; yields
    (relative path, reason) for what cannot be read safely."""
    unreadable: list[tuple[str, str]] = []

    def note(error: OSError) -> None:  # os.walk would skip an unreadable folder silently
        unreadable.append((os.path.relpath(error.filename, source), f"cannot be read ({error.strerror})"))

    files = []
    for folder, folder_names, file_names in os.walk(source, onerror=note):  # linked folders are not entered
        here = Path(folder)
        relative_here = here.relative_to(source)
        if relative_here.parts:
            manifest.folders.append(relative_here.as_posix())
        for name in sorted(folder_names):
            if (here / name).is_symlink():
                folder_names.remove(name)
                yield (relative_here / name).as_posix(), "a link to a folder (links to folders are not followed)"
        for name in file_names:
            problem = _unsafe_file(here / name, root)
            if problem:
                yield (relative_here / name).as_posix(), problem
            else:
                files.append((relative_here / name).as_posix())
    yield from unreadable
    manifest.folders.sort(key=_parts)
    manifest.other = sorted(files, key=_parts)


def _parts(relative: str) -> list[str]:
    """Sort key: folder by folder, as Path objects sort (a/b before a-b/c, unlike plain strings)."""
    return relative.split("/")


def _unsafe_file(path: Path, root: Path) -> str | None:
    """Why ``path`` (a file, or a link to a file inside ``root``) cannot be read safely; None when it can."""
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
    return None


def _refuse_or_list(bad: list[tuple[Path, str]], source: Path, on_bad_link: str, log: Log) -> None:
    """Files that cannot be read safely stop the download, or with data.on_bad_image: skip are listed."""
    listed = bullet_list([f"{path}: {reason}" for path, reason in sorted(bad)])
    if on_bad_link != "skip":
        raise PermanentFetchError(
            f"{len(bad)} file(s) in {source} cannot be read safely:\n{listed}\n"
            "replace links with the files themselves, or set data.on_bad_image: skip to leave them out"
        )
    log(f"download: skipped {len(bad)} file(s) that cannot be read safely (data.on_bad_image: skip):\n{listed}")


# ----------------------------------------------------------------------------------------------------
# The file: one image a line, sorted by path, so two versions diff line by line.


def write_manifest(path: Path, manifest: Manifest) -> str:
    """Write ``manifest`` to ``path`` (inside the download stage's temporary folder, so it appears with the rest
    of data/raw or not at all); returns the file's SHA-256, which source.json records."""
    head = {"format": MANIFEST_FORMAT, "folder": manifest.folder, "images": len(manifest.images)}
    lines = [json.dumps(head)[:-1] + ","]
    lines.append(' "files": [')
    rows = [json.dumps([image.path, image.bytes, image.sha256]) for image in manifest.images]
    lines.append(",\n".join("  " + row for row in rows))
    lines.append(" ],")
    lines.append(f' "other": {json.dumps(manifest.other)},')
    lines.append(f' "folders": {json.dumps(manifest.folders)}')
    lines.append("}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(path: Path) -> Manifest:
    """The manifest at ``path``, every entry checked (relative paths that stay inside the folder, sizes, hashes)."""
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(
            images=[ImageFile(_relative(p), _size(n), _sha256(h)) for p, n, h in raw["files"]],
            other=[_relative(p) for p in raw["other"]],
            folders=[_relative(p) for p in raw["folders"]],
            folder=raw["folder"],
        )
        if raw["format"] != MANIFEST_FORMAT or not isinstance(manifest.folder, str | None):
            raise ValueError(f"format {raw['format']!r}, folder {manifest.folder!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} is damaged ({type(error).__name__}: {str(error)[:200]})",
            "delete data/raw and rerun the download stage (dvc repro download)",
        ) from None
    return manifest


def _relative(text: str) -> str:
    if not isinstance(text, str) or text.startswith("/") or "\\" in text or "\0" in text:
        raise ValueError(f"path {text!r} is not relative to the folder")
    if any(part in ("", ".", "..") for part in text.split("/")):
        raise ValueError(f"path {text!r} is not a plain relative path")
    return text


def _size(value: int) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"size {value!r}")
    return value


def _sha256(value: str) -> str:
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise ValueError(f"sha256 {value!r}")
    return value
