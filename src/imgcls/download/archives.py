"""Safe extraction of .tar, .tar.gz and .zip archives.

Every member is checked before anything is written, and the first bad one is named:
- links of any kind (symbolic or hard) are refused: image data sets never need them, and a link's own
  text says nothing about where it leads once other links are extracted before it (a chain of harmless
  looking links can end anywhere on the machine);
- absolute paths, ``..`` components, device files and FIFOs are refused;
- sparse members, negative sizes and oversized long-name/PAX headers are refused;
- the total uncompressed size is capped (``data.max_extract_gb``), and so is the number of members
  (``ArchiveLimits.max_members``, and members per compressed byte: empty files cost nothing to compress
  but each is a file to create);
- a zip member, a whole zip or a compressed tar (gzip, bzip2 or xz, whatever its name says) whose
  compression ratio is absurd (a "zip bomb") is refused.
A tar is read as a stream, twice: the first pass checks each member as its header arrives and writes
nothing, the second checks again and writes. Both meter the decompressed stream on every read, so a bomb
is stopped a few MiB in, not after decompressing all of it to list its members. Writing then counts
bytes again, so a header that lies about a member's size cannot get past the cap.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import math
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ..errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# Real image archives compress little (JPEG/PNG are already compressed; raw BMP/PPM reach ~10:1). Ratios
# beyond this are how zip bombs work. Small members are exempt: a few KiB of zeros compress 1000:1 harmlessly.
MAX_COMPRESSION_RATIO = 200
RATIO_EXEMPT_BYTES = 1 << 20
COPY_CHUNK_BYTES = 1 << 20
# Each member is a file to create (an inode and a few system calls): 200,000 empty ones fit in a 940 KB
# tar.gz. A million is 16 times CIFAR-10 (60,000 images); at the default data.max_extract_gb (50 GiB) it is
# 50 KiB an image, so for photo data sets the byte cap binds first. Bigger sets: extract them by hand and
# give the folder.
MAX_MEMBERS = 1_000_000
# A tar.gz of real images costs 90+ compressed bytes a member (28x28 MNIST-like PNGs: ~95, photos: tens of
# KiB); one of empty files costs ~5, of identical tiny files ~8. Below this, past the first
# MEMBER_DENSITY_EXEMPT members (that many files take seconds to create, not minutes), the archive is refused.
MIN_COMPRESSED_BYTES_PER_MEMBER = 32
MEMBER_DENSITY_EXEMPT = 10_000

# A GNU long name or a PAX header is read whole into memory by tarfile: a 400 MB one costs 2 GB before any
# member is seen. Real ones are a few hundred bytes.
MAX_TAR_HEADER_BYTES = 1 << 16
# What a tar stream holds besides its members' data (each padded to 512-byte blocks): per member a 512-byte
# header and maybe a PAX or GNU long-name record with its own header (a 4,096-byte PATH_MAX name fits);
# once, the end-of-archive blocks, the 10 KiB record tarfile reads ahead and room for a few extended
# headers of up to MAX_TAR_HEADER_BYTES. A stream that runs past this is padding itself out on purpose
# (a chain of sparse-map blocks, say) before any member can be checked.
TAR_OVERHEAD_PER_MEMBER = 8 << 10
TAR_OVERHEAD_FIXED = 4 * MAX_TAR_HEADER_BYTES


class _Refused(Exception):
    """A hostile or malformed archive; ``extract_archive`` adds the archive's name and what was written."""


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
        raise _Refused(
            f"a tar header (long name or PAX record) of {info.size:,} bytes, over {MAX_TAR_HEADER_BYTES:,}; "
            "the archive is malformed or hostile"
        )


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # total uncompressed bytes the archive may write
    max_ratio: float = MAX_COMPRESSION_RATIO
    max_members: int = MAX_MEMBERS  # files and folders it may create (see MAX_MEMBERS for why a million)


def _refuse(archive: Path, message: str) -> DataError:
    return DataError(f"archive {archive.name}: {message}; nothing was extracted")


# Folders nest a few levels in image data sets (<split>/<class>/<images>); thousands of levels break
# os.walk and shutil.rmtree (both recursive in Python 3.11), so cleaning up after a failure would fail too.
MAX_MEMBER_DEPTH = 64


def _check_member_path(name: str) -> PurePosixPath:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _Refused(f"refusing member {name!r} with an absolute path")
    if ".." in member.parts:
        raise _Refused(f"refusing member {name!r}: '..' would escape the target")
    if len(member.parts) > MAX_MEMBER_DEPTH:  # shown cut short: such a name can be thousands of characters
        raise _Refused(
            f"refusing member {name[:80]!r}...: nested {len(member.parts)} levels deep, over "
            f"{MAX_MEMBER_DEPTH} (image archives are a few levels deep; walking and removing such trees "
            "overflows Python's recursion)"
        )
    return member


