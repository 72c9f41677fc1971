"""The decode cache: decoded images reused by the SHA-256 of their file, so adding or changing a few images
decodes only those. It lives outside DVC's outputs (data/cache/decoded/), and deleting it is always safe: the
next run decodes everything again and writes the same bytes.

Layout: one folder per decode setting, named by a hash of everything that changes the decoded pixels
(image_size, channels, max_image_pixels, resize, the decoding code itself, Pillow's and NumPy's versions),
holding *packs*: one file per decoded chunk, ``<32 hex>.pack``::

    header  "IMGCLSP1", count (uint32), bytes per image (uint32)
    table   count x (SHA-256 of the image file (32 bytes), check (16 bytes))
    pixels  count x bytes per image: uint8 (C, H, W), C-ordered

The check is a BLAKE2b digest of the setting, the file's hash and the pixels, verified on every read. A pack
is written to a temporary name and renamed into place, so a killed run leaves at most a temporary (removed
by the next run), never a half-written pack under a pack's name; and a pack that is truncated, of the wrong
size, a link or otherwise damaged is ignored (its images decoded again), never trusted.

Bounded: after each run the packs it used are marked (their mtime), and the least recently used packs past
twice the size of what the run used are removed; only the KEEP_SETTINGS most recently used settings are kept."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from . import images as images_module

PACK_MAGIC = b"IMGCLSP1"
HEADER = struct.Struct("<8sII")  # magic, count, bytes per image
TABLE_ENTRY_BYTES = 32 + 16  # the file's SHA-256, the check
PACK_NAME = re.compile(r"[0-9a-f]{32}\.pack")
TEMPORARY_NAME = re.compile(r"\.([0-9a-f]{32}\.pack)\.([0-9]{1,10})\.tmp")
SETTINGS_NAME = re.compile(r"[0-9a-f]{16}")
KEEP_SETTINGS = 3  # settings folders kept (most recently used): switching image_size back and forth stays fast
KEEP_FACTOR = 2  # a setting's packs kept: up to this many times the bytes the last run used


@dataclass(frozen=True)
class DecodeSettings:
    """Everything besides the file's bytes that decides the decoded pixels."""

    image_size: int
    channels: int
    max_pixels: int
    resize: str  # squash | crop | pad: the same file gives other pixels under each

    def __post_init__(self) -> None:
        # A bug, not a bad image: refused before any file is decoded (a decoder's ValueError counts as unreadable).
        if self.resize not in images_module.RESIZE_MODES:
            raise ValueError(f"resize must be one of {images_module.RESIZE_MODES}, not {self.resize!r}")

    @property
    def row_bytes(self) -> int:
        return self.channels * self.image_size * self.image_size

    def identity(self) -> dict:
        code = hashlib.sha256(Path(images_module.__file__).read_bytes()).hexdigest()[:16]
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "max_image_pixels": self.max_pixels,
            "resize": self.resize,
            "decoder_sha256": code,  # preprocess/images.py: a change to decoding never reuses old pixels
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "pack_format": 1,
        }

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CachedImage:
    """Where an image's decoded pixels are: a pack, its row, and the pack's size when it was indexed."""

    pack: str
    row: int
    pack_bytes: int


@dataclass(frozen=True)
class PackWriter:
    """What a worker needs to store and read packs (picklable)."""

    folder: str
    settings_key: str
    row_bytes: int


def _check(settings_key: str, sha256: str, pixels: bytes) -> bytes:
    return hashlib.blake2b(settings_key.encode() + bytes.fromhex(sha256) + pixels, digest_size=16).digest()


def _pack_bytes(count: int, row_bytes: int) -> int:
    return HEADER.size + count * (TABLE_ENTRY_BYTES + row_bytes)


class DecodeCache:
    """The packs of one decode setting under ``root``; an unusable folder (a link, unwritable) disables the
    cache for the run with one line in the log, it never stops the stage."""

    def __init__(self, root: Path, settings: DecodeSettings, log=print):
        self.settings = settings
        self.folder = root / settings.key
        self.index: dict[str, CachedImage] = {}
        self.enabled = _usable_folder(root, self.folder, settings, log)
        if self.enabled:
            _remove_dead_temporaries(self.folder)
            self.index = _read_index(self.folder, settings.row_bytes)

    def writer(self) -> PackWriter | None:
        return PackWriter(str(self.folder), self.settings.key, self.settings.row_bytes) if self.enabled else None

    def lookup(self, sha256: str) -> CachedImage | None:
        return self.index.get(sha256)

    def keep(self, used_packs: set[str]) -> None:
        """Mark ``used_packs`` as just used; remove least recently used packs and settings past the bounds."""
        if not self.enabled:
            return
        packs = []
        for path in self.folder.iterdir():
            if PACK_NAME.fullmatch(path.name):
                with contextlib.suppress(OSError):
                    if path.name in used_packs:
                        os.utime(path, follow_symlinks=False)
                    info = path.lstat()
                    packs.append((path.name in used_packs, info.st_mtime, info.st_size, path))
        budget = KEEP_FACTOR * sum(size for used, _, size, _ in packs if used)
        for used, _, size, path in sorted(packs, key=lambda p: (not p[0], -p[1])):
            budget -= size
            if not used and budget < 0:
                path.unlink(missing_ok=True)
        _remove_old_settings(self.folder.parent, self.folder)


