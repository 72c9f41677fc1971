"""Archives that cost time or files rather than bytes: decompression bombs in any of the three compressions
(whatever the name says), floods of empty members, tar streams padded out with header blocks. Each is built
here as an attacker would, and must be refused in well under a second with nothing written; real archives
of the same formats must still extract byte for byte."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import re
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from imgcls.download.archives import ArchiveLimits, extract_archive
from imgcls.errors import DataError

COMPRESSORS = {"gz": lambda data: gzip.compress(data, 9), "bz2": bz2.compress, "xz": lzma.compress}
NOTHING_IS_FAST = 2.0  # seconds; every refusal here measures in milliseconds, this is room for a slow CI machine


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def header(name: str, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)  # GNU: sizes over 8 GiB in base-256


def with_checksum(block: bytearray) -> bytes:
    """A header block after hand edits: tarfile checks the sum of its bytes, the checksum field as spaces."""
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def bomb(compression: str, unpacked_bytes: int) -> bytes:
    """A tar stream of one member declaring ``unpacked_bytes`` of zeros, compressed. Compressing that many
    zeros would take minutes, so one chunk is compressed and the streams concatenated: gzip, bzip2 and xz
    readers all continue into the next stream, as an attacker's file would make them."""
    chunk = 8 << 20
    compress = COMPRESSORS[compression]
    zeros = compress(bytes(chunk))
    return compress(header("train/a/huge.bmp", unpacked_bytes)) + zeros * (unpacked_bytes // chunk)


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "target"
    path.mkdir()
    return path


def refused(archive: Path, target: Path, limits: ArchiveLimits) -> tuple[str, float]:
    """Extract, expecting a refusal; returns its message and how long it took. Nothing may be written."""
    start = time.perf_counter()
    with pytest.raises(DataError) as caught:
        extract_archive(archive, target, limits)
    elapsed = time.perf_counter() - start
    assert list(target.iterdir()) == []
    message = str(caught.value)
    assert message.startswith(f"archive {archive.name}: ") and message.endswith("nothing was extracted")
    assert "\n" not in message
    return message, elapsed


@pytest.mark.parametrize("compression, unpacked_gib", [("bz2", 100), ("gz", 4), ("xz", 4)])
def test_a_bomb_is_refused_a_few_mib_into_the_stream(tmp_path, target, compression, unpacked_gib):
    # Named .tar whatever it holds: compression is read from the content. The byte cap is set far above
    # the bomb on purpose, so only the ratio checked while reading can stop it; before, the whole member
    # list was read first, which decompressed all of it (about an hour for 870 KB of bzip2).
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(bomb(compression, unpacked_gib << 30))
    if compression == "bz2":
        assert archive.stat().st_size < 1_000_000  # 100 GiB in under 1 MB
    message, elapsed = refused(archive, target, ArchiveLimits(max_bytes=2 << 40))
    assert "limit 200:1): a decompression bomb" in message
    unpacked = int(re.search(r"unpack to ([\d,]+) and counting", message).group(1).replace(",", ""))
    assert unpacked < 4 << 20  # stopped within a few MiB of the 1 MiB exemption, not at the end
    assert elapsed < NOTHING_IS_FAST


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_bomb_over_the_byte_cap_is_refused_at_its_header(tmp_path, target, compression):
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(bomb(compression, 1 << 30))
    message, elapsed = refused(archive, target, ArchiveLimits(max_bytes=1 << 20))
    assert "over the limit of 0.00 GiB (data.max_extract_gb)" in message
    assert elapsed < NOTHING_IS_FAST


def empty_members_tar_gz(count: int) -> bytes:
    """A tar.gz of ``count`` empty files with distinct names, built from one header template (tarfile
    takes ~5 s for 200,000)."""
    template = bytearray(header("x"))
    blocks = []
    for i in range(count):
        block = bytearray(template)
        name = f"train/a/{i:06d}.png".encode()
        block[: len(name)] = name
        blocks.append(with_checksum(block))
    return gzip.compress(b"".join(blocks) + bytes(1024), 6)


def test_member_cap_refuses_before_writing_and_admits_exactly_the_cap(tmp_path, target):
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(empty_members_tar_gz(1000))
    message, _ = refused(archive, target, ArchiveLimits(max_bytes=1 << 30, max_members=999))
    assert "it holds more than 999 members" in message
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30, max_members=1000)) == 1000
    assert len(list((target / "train" / "a").iterdir())) == 1000


