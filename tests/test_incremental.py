"""A local image folder is read in place (data/raw holds its manifest, no image bytes), and preprocess reuses
decoded images by content hash: through the real download and preprocess stage functions on tmp_path projects."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, real_params
from PIL import Image

from imgcls.download.stage import download
from imgcls.errors import DataError
from imgcls.paths import ProjectPaths
from imgcls.preprocess import imagefolder
from imgcls.preprocess.stage import preprocess

SUMMARY = re.compile(r"preprocess: ([\d,]+) images: ([\d,]+) decoded, ([\d,]+) reused from the decode cache")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project whose images sit in data/images (as `dvc add data/images` leaves them), run from its root."""
    root = tmp_path / "project"
    make_image_folder(root / "data" / "images", classes=("ants", "bees", "wasps"), per_class=8, noise=20)
    monkeypatch.chdir(root)  # stages run from the project root; data.source is relative to it
    monkeypatch.setattr(imagefolder, "CHUNK_FILES", 5)  # several chunks (packs) per split, as with real data
    return root


def params_for(**data):
    return real_params(data={"dataset": "imagefolder", "source": "data/images", "image_size": 12, **data})


def run_both(project: Path, capsys, **data) -> tuple[int, int, int]:
    """Download and preprocess; returns (images, decoded, reused) from preprocess's summary line."""
    params, paths = params_for(**data), ProjectPaths(project)
    capsys.readouterr()
    download(params, paths)
    preprocess(params, paths)
    match = SUMMARY.search(capsys.readouterr().out)
    assert match, "preprocess logs one summary line with the decoded and reused counts"
    return tuple(int(group.replace(",", "")) for group in match.groups())


