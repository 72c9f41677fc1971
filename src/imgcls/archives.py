"""Safe extraction of .tar, .tar.gz and .zip archives.

Members with absolute paths, ``..`` components, links that point outside the target, device files and
FIFOs are refused before anything is written, naming the member.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .fetch import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_path(archive: Path, name: str) -> PurePosixPath:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"archive {archive.name}: refusing member {name!r} with an absolute path")
    if ".." in member.parts:
        raise DataError(f"archive {archive.name}: refusing member {name!r}: '..' would escape the target")
    return member


def _check_link_target(archive: Path, member: PurePosixPath, link: str) -> None:
    target = PurePosixPath(link)
    if target.is_absolute():
        raise DataError(f"archive {archive.name}: refusing link {str(member)!r} -> {link!r} (absolute target)")
    depth = len(member.parent.parts)
    for part in target.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise DataError(
                f"archive {archive.name}: refusing link {str(member)!r} -> {link!r}: it points outside the target"
            )


def extract_archive(archive: Path, target: Path) -> int:
    """Extract ``archive`` into the existing folder ``target``; returns the number of files written."""
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, target)
        return _extract_tar(archive, target)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(
            f"archive {archive.name} is truncated or corrupt ({type(error).__name__}: {error}); "
            "delete it and download it again, or point data.source at a good copy"
        ) from None


def _extract_tar(archive: Path, target: Path) -> int:
    written = 0
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()  # reads the whole index first: a truncated archive fails here
        for info in members:
            member = _check_member_path(archive, info.name)
            if info.ischr() or info.isblk() or info.isfifo() or info.isdev():
                raise DataError(f"archive {archive.name}: refusing device or FIFO member {info.name!r}")
            if info.issym() or info.islnk():
                if info.islnk():
                    # Hard links name another member by its path from the archive root.
                    _check_member_path(archive, info.linkname)
                else:
                    _check_link_target(archive, member, info.linkname)
        for info in members:
            member = PurePosixPath(info.name.replace("\\", "/"))
            dest = target.joinpath(*member.parts) if member.parts else target
            if info.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if info.issym():
                os.symlink(info.linkname, dest)
            elif info.islnk():
                source = target.joinpath(*PurePosixPath(info.linkname).parts)
                shutil.copyfile(source, dest)
                written += 1
            elif info.isfile():
                source_file = tar.extractfile(info)
                assert source_file is not None
                with source_file, open(dest, "wb") as out:
                    shutil.copyfileobj(source_file, out)
                written += 1
    return written


def _extract_zip(archive: Path, target: Path) -> int:
    written = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            member = _check_member_path(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                _check_link_target(archive, member, zf.read(info).decode())
            elif mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
                raise DataError(f"archive {archive.name}: refusing device or FIFO member {info.filename!r}")
        for info in infos:
            member = _check_member_path(archive, info.filename)
            dest = target.joinpath(*member.parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(info.external_attr >> 16):
                os.symlink(zf.read(info).decode(), dest)
                continue
            with zf.open(info) as source_file, open(dest, "wb") as out:
                shutil.copyfileobj(source_file, out)
            written += 1
    return written