def test_default_limits_refuse_200_000_empty_members_quickly(tmp_path, target):
    # The review's archive: ~1 MB of tar.gz, 200,000 files to create. Under the member cap, but at ~5
    # compressed bytes a member it is no image data set; refused once past the first 10,000 members.
    archive = tmp_path / "empties.tar.gz"
    archive.write_bytes(empty_members_tar_gz(200_000))
    assert archive.stat().st_size < 1_500_000
    message, elapsed = refused(archive, target, ArchiveLimits(max_bytes=50 << 30))
    assert "10,001 members in its first" in message and "empty or identical files" in message
    assert elapsed < NOTHING_IS_FAST


def test_many_small_real_files_pass_the_member_density_rule(tmp_path, target):
    # 10,200 files of 48 random bytes: past the density exemption (10,000 members), and about as dense as
    # real images get (a tiny PNG is 67 bytes). A threshold set too high would refuse this.
    rng = random.Random(0)
    files = {f"train/{i % 10}/{i}.png": rng.randbytes(48) for i in range(10_200)}
    archive = tmp_path / "small.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert archive.stat().st_size / len(files) < 100  # dense: within 3x of the threshold
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30)) == len(files)
    assert tree(target) == files


def test_a_stream_padded_with_header_blocks_is_refused_before_its_member_is_returned(tmp_path, target):
    # An old-GNU sparse header may be followed by any number of 512-byte sparse-map blocks, all read before
    # tarfile returns the member (and so before any per-member check can run). No compression needed: the
    # stream is held to what its accepted members account for. Without that, this is refused as 'sparse'
    # only after reading all 4 MiB; compressed, after however many GiB the attacker chose.
    first = bytearray(header("train/a/sparse.png"))
    first[156:157], first[482] = tarfile.GNUTYPE_SPARSE, 1
    extension = bytearray(512)
    extension[504] = 1  # "another sparse-map block follows"
    archive = tmp_path / "padded.tar"
    archive.write_bytes(with_checksum(first) + bytes(extension) * 8192 + bytes(2048))
    message, elapsed = refused(archive, target, ArchiveLimits(max_bytes=1 << 30))
    assert "its tar stream runs past 262,144 bytes, more than its members' data and headers account for" in message
    assert elapsed < NOTHING_IS_FAST


def test_zip_member_cap_is_checked_on_the_central_directory(tmp_path, target):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(150):
            zf.writestr(f"train/a/{i}.png", b"")
    message, _ = refused(archive, target, ArchiveLimits(max_bytes=1 << 30, max_members=149))
    assert "it holds more than 149 members" in message
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30, max_members=150)) == 150


def real_files() -> dict[str, bytes]:
    """What a real image archive holds: small incompressible files, one over the 1 MiB ratio exemption that
    compresses about as well as raw BMP (~10:1, legitimate), and one that spans several copy chunks."""
    rng = random.Random(1)
    noisy_bmp = bytearray(3 << 19)  # 1.5 MiB: one byte in eight a 4-bit value, the rest zeros
    noisy_bmp[::8] = bytes(b & 15 for b in rng.randbytes(len(noisy_bmp) // 8))
    return {
        "train/ants/0.png": rng.randbytes(2000),
        "train/ants/1.png": rng.randbytes(70),
        "train/bees/0.bmp": bytes(noisy_bmp),
        "test/bees/big.jpg": rng.randbytes(3 << 19),
        "test/ants/empty.txt": b"",
    }


@pytest.mark.parametrize(
    "name, mode", [("set.tar", "w"), ("set.tar.gz", "w:gz"), ("set.tgz", "w:bz2"), ("set.tar", "w:xz")]
)
def test_real_tar_archives_extract_byte_for_byte(tmp_path, target, name, mode):
    files = real_files()
    archive = tmp_path / name
    with tarfile.open(archive, mode) as tar:
        for folder in ("train", "train/ants", "train/bees"):  # folder members too, as `tar -c` writes
            tar.addfile(folder_member(folder))
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30)) == len(files)
    assert tree(target) == files


def folder_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def test_a_plain_tar_whose_first_name_starts_like_bzip2_is_still_a_plain_tar(tmp_path, target):
    archive = tmp_path / "plain.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("BZh9_scans/0.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    assert archive.read_bytes().startswith(b"BZh9")
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30)) == 1
    assert tree(target) == {"BZh9_scans/0.png": b"png"}


def test_real_zip_extracts_byte_for_byte(tmp_path, target):
    files = real_files()
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/", b"")
        for member, data in files.items():
            zf.writestr(member, data)
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30)) == len(files)
    assert tree(target) == files