def _check_member_count(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_members:
        raise _Refused(
            f"it holds more than {limits.max_members:,} members; split it into smaller archives, or "
            "extract it yourself and give the folder instead"
        )


def _check_total(total: int, limits: ArchiveLimits) -> None:
    if total > limits.max_bytes:
        raise _Refused(
            f"it would unpack to {total / 2**30:.2f} GiB, over the limit of "
            f"{limits.max_bytes / 2**30:.2f} GiB (data.max_extract_gb); raise the limit if the "
            "data set really is that large"
        )


def _check_sizes(total: int, limits: ArchiveLimits, compressed: int) -> None:
    _check_total(total, limits)
    if total > RATIO_EXEMPT_BYTES and compressed and total / compressed > limits.max_ratio:
        raise _Refused(
            f"it would unpack {compressed:,} bytes into {total:,} "
            f"(ratio {total / compressed:.0f}:1, limit {limits.max_ratio:.0f}:1): a decompression bomb"
        )


def extract_archive(
    archive: Path, target: Path, limits: ArchiveLimits, *, progress: Callable[[int], None] | None = None
) -> int:
    """Extract ``archive`` into the existing folder ``target``; returns the number of files written.
    ``progress`` is called with the bytes of each chunk written (a progress bar)."""
    linked = [p for p in target.rglob("*") if p.is_symlink()]
    if linked:  # writing through a link already in the target would land wherever it points
        raise DataError(f"cannot extract {archive.name} into {target}: it holds a link ({linked[0]})")
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, target, limits, progress)
        return _extract_tar(archive, target, limits, progress)
    except _Refused as refused:
        raise _refuse(archive, str(refused)) from None
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DataError(
            f"archive {archive.name} is truncated or corrupt ({type(error).__name__}: {error}); "
            "delete it and download it again, or point data.source at a good copy"
        ) from None
    except (OSError, ValueError, RuntimeError, NotImplementedError, UnicodeDecodeError, IndexError) as error:
        # Names this system cannot create (too long, NUL bytes), encrypted or unsupported compression, ...
        raise DataError(
            f"archive {archive.name} cannot be extracted ({type(error).__name__}: {error}); it is damaged, "
            "encrypted, uses an unsupported compression or names paths this system cannot create"
        ) from None


def _copy_counted(
    source: IO[bytes], dest: Path, budget: int, archive: Path, name: str, progress: Callable[[int], None] | None
) -> int:
    """Copy at most ``budget`` bytes; a member that turns out larger than its header said is refused."""
    written = 0
    with open(dest, "xb") as out:  # "x": never write through anything already at that path
        while chunk := source.read(COPY_CHUNK_BYTES):
            written += len(chunk)
            if written > budget:
                raise DataError(
                    f"archive {archive.name}: member {name!r} holds more data than its header "
                    "declares, or the archive passes data.max_extract_gb; extraction stopped"
                )
            out.write(chunk)
            if progress:
                progress(len(chunk))
    return written


@contextlib.contextmanager
def _named(archive: Path, name: str) -> Iterator[None]:
    """Name the member when its path collides with another (a file twice, a file where a folder goes)."""
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise DataError(
            f"archive {archive.name}: member {name!r} collides with another member "
            f"({type(error).__name__}); the archive is malformed"
        ) from None


class _CountingReader:
    """The archive file as the decompressor reads it: counts the compressed bytes consumed so far."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self.bytes_read += len(chunk)
        return chunk


class _MeteredTarStream:
    """The decompressed tar stream, checked on every read tarfile makes (10 KiB records): refused as soon as
    it unpacks at an absurd ratio, or runs past what the members accepted so far account for
    (``bytes_allowed``, raised by the caller member by member)."""

    def __init__(self, source: IO[bytes], archive_bytes: _CountingReader, compressed: bool, max_ratio: float) -> None:
        self._source = source
        self._archive_bytes = archive_bytes
        self._compressed = compressed
        self._max_ratio = max_ratio
        self.bytes_read = 0
        self.bytes_allowed = TAR_OVERHEAD_FIXED

    def read(self, size: int = -1) -> bytes:
        # Never "all of it": that is the read a bomb wants. Short reads are allowed; tarfile asks again.
        size = COPY_CHUNK_BYTES if size is None or size < 0 else min(size, COPY_CHUNK_BYTES)
        chunk = self._source.read(size)
        self.bytes_read += len(chunk)
        if self.bytes_read > self.bytes_allowed:
            raise _Refused(
                f"its tar stream runs past {self.bytes_allowed:,} bytes, more than its members' data and "
                "headers account for; the archive is malformed or hostile"
            )
        compressed = self._archive_bytes.bytes_read
        if self._compressed and self.bytes_read > RATIO_EXEMPT_BYTES and self.bytes_read > self._max_ratio * compressed:
            ratio = math.ceil(self.bytes_read / max(compressed, 1))  # up: 200.1 is over a limit of 200
            raise _Refused(
                f"its first {compressed:,} compressed bytes unpack to {self.bytes_read:,} and counting "
                f"(ratio {ratio}:1, limit {self._max_ratio:.0f}:1): a decompression bomb"
            )
        return chunk


def _decompressor(head: bytes) -> Callable[[IO[bytes]], IO[bytes]] | None:
    """How to decompress a file that starts with ``head`` (10 bytes), told by content, not name: a bzip2
    stream named .tar is still a bzip2 stream. None for a plain tar."""
    if head.startswith(b"\x1f\x8b"):
        return lambda file: gzip.GzipFile(fileobj=file, mode="rb")
    # "BZh" could begin a plain tar's first member name; the level digit and a block or end marker cannot.
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return bz2.BZ2File
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile
    return None


def _blocks(size: int) -> int:
    """Bytes a member's data takes in a tar stream: padded to whole 512-byte blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _check_tar_member(info: tarfile.TarInfo) -> PurePosixPath:
    member = _check_member_path(info.name)
    if info.issym() or info.islnk():
        kind = "symbolic" if info.issym() else "hard"
        raise _Refused(f"refusing {kind} link member {info.name!r} -> {info.linkname!r} (image archives need no links)")
    if not (info.isfile() or info.isdir()):
        raise _Refused(f"refusing device or FIFO member {info.name!r}")
    if info.size < 0 or info.issparse():  # a negative size hides bytes from the total; sparse ones expand
        raise _Refused(f"refusing member {info.name!r}: {'sparse' if info.issparse() else 'negative size'}")
    return member


