"""Safe extraction of .tar, .tar.gz and .zip archives.

Every member is checked before anything is written, and the first bad one is named:
- links of any kind (symbolic or hard) are refused: image data sets never need them, and a link's own
  text says nothing about where it leads once other links are extracted before it (a chain of harmless
  looking links can end anywhere on the machine);
- absolute paths, ``..`` components, device files and FIFOs are refused;
- sparse members, negative sizes and oversized long-name/PAX headers are refused;
- the total uncompressed size is capped (``data.max_extract_gb``), and a zip member, a whole zip or a
  compressed tar (gzip, bzip2, xz) whose compression ratio is absurd (a "zip bomb") is refused.
Writing then counts bytes again, so a header that lies about a member's size cannot get past the cap.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

from ..errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# Real image archives compress little (JPEG/PNG are already compressed; raw BMP/PPM reach ~10:1). Ratios
# beyond this are how zip bombs work. Small members are exempt: a few KiB of zeros compress 1000:1 harmlessly.
MAX_COMPRESSION_RATIO = 200
RATIO_EXEMPT_BYTES = 1 << 20
COPY_CHUNK_BYTES = 1 << 20


# A GNU long name or a PAX header is read whole into memory by tarfile: a 400 MB one costs 2 GB before any
# member is seen. Real ones are a few hundred bytes.
MAX_TAR_HEADER_BYTES = 1 << 16
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized long-name and PAX headers before reading them."""

    def _proc_gnulong(self, tar):
        _check_header_size(self)
        return super()._proc_gnulong(tar)

    def _proc_pax(self, tar):
        _check_header_size(self)
        return super()._proc_pax(tar)


def _check_header_size(info: tarfile.TarInfo) -> None:
    if info.size > MAX_TAR_HEADER_BYTES:
        raise DataError(f"a tar header (long name or PAX record) of {info.size:,} bytes, over {MAX_TAR_HEADER_BYTES:,}; "
                        "the archive is malformed or hostile; nothing was extracted")


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # total uncompressed bytes the archive may write
    max_ratio: float = MAX_COMPRESSION_RATIO


def _refuse(archive: Path, message: str) -> DataError:
    return DataError(f"archive {archive.name}: {message}; nothing was extracted")


def _check_member_path(archive: Path, name: str) -> PurePosixPath:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _refuse(archive, f"refusing member {name!r} with an absolute path")
    if ".." in member.parts:
        raise _refuse(archive, f"refusing member {name!r}: '..' would escape the target")
    return member


def _check_sizes(archive: Path, total: int, limits: ArchiveLimits, compressed: int) -> None:
    if total > limits.max_bytes:
        raise _refuse(archive, f"it would unpack to {total / 2**30:.2f} GiB, over the limit of "
                               f"{limits.max_bytes / 2**30:.2f} GiB (data.max_extract_gb); raise the limit if the "
                               "data set really is that large")
    if total > RATIO_EXEMPT_BYTES and compressed and total / compressed > limits.max_ratio:
        raise _refuse(archive, f"it would unpack {compressed:,} bytes into {total:,} "
                               f"(ratio {total / compressed:.0f}:1, limit {limits.max_ratio:.0f}:1): a decompression bomb")


def extract_archive(archive: Path, target: Path, limits: ArchiveLimits) -> int:
    """Extract ``archive`` into the existing folder ``target``; returns the number of files written."""
    linked = [p for p in target.rglob("*") if p.is_symlink()]
    if linked:  # writing through a link already in the target would land wherever it points
        raise DataError(f"cannot extract {archive.name} into {target}: it holds a link ({linked[0]})")
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, target, limits)
        return _extract_tar(archive, target, limits)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DataError(
            f"archive {archive.name} is truncated or corrupt ({type(error).__name__}: {error}); "
            "delete it and download it again, or point data.source at a good copy"
        ) from None
    except (OSError, ValueError, RuntimeError, NotImplementedError, UnicodeDecodeError, IndexError) as error:
        # Names this system cannot create (too long, NUL bytes), encrypted or unsupported compression, ...
        raise DataError(f"archive {archive.name} cannot be extracted ({type(error).__name__}: {error}); it is damaged, "
                        "encrypted, uses an unsupported compression or names paths this system cannot create") from None