def prepared_bytes(project: Path) -> dict[str, bytes]:
    folder = project / "data" / "prepared"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def add_images(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (14 + i, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"new-{seed}-{i}.png")


def test_a_local_folder_is_read_in_place_and_its_manifest_records_every_image(project, capsys):
    images, decoded, reused = run_both(project, capsys)
    assert (images, decoded, reused) == (48, 48, 0)
    raw = project / "data" / "raw"
    assert sorted(p.name for p in raw.rglob("*")) == ["manifest.json", "source.json"]  # no second copy
    manifest = json.loads((raw / "manifest.json").read_text())
    folder = project / "data" / "images"
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert [row[0] for row in manifest["files"]] == on_disk and manifest["folder"] == "data/images"
    for path, size, sha256 in manifest["files"]:
        content = (folder / path).read_bytes()
        assert size == len(content) and sha256 == hashlib.sha256(content).hexdigest()
    source = json.loads((raw / "source.json").read_text())
    assert source["in_place"] == "data/images" and source["manifest"]["images"] == 48
    assert source["manifest"]["sha256"] == hashlib.sha256((raw / "manifest.json").read_bytes()).hexdigest()
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert sum(sum(counts.values()) for counts in meta["counts"].values()) == 48
    assert meta["source"]["manifest"] == source["manifest"]  # the prepared data names the exact image set


def test_the_manifest_changes_with_an_image_and_only_that_entry(project, capsys):
    run_both(project, capsys)
    raw = project / "data" / "raw"
    before = json.loads((raw / "manifest.json").read_text())
    changed = project / "data" / "images" / "train" / "bees" / "3.jpg"
    Image.new("RGB", (20, 20), (250, 250, 0)).save(changed)
    images, decoded, reused = run_both(project, capsys)
    after = json.loads((raw / "manifest.json").read_text())
    differ = [a[0] for a, b in zip(before["files"], after["files"], strict=True) if a != b]
    assert differ == ["train/bees/3.jpg"]
    assert (images, decoded, reused) == (48, 1, 47)  # only the changed image is decoded again


def test_adding_three_images_decodes_three_and_matches_a_full_run_byte_for_byte(project, capsys):
    assert run_both(project, capsys)[1:] == (48, 0)
    add_images(project / "data" / "images" / "train" / "wasps", 2, seed=1)
    add_images(project / "data" / "images" / "test" / "ants", 1, seed=2)
    assert run_both(project, capsys) == (51, 3, 48)
    incremental = prepared_bytes(project)
    assert run_both(project, capsys) == (51, 0, 51)  # nothing new: everything reused
    # The reference: a full preprocess from an empty cache.
    subprocess.run(["rm", "-rf", str(project / "data" / "cache")], check=True)
    assert run_both(project, capsys) == (51, 51, 0)
    assert prepared_bytes(project) == incremental


def test_other_decode_settings_reuse_nothing(project, capsys):
    run_both(project, capsys)
    assert run_both(project, capsys, image_size=10)[1:] == (48, 0)
    assert run_both(project, capsys, channels=1)[1:] == (48, 0)
    assert run_both(project, capsys)[1:] == (0, 48)  # the first setting is still kept


def test_damaged_or_hostile_cache_entries_are_ignored_and_decoded_again(project, capsys, tmp_path):
    run_both(project, capsys)
    reference = prepared_bytes(project)
    (setting,) = (project / "data" / "cache" / "decoded").iterdir()
    packs = sorted(setting.glob("*.pack"), key=lambda p: p.stat().st_size)
    assert len(packs) >= 4
    truncated, flipped, linked, junk = packs[:4]
    rows = {pack: _rows(pack) for pack in packs[:4]}
    truncated.write_bytes(truncated.read_bytes()[:-1])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size, one pixel changed: the check catches it
    flipped.write_bytes(bytes(data))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(linked.read_bytes())  # a valid pack's bytes, but reached through a link
    linked.unlink()
    linked.symlink_to(outside)
    junk.write_bytes(b"IMGCLSP1" + os.urandom(junk.stat().st_size - 8))
    outside_before = outside.read_bytes()
    images, decoded, reused = run_both(project, capsys)
    assert prepared_bytes(project) == reference
    # flipped keeps its table (so its other rows are reused): only its changed last image is decoded again
    assert decoded == rows[truncated] + rows[linked] + rows[junk] + 1 and reused == images - decoded
    assert outside.read_bytes() == outside_before and not linked.is_symlink()  # nothing written through it


def _rows(pack: Path) -> int:
    """Images a pack of this test's setting (3 x 12 x 12 bytes each) holds, from its size."""
    return (pack.stat().st_size - 16) // (32 + 16 + 3 * 12 * 12)


def test_a_killed_run_leaves_only_a_temporary_that_is_never_read(project, capsys):
    run_both(project, capsys)
    reference = prepared_bytes(project)
    (setting,) = (project / "data" / "cache" / "decoded").iterdir()
    pack = next(setting.glob("*.pack"))
    dead_pid = _exited_pid()
    half = setting / f".{pack.name}.{dead_pid}.tmp"
    half.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])  # what kill -9 mid-write leaves
    pack.unlink()
    images, decoded, reused = run_both(project, capsys)
    assert decoded > 0 and prepared_bytes(project) == reference
    assert not half.exists()  # the next run removes a dead writer's temporary
    assert (setting / pack.name).is_file()  # and writes the pack again, whole


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_folder_changed_after_the_download_is_refused_not_decoded(project, capsys, tmp_path):
    params, paths = params_for(), ProjectPaths(project)
    download(params, paths)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(secret)
    target = project / "data" / "images" / "train" / "ants" / "0.jpg"
    target.unlink()
    target.symlink_to(secret)  # swapped for a link out of the folder after the manifest was written
    with pytest.raises(DataError, match=r"changed since the download stage listed it.*0\.jpg.*rerun the download"):
        preprocess(params, paths)
    assert not (project / "data" / "prepared").exists()
    with pytest.raises(DataError, match="a link to .*outside the source folder"):
        download(params, paths)  # and the download stage itself refuses the link (data.on_bad_image: error)
    target.unlink()
    Image.new("RGB", (20, 20), (200, 40, 40)).save(target)
    download(params, paths)
    preprocess(params, paths)


def test_links_and_special_files_in_a_folder_read_in_place_are_refused_or_skipped(project, capsys, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"host secret")
    ants = project / "data" / "images" / "train" / "ants"
    (ants / "shadow.png").symlink_to(tmp_path / "secret.png")
    os.mkfifo(ants / "pipe.png")
    params, paths = params_for(), ProjectPaths(project)
    with pytest.raises(DataError, match=r"2 file\(s\) in data/images cannot be read safely"):
        download(params, paths)
    params = params_for(on_bad_image="skip")
    download(params, paths)
    manifest = (project / "data" / "raw" / "manifest.json").read_text()
    assert "shadow.png" not in manifest and "pipe.png" not in manifest
    preprocess(params, paths)
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert sum(sum(counts.values()) for counts in meta["counts"].values()) == 48
