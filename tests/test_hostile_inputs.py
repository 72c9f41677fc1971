"""What a stranger can hand the project, built here as an attacker would: link chains in tar and zip,
hard links through links, decompression bombs, folders whose links lead out, loop or dangle."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import make_image_folder

from imgcls.download.archives import ArchiveLimits, extract_archive
from imgcls.download.sources import FetchOptions, record_folder
from imgcls.errors import DataError
from imgcls.manifest import MANIFEST_NAME, read_manifest

LIMITS = ArchiveLimits(max_bytes=1 << 30)


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def tar_member(tar: tarfile.TarFile, name: str, *, link: str | None = None, hard: bool = False, data: bytes = b"x"):
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), link
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: external_attr carries the file type
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


@pytest.fixture
def sandbox(tmp_path):
    """target/ to extract into, deep inside tmp_path, and a 'host' folder beside it with a secret file."""
    target = tmp_path / "a" / "b" / "target"
    target.mkdir(parents=True)
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_text("host secret")
    return tmp_path, target


def test_tar_symlink_chain_is_refused_before_anything_is_written(sandbox):
    # Each link's text looks harmless on its own: 'up -> .', 'up/up2 -> ..' (one level below the root,
    # one up), 'up/up2/up3 -> ..' ... Extracted in order, they chain out of the target, and a member
    # written through them lands wherever the attacker wants.
    tmp_path, target = sandbox
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w") as tar:
        tar_member(tar, "train/a/ok.png", data=b"fine")
        tar_member(tar, "up", link=".")
        tar_member(tar, "up/up2", link="..")
        tar_member(tar, "up/up2/up3", link="..")
        tar_member(tar, "up/up2/up3/host/planted.txt", data=b"pwned")
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as caught:
        extract_archive(archive, target, LIMITS)
    assert "refusing symbolic link member 'up' -> '.'" in str(caught.value)
    assert snapshot(tmp_path) == before  # not even the harmless first member
    assert not (tmp_path / "host" / "planted.txt").exists()


def test_tar_hard_link_through_a_link_chain_copies_nothing(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "steal.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar_member(tar, "train/a/ok.png", data=b"fine")
        tar_member(tar, "l1", link=".")
        tar_member(tar, "l1/l2", link="..")
        tar_member(tar, "l1/l2/l3", link="..")
        tar_member(tar, "train/a/stolen.png", link="l1/l2/l3/host/secret.txt", hard=True)
    with pytest.raises(DataError, match="refusing symbolic link member 'l1'"):
        extract_archive(archive, target, LIMITS)
    assert list(target.iterdir()) == []
    # A hard link alone, its path harmless: refused too, by name.
    lone = tmp_path / "lone.tar"
    with tarfile.open(lone, "w") as tar:
        tar_member(tar, "train/a/ok.png", data=b"fine")
        tar_member(tar, "train/a/copy.png", link="train/a/ok.png", hard=True)
    with pytest.raises(DataError, match="refusing hard link member 'train/a/copy.png' -> 'train/a/ok.png'"):
        extract_archive(lone, target, LIMITS)
    assert list(target.iterdir()) == []


def test_zip_symlink_chain_is_refused(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "chain.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/ok.png", b"fine")
        zip_symlink(zf, "up", ".")
        zip_symlink(zf, "up/up2", "..")
        zf.writestr("up/up2/host/planted.txt", b"pwned")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="refusing symbolic link member 'up'"):
        extract_archive(archive, target, LIMITS)
    assert snapshot(tmp_path) == before


def test_zip_bomb_is_refused_by_its_compression_ratio(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/a/ok.png", b"fine")
        zf.writestr("train/a/huge.bmp", bytes(64 << 20))  # 64 MiB of zeros -> ~64 KiB compressed
    assert archive.stat().st_size < 200_000
    with pytest.raises(DataError) as caught:
        extract_archive(archive, target, LIMITS)
    message = str(caught.value)
    assert "refusing member 'train/a/huge.bmp'" in message and "decompression bomb" in message
    assert list(target.iterdir()) == []


def test_tar_gz_bomb_is_refused_by_its_overall_ratio(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar_member(tar, "train/a/huge.bmp", data=bytes(32 << 20))
    with pytest.raises(DataError, match=r"ratio \d+:1, limit 200:1\): a decompression bomb"):
        extract_archive(archive, target, LIMITS)
    assert list(target.iterdir()) == []


def test_total_size_limit_names_the_param(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(3):
            tar_member(tar, f"train/a/{i}.png", data=os.urandom(4000))
    with pytest.raises(DataError, match=r"over the limit .* \(data.max_extract_gb\)"):
        extract_archive(archive, target, ArchiveLimits(max_bytes=10_000))
    assert list(target.iterdir()) == []
    assert extract_archive(archive, target, ArchiveLimits(max_bytes=12_000)) == 3


def test_duplicate_member_is_a_named_error_not_a_traceback(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "dup.tar"
    with tarfile.open(archive, "w") as tar:
        tar_member(tar, "train/a/x.png", data=b"one")
        tar_member(tar, "train/a/x.png", data=b"two")
    with pytest.raises(DataError, match="member 'train/a/x.png' collides with another member"):
        extract_archive(archive, target, LIMITS)


# ---------------------------------------------------------------------------------------------- folders


def record(source: Path, raw_dir: Path, on_bad_link: str = "error") -> tuple[dict[str, str], list[str]]:
    """The download stage on a local folder (read in place): its manifest as {path: sha256}, and its log."""
    messages: list[str] = []
    raw_dir.mkdir(parents=True)
    options = FetchOptions(retries=1, timeout_s=1, limits=LIMITS, on_bad_image=on_bad_link)
    record_folder(source, raw_dir, options, log=messages.append)
    images = read_manifest(raw_dir / MANIFEST_NAME).images
    return {image.path: image.sha256 for image in images}, messages


@pytest.mark.parametrize(
    "make_link, reason",
    [
        (
            lambda folder, outside: os.symlink(outside / "secret.txt", folder / "shadow.png"),
            "outside the source folder",
        ),
        (
            lambda folder, outside: os.symlink(folder / "gone.png", folder / "dangling.png"),
            "a dangling link or a link loop",
        ),
        (
            lambda folder, outside: os.symlink(folder / "loop.png", folder / "loop.png"),
            "a dangling link or a link loop",
        ),
        (lambda folder, outside: os.symlink(outside, folder / "linked_dir"), "links to folders are not followed"),
        (lambda folder, outside: os.mkfifo(folder / "pipe.png"), "not a regular file"),
    ],
)
def test_folder_source_never_follows_links_out(tmp_path, make_link, reason):
    root = make_image_folder(tmp_path / "src")
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret")
    make_link(root / "train" / "ants", outside)
    with pytest.raises(DataError) as caught:
        record(root, tmp_path / "raw")
    assert reason in str(caught.value) and "data.on_bad_image: skip" in str(caught.value)
    listed, messages = record(root, tmp_path / "raw2", on_bad_link="skip")
    assert len(listed) == 24  # the 24 real images, nothing else
    assert any("skipped 1 file(s)" in m and reason in m for m in messages)
    assert not [path for path in listed if (root / path).is_symlink() or not (root / path).is_file()]
    secret = hashlib.sha256(b"host secret").hexdigest()
    assert secret not in listed.values()  # nothing outside the folder is ever read


def test_folder_link_to_a_file_inside_is_read_as_the_file(tmp_path):
    root = make_image_folder(tmp_path / "src")
    os.symlink(root / "train" / "ants" / "0.jpg", root / "train" / "ants" / "alias.jpg")
    listed, _ = record(root, tmp_path / "raw")
    assert len(listed) == 25
    assert (
        listed["train/ants/alias.jpg"] == hashlib.sha256((root / "train" / "ants" / "0.jpg").read_bytes()).hexdigest()
    )


def test_a_huge_long_name_header_is_refused_before_it_is_read(sandbox):
    tmp_path, target = sandbox
    archive = tmp_path / "longname.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        tar_member(tar, "train/a/" + "n" * (2 << 20) + ".png")  # a 2 MiB name: tarfile would read it whole
    with pytest.raises(DataError, match=r"a tar header \(long name or PAX record\) of 2,097,1\d\d bytes"):
        extract_archive(archive, target, LIMITS)
    assert list(target.iterdir()) == []


def test_bzip2_tar_and_many_small_zip_members_are_held_to_the_ratio_limit(sandbox):
    tmp_path, target = sandbox
    bz = tmp_path / "bomb.tar"  # bzip2 inside a plain .tar name
    with tarfile.open(bz, "w:bz2") as tar:
        tar_member(tar, "train/a/huge.bmp", data=bytes(16 << 20))
    with pytest.raises(DataError, match="a decompression bomb"):
        extract_archive(bz, target, LIMITS)
    many = tmp_path / "many.zip"  # each member under the per-member exemption, the whole far over the ratio
    with zipfile.ZipFile(many, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f"train/a/{i}.bmp", bytes(1 << 20))
    with pytest.raises(DataError, match="a decompression bomb"):
        extract_archive(many, target, LIMITS)
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("name", ["train/a/" + "x" * 300 + ".png", "train/" + "/".join(["d" * 200] * 30) + "/x.png"])
def test_names_this_system_cannot_create_are_a_data_error(sandbox, name):
    tmp_path, target = sandbox
    archive = tmp_path / "names.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar_member(tar, name)
    with pytest.raises(DataError, match="cannot be extracted"):
        extract_archive(archive, target, LIMITS)


def test_an_existing_link_in_the_target_stops_extraction(sandbox):
    tmp_path, target = sandbox
    (target / "train").symlink_to(tmp_path / "host")
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        tar_member(tar, "train/x.png", data=b"png")
    with pytest.raises(DataError, match="it holds a link"):
        extract_archive(archive, target, LIMITS)
    assert not (tmp_path / "host" / "x.png").exists()


def test_a_source_folder_holding_the_destination_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "project")
    with pytest.raises(DataError, match="contains the project's data folder"):
        record(root, root / "data" / ".raw.tmp")


def test_unreadable_files_and_folders_are_named_not_skipped_silently(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file: permissions cannot make one unreadable here")
    root = make_image_folder(tmp_path / "src")
    (root / "train" / "ants" / "0.jpg").chmod(0)
    (root / "test" / "bees").chmod(0)
    try:
        with pytest.raises(DataError) as caught:
            record(root, tmp_path / "raw")
        assert "0.jpg: cannot be read" in str(caught.value) and "bees: cannot be read" in str(caught.value)
    finally:
        (root / "train" / "ants" / "0.jpg").chmod(0o644)
        (root / "test" / "bees").chmod(0o755)