def _copy_counted(source: IO[bytes], dest: Path, budget: int, archive: Path, name: str) -> int:
    """Copy at most ``budget`` bytes; a member that turns out larger than its header said is refused."""
    written = 0
    with open(dest, "xb") as out:  # "x": never write through anything already at that path
        while chunk := source.read(COPY_CHUNK_BYTES):
            written += len(chunk)
            if written > budget:
                raise DataError(f"archive {archive.name}: member {name!r} holds more data than its header "
                                "declares, or the archive passes data.max_extract_gb; extraction stopped")
            out.write(chunk)
    return written


@contextlib.contextmanager
def _named(archive: Path, name: str) -> Iterator[None]:
    """Name the member when its path collides with another (a file twice, a file where a folder goes)."""
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise DataError(f"archive {archive.name}: member {name!r} collides with another member "
                        f"({type(error).__name__}); the archive is malformed") from None


def _extract_tar(archive: Path, target: Path, limits: ArchiveLimits) -> int:
    with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
        members = tar.getmembers()  # reads the whole index first: a truncated archive fails here
        total = 0
        for info in members:
            _check_member_path(archive, info.name)
            if info.issym() or info.islnk():
                kind = "symbolic" if info.issym() else "hard"
                raise _refuse(archive, f"refusing {kind} link member {info.name!r} -> {info.linkname!r} "
                                       "(image archives need no links)")
            if not (info.isfile() or info.isdir()):
                raise _refuse(archive, f"refusing device or FIFO member {info.name!r}")
            if info.size < 0 or info.issparse():  # a negative size hides bytes from the total; sparse ones expand
                raise _refuse(archive, f"refusing member {info.name!r}: {'sparse' if info.issparse() else 'negative size'}")
            total += info.size
        compressed = archive.stat().st_size
        _check_sizes(archive, total, limits, compressed if _is_compressed_tar(archive) else 0)
        written, budget = 0, limits.max_bytes
        for info in members:
            member = PurePosixPath(info.name.replace("\\", "/"))
            dest = target.joinpath(*member.parts) if member.parts else target
            if info.isdir():
                with _named(archive, info.name):
                    dest.mkdir(parents=True, exist_ok=True)
                continue
            with _named(archive, info.name):
                dest.parent.mkdir(parents=True, exist_ok=True)
            source_file = tar.extractfile(info)
            assert source_file is not None  # a regular file: checked above
            with source_file, _named(archive, info.name):
                budget -= _copy_counted(source_file, dest, min(budget, info.size), archive, info.name)
            written += 1
    return written


def _is_compressed_tar(archive: Path) -> bool:
    with open(archive, "rb") as f:
        head = f.read(6)
    return head.startswith(COMPRESSED_MAGIC)


def _extract_zip(archive: Path, target: Path, limits: ArchiveLimits) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            _check_member_path(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _refuse(archive, f"refusing symbolic link member {info.filename!r} (image archives need no links)")
            if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise _refuse(archive, f"refusing device or FIFO member {info.filename!r}")
            if info.file_size > RATIO_EXEMPT_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise _refuse(archive, f"refusing member {info.filename!r}: {info.compress_size:,} bytes would unpack "
                                       f"to {info.file_size:,} (ratio {info.file_size / max(info.compress_size, 1):.0f}:1, "
                                       f"limit {limits.max_ratio:.0f}:1): a decompression bomb")
            total += info.file_size
        _check_sizes(archive, total, limits, archive.stat().st_size)  # many small members add up too
        written, budget = 0, limits.max_bytes
        for info in infos:
            dest = target.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if info.is_dir():
                with _named(archive, info.filename):
                    dest.mkdir(parents=True, exist_ok=True)
                continue
            with _named(archive, info.filename):
                dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source_file, _named(archive, info.filename):
                budget -= _copy_counted(source_file, dest, min(budget, info.file_size), archive, info.filename)
            written += 1
    return written