def _extract_tar(archive: Path, target: Path, limits: ArchiveLimits, progress: Callable[[int], None] | None) -> int:
    _read_tar(archive, limits, target=None)  # pass 1: every check, nothing written
    try:
        return _read_tar(archive, limits, target, progress)
    except _Refused as refused:  # pass 1 accepted it: the file changed in between
        raise DataError(
            f"archive {archive.name}: {refused}; the file changed while it was being extracted, and "
            f"{target} holds part of it"
        ) from None


def _read_tar(
    archive: Path, limits: ArchiveLimits, target: Path | None, progress: Callable[[int], None] | None = None
) -> int:
    """Stream the tar once, checking each member as its header arrives and stopping at the first bad one;
    write its files under ``target`` if given. Returns the number of files written."""
    with open(archive, "rb") as file, contextlib.ExitStack() as stack:
        decompressor = _decompressor(file.read(10))
        file.seek(0)
        archive_bytes = _CountingReader(file)
        source = stack.enter_context(decompressor(archive_bytes)) if decompressor else archive_bytes
        stream = _MeteredTarStream(source, archive_bytes, decompressor is not None, limits.max_ratio)
        # "r|": read strictly in order, as a pipe; random access ("r:") would need the whole member list first.
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo))
        members = written = total = 0
        budget = limits.max_bytes
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it has read; we need only the current one
            members += 1
            _check_member_count(members, limits)
            if members > MEMBER_DENSITY_EXEMPT and archive_bytes.bytes_read < members * MIN_COMPRESSED_BYTES_PER_MEMBER:
                raise _Refused(
                    f"{members:,} members in its first {archive_bytes.bytes_read:,} bytes (under "
                    f"{MIN_COMPRESSED_BYTES_PER_MEMBER} bytes each): empty or identical files, not images; "
                    "if it is genuine, extract it yourself and give the folder instead"
                )
            member = _check_tar_member(info)
            if info.isfile():
                total += info.size
                _check_total(total, limits)
                stream.bytes_allowed += _blocks(info.size)
            stream.bytes_allowed += TAR_OVERHEAD_PER_MEMBER  # room for the next member's headers
            if target is None:
                continue
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
                budget -= _copy_counted(source_file, dest, min(budget, info.size), archive, info.name, progress)
            written += 1
    return written


def _extract_zip(archive: Path, target: Path, limits: ArchiveLimits, progress: Callable[[int], None] | None) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()  # the central directory: read without decompressing anything
        _check_member_count(len(infos), limits)
        total = 0
        for info in infos:
            _check_member_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _Refused(f"refusing symbolic link member {info.filename!r} (image archives need no links)")
            if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise _Refused(f"refusing device or FIFO member {info.filename!r}")
            if info.file_size > RATIO_EXEMPT_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise _Refused(
                    f"refusing member {info.filename!r}: {info.compress_size:,} bytes would unpack "
                    f"to {info.file_size:,} (ratio {info.file_size / max(info.compress_size, 1):.0f}:1, "
                    f"limit {limits.max_ratio:.0f}:1): a decompression bomb"
                )
            total += info.file_size
        _check_sizes(total, limits, archive.stat().st_size)  # many small members add up too
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
                budget -= _copy_counted(
                    source_file, dest, min(budget, info.file_size), archive, info.filename, progress
                )
            written += 1
    return written