def _usable_folder(root: Path, folder: Path, settings: DecodeSettings, log) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in (root, folder):  # never write packs through a link to somewhere else
            if not stat.S_ISDIR(path.lstat().st_mode):
                raise NotADirectoryError(f"{path} is a link or not a folder")
        stamp = folder / "settings.json"
        if stamp.is_symlink():
            stamp.unlink()
        stamp.write_text(json.dumps(settings.identity(), indent=2) + "\n")  # for people; marks it recently used
        os.utime(folder)
        return True
    except OSError as error:
        log(f"preprocess: decode cache off for this run: {root} is not usable ({error}); every image is decoded")
        return False


def _remove_dead_temporaries(folder: Path) -> None:
    for path in folder.iterdir():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match and not _running(int(match.group(2))):
            with contextlib.suppress(OSError):
                path.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _read_index(folder: Path, row_bytes: int) -> dict[str, CachedImage]:
    """SHA-256 -> where its pixels are, from every valid pack's table. Damaged packs are removed."""
    index = {}
    for path in sorted(folder.iterdir()):
        if not PACK_NAME.fullmatch(path.name):
            continue
        table = _read_table(path, row_bytes)
        if table is None:
            with contextlib.suppress(OSError):
                path.unlink()  # a link is removed, not what it points to
            continue
        size = _pack_bytes(len(table), row_bytes)
        for row, sha256 in enumerate(table):
            index[sha256] = CachedImage(str(path), row, size)
    return index


def _read_table(path: Path, row_bytes: int) -> list[str] | None:
    """The SHA-256s in a pack, or None when it is not a complete, regular pack file of this setting."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        header = os.pread(fd, HEADER.size, 0)
        if not stat.S_ISREG(info.st_mode) or len(header) != HEADER.size:
            return None
        magic, count, pack_row_bytes = HEADER.unpack(header)
        if magic != PACK_MAGIC or pack_row_bytes != row_bytes or info.st_size != _pack_bytes(count, row_bytes):
            return None
        table = os.pread(fd, count * TABLE_ENTRY_BYTES, HEADER.size)
        if len(table) != count * TABLE_ENTRY_BYTES:
            return None
        return [table[i * TABLE_ENTRY_BYTES : i * TABLE_ENTRY_BYTES + 32].hex() for i in range(count)]
    finally:
        os.close(fd)


def read_cached(where: CachedImage, sha256: str, writer: PackWriter, open_packs: dict[str, int]) -> bytes | None:
    """The pixels cached for ``sha256``, verified against the pack's check; None when anything is off (the
    pack changed, vanished, or the bytes do not match), so the caller decodes the file instead."""
    try:
        fd = open_packs.get(where.pack)
        if fd is None:
            fd = open_packs[where.pack] = os.open(where.pack, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != where.pack_bytes:
            return None
        entry = os.pread(fd, TABLE_ENTRY_BYTES, HEADER.size + where.row * TABLE_ENTRY_BYTES)
        count = (where.pack_bytes - HEADER.size) // (TABLE_ENTRY_BYTES + writer.row_bytes)
        offset = HEADER.size + count * TABLE_ENTRY_BYTES + where.row * writer.row_bytes
        pixels = os.pread(fd, writer.row_bytes, offset)
    except OSError:
        return None
    if entry[:32].hex() != sha256 or len(pixels) != writer.row_bytes:
        return None
    return pixels if entry[32:] == _check(writer.settings_key, sha256, pixels) else None


def write_pack(writer: PackWriter, decoded: list[tuple[str, bytes]]) -> str | None:
    """Store (SHA-256, pixels) pairs as one pack (temporary name, then rename); returns the pack's name, or
    None when it could not be written (a full disk costs the reuse, not the run)."""
    name = hashlib.blake2b("".join(sha for sha, _ in decoded).encode(), digest_size=16).hexdigest() + ".pack"
    folder = Path(writer.folder)
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "xb") as out:  # "x": never through anything already there
            out.write(HEADER.pack(PACK_MAGIC, len(decoded), writer.row_bytes))
            for sha256, pixels in decoded:
                out.write(bytes.fromhex(sha256) + _check(writer.settings_key, sha256, pixels))
            for _, pixels in decoded:
                out.write(pixels)
        os.replace(temporary, folder / name)
        return name
    except OSError:
        temporary.unlink(missing_ok=True)
        return None


def _remove_old_settings(root: Path, current: Path) -> None:
    """Keep the KEEP_SETTINGS most recently used settings folders (ours only: 16 hex digits, settings.json)."""
    folders = []
    for path in root.iterdir():
        with contextlib.suppress(OSError):
            info = path.lstat()
            if SETTINGS_NAME.fullmatch(path.name) and stat.S_ISDIR(info.st_mode) and (path / "settings.json").exists():
                folders.append((path == current, info.st_mtime, path))
    for _, _, path in sorted(folders, reverse=True)[KEEP_SETTINGS:]:
        shutil.rmtree(path, ignore_errors=True)
