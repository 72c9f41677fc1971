"""Data acquisition and decoding: real HTTP on 127.0.0.1, archives and image folders the tests build."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    REPO_ROOT,
    add_bytes,
    cifar_records,
    make_cifar_archive,
    make_fashion_like,
    make_image_folder,
    make_tar,
    unused_local_url,
)
from PIL import Image

from imgcls import datasets
from imgcls.download import sources
from imgcls.download.archives import ArchiveLimits, extract_archive
from imgcls.download.fetch import digest_file
from imgcls.errors import DataError
from imgcls.preprocess.decode import decode
from imgcls.preprocess.formats import parse_idx
from imgcls.preprocess.imagefolder import decode_image_folder
from imgcls.preprocess.splits import make_splits

LIMITS = ArchiveLimits(max_bytes=1 << 30)


@pytest.fixture
def fashion_files(tmp_path, monkeypatch):
    """Tiny Fashion-MNIST-format files, with the checksum table pointed at them."""
    folder = tmp_path / "fashion"
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", make_fashion_like(folder))
    return folder


def acquire(dataset, source, raw, retries=3, on_bad_image="error", max_bytes=1 << 30):
    raw.mkdir(exist_ok=True)
    messages = []
    options = sources.FetchOptions(
        retries=retries, timeout_s=5, on_bad_image=on_bad_image, limits=ArchiveLimits(max_bytes=max_bytes)
    )
    result = sources.acquire(dataset, str(source), raw, options, log=messages.append)
    return result, messages


def serve_folder(server, folder: Path, prefix: str, behaviours: dict | None = None) -> str:
    for path in folder.iterdir():
        server.add(f"{prefix}/{path.name}", path.read_bytes(), *(behaviours or {}).get(path.name, []))
    return f"{server.base_url}/{prefix}"


# ---------------------------------------------------------------------------------------------- IDX


def test_idx_round_trip_and_wrong_size():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    from conftest import idx_bytes

    data = idx_bytes(array)
    assert (parse_idx(data, "x") == array).all()
    with pytest.raises(DataError, match=r"IDX records of the wrong size: header says shape \(2, 3, 4\)"):
        parse_idx(data[:-5], "x")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        parse_idx(b"\x00\x00\x0d\x01" + data[4:], "x")


def test_fashion_mnist_from_local_folder_decodes_to_nchw_uint8(fashion_files, tmp_path):
    provenance, _ = acquire("fashion-mnist", fashion_files, tmp_path / "raw")
    assert set(provenance["files"]) == set(datasets.FASHION_MNIST_FILES)
    decoded = decode(
        "fashion-mnist",
        tmp_path / "raw",
        image_size=0,
        channels=1,
        on_bad_image="error",
        max_image_pixels=10**7,
        workdir=tmp_path / "decoded",
    )
    images, labels = decoded.splits["train"]
    assert images.shape == (200, 1, 28, 28) and images.dtype == np.uint8
    assert labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert decoded.class_names[0] == "T-shirt/top" and decoded.class_names[9] == "Ankle boot"
    # Class 3's band sits on rows 6..10: the decoder kept pixel order.
    assert images[3, 0, 6:11].mean() > 150 and images[3, 0, 20:].mean() < 70


def test_system_copy_matches_known_checksums(tmp_path):
    if not (Path("/usr/share/datasets/fashion-mnist") / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make test installs it when run as root)")
    provenance, _ = acquire("fashion-mnist", "/usr/share/datasets/fashion-mnist", tmp_path / "raw")
    assert provenance["files"]["t10k-labels-idx1-ubyte.gz"]["content_sha256"].startswith("0402a96d")


# ---------------------------------------------------------------------------------------------- HTTP


def test_download_over_http_retries_500_and_dropped_connection(fashion_files, tmp_path, http_server):
    url = serve_folder(
        http_server,
        fashion_files,
        "fm",
        {"train-images-idx3-ubyte.gz": ["500", "drop"], "t10k-labels-idx1-ubyte.gz": ["drop"]},
    )
    provenance, messages = acquire("fashion-mnist", url, tmp_path / "raw")
    assert provenance["location"] == url
    assert http_server.requests_for("fm/train-images-idx3-ubyte.gz") == 3  # 500, dropped, then good
    assert http_server.requests_for("fm/t10k-labels-idx1-ubyte.gz") == 2
    assert any("HTTP 500" in m and "retrying" in m for m in messages)
    assert any("dropped" in m for m in messages)
    got = (tmp_path / "raw" / "train-images-idx3-ubyte.gz").read_bytes()
    assert got == (fashion_files / "train-images-idx3-ubyte.gz").read_bytes()


def test_http_retries_are_bounded_then_reported(fashion_files, tmp_path, http_server):
    url = serve_folder(http_server, fashion_files, "fm", {"train-images-idx3-ubyte.gz": ["drop"] * 10})
    with pytest.raises(DataError) as caught:
        acquire("fashion-mnist", url, tmp_path / "raw", retries=2)
    message = str(caught.value)
    assert "dropped" in message and "gave up after 2 attempts" in message
    assert f"{url}/train-images-idx3-ubyte.gz" in message
    assert http_server.requests_for("fm/train-images-idx3-ubyte.gz") == 2


def test_http_404_is_not_retried_and_names_the_url(tmp_path, http_server):
    url = f"{http_server.base_url}/missing"
    with pytest.raises(DataError) as caught:
        acquire("fashion-mnist", url, tmp_path / "raw")
    assert f"HTTP 404 Not Found for {url}/train-images-idx3-ubyte.gz" in str(caught.value)
    assert http_server.requests_for("missing/train-images-idx3-ubyte.gz") == 1


def test_unreachable_host_names_url_and_the_ways_out(tmp_path):
    url = unused_local_url()
    with pytest.raises(DataError) as caught:
        acquire("fashion-mnist", url, tmp_path / "raw", retries=1)
    message = str(caught.value)
    assert f"cannot reach {url}/train-images-idx3-ubyte.gz" in message
    assert "data.source" in message and "dataset-fashion-mnist" in message


def test_checksum_mismatch_reports_expected_and_actual(tmp_path, http_server):
    # Files in the right format but not Fashion-MNIST: the real checksum table rejects them.
    folder = tmp_path / "fake"
    make_fashion_like(folder)
    url = serve_folder(http_server, folder, "fake")
    with pytest.raises(DataError) as caught:
        acquire("fashion-mnist", url, tmp_path / "raw")
    message = str(caught.value)
    expected = datasets.FASHION_MNIST_FILES["train-images-idx3-ubyte.gz"].content_sha256
    assert "checksum mismatch for train-images-idx3-ubyte.gz" in message
    assert f"expected sha256 {expected}" in message and "got " in message


def test_source_list_falls_through_to_the_next_location(fashion_files, tmp_path, http_server):
    url = serve_folder(http_server, fashion_files, "mirror2")
    source_list = tmp_path / "sources.txt"
    source_list.write_text(f"# comment\n{tmp_path / 'nowhere'}\n{http_server.base_url}/mirror1\n{url}  # good\n")
    provenance, messages = acquire("fashion-mnist", source_list, tmp_path / "raw")
    assert provenance["location"] == url
    assert sum("trying the next location" in m for m in messages) == 2
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        [*datasets.FASHION_MNIST_FILES, "source.json"]
    )


# ---------------------------------------------------------------------------------------------- CIFAR-10


@pytest.fixture
def small_cifar(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    monkeypatch.setattr(datasets, "CIFAR10_ARCHIVE_MD5", make_cifar_archive(archive, records_per_file=20))
    monkeypatch.setattr(datasets, "CIFAR10_RECORDS_PER_FILE", 20)
    return archive


def test_cifar10_from_mirror_url_parses_records_without_pickle(small_cifar, tmp_path, http_server):
    url = http_server.add("mirror/cifar-10-binary.tar.gz", small_cifar.read_bytes())
    acquire("cifar10", url, tmp_path / "raw")
    assert not (tmp_path / "raw" / "cifar-10-binary.tar.gz").exists()  # extracted, archive dropped
    decoded = decode(
        "cifar10",
        tmp_path / "raw",
        image_size=0,
        channels=3,
        on_bad_image="error",
        max_image_pixels=10**7,
        workdir=tmp_path / "decoded",
    )
    images, labels = decoded.splits["train"]
    assert images.shape == (100, 3, 32, 32) and decoded.splits["test"][0].shape == (20, 3, 32, 32)
    assert decoded.class_names == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    record = np.frombuffer(cifar_records(20, 0), dtype=np.uint8).reshape(20, 3073)[7]
    assert labels[7] == record[0] and (images[7].reshape(-1) == record[1:]).all()  # R plane, G plane, B plane


def test_cifar10_checksum_mismatch(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_archive(archive, records_per_file=20)
    with pytest.raises(DataError, match=rf"expected md5 {datasets.CIFAR10_ARCHIVE_MD5}, got [0-9a-f]{{32}}"):
        acquire("cifar10", archive, tmp_path / "raw")


def test_cifar10_records_of_wrong_size(small_cifar, tmp_path):
    acquire("cifar10", small_cifar, tmp_path / "raw")
    batch = tmp_path / "raw" / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(DataError, match="data_batch_3.bin: CIFAR records of the wrong size"):
        decode(
            "cifar10",
            tmp_path / "raw",
            image_size=0,
            channels=3,
            on_bad_image="error",
            max_image_pixels=10**7,
            workdir=tmp_path / "decoded",
        )


def test_truncated_archive_is_reported(small_cifar, tmp_path, monkeypatch):
    truncated = tmp_path / "cut" / "cifar-10-binary.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(small_cifar.read_bytes()[: small_cifar.stat().st_size // 2])
    monkeypatch.setattr(datasets, "CIFAR10_ARCHIVE_MD5", digest_file(truncated).md5)
    with pytest.raises(DataError, match="is truncated or corrupt"):
        acquire("cifar10", truncated, tmp_path / "raw")


# ---------------------------------------------------------------------------------------------- archives


def _tar_with(path: Path, *members: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, "train/a/ok.txt", b"fine")
        for info in members:
            tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return path


def _info(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member, fragment",
    [
        (_info("../evil.txt"), "refusing member '../evil.txt': '..' would escape"),
        (_info("train/../../evil.txt"), "refusing member 'train/../../evil.txt'"),
        (_info("/tmp/imgcls-evil.txt"), "refusing member '/tmp/imgcls-evil.txt' with an absolute path"),
        (
            _info("train/a/link", tarfile.SYMTYPE, "../../../etc/passwd"),
            "refusing symbolic link member 'train/a/link' -> '../../../etc/passwd'",
        ),
        (
            _info("train/a/abs", tarfile.SYMTYPE, "/etc/passwd"),
            "refusing symbolic link member 'train/a/abs' -> '/etc/passwd'",
        ),
        (
            _info("train/a/inside", tarfile.SYMTYPE, "ok.txt"),
            "refusing symbolic link member 'train/a/inside' -> 'ok.txt'",
        ),
        (
            _info("train/a/hard", tarfile.LNKTYPE, "../outside"),
            "refusing hard link member 'train/a/hard' -> '../outside'",
        ),
        (_info("train/a/dev", tarfile.CHRTYPE), "refusing device or FIFO member 'train/a/dev'"),
        (_info("train/a/fifo", tarfile.FIFOTYPE), "refusing device or FIFO member 'train/a/fifo'"),
    ],
)
def test_malicious_tar_members_are_refused_before_anything_is_written(tmp_path, member, fragment):
    archive = _tar_with(tmp_path / "evil.tar", member)
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(DataError) as caught:
        extract_archive(archive, target, LIMITS)
    assert fragment in str(caught.value)
    assert set(tmp_path.rglob("*")) == before  # not even the harmless member was written
    assert not Path("/tmp/imgcls-evil.txt").exists()


def test_malicious_zip_member_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/ok.png", b"x")
        zf.writestr("../../escape.txt", b"x")
    (tmp_path / "t").mkdir()
    with pytest.raises(DataError, match="refusing member '../../escape.txt'"):
        extract_archive(archive, tmp_path / "t", LIMITS)
    assert not (tmp_path / "escape.txt").exists() and not list((tmp_path / "t").iterdir())


# ---------------------------------------------------------------------------------------------- image folders


def test_image_folder_modes_sizes_and_channels(tmp_path):
    root = make_image_folder(tmp_path / "ants_bees")
    palette = Image.new("P", (9, 9))
    palette.putpalette([40, 40, 200] * 256)
    palette.save(root / "train" / "bees" / "palette.gif")
    (root / "train" / "ants" / "notes.txt").write_text("not an image")
    (root / "train" / "README").write_text("also not an image")
    messages = []
    decoded = decode_image_folder(
        root,
        workdir=tmp_path / "decoded",
        image_size=16,
        channels=3,
        on_bad_image="error",
        max_pixels=10**7,
        log=messages.append,
    )
    images, labels = decoded.splits["train"]
    assert decoded.class_names == ["ants", "bees"]
    assert images.shape == (13, 3, 16, 16) and images.dtype == np.uint8
    images = images.load()  # the decoded rows stream to a scratch file; read them back
    # ants are red, bees blue, whatever the file's mode (JPEG, grayscale PNG, RGBA PNG, palette GIF).
    red_minus_blue = images[:, 0].mean(axis=(1, 2)) - images[:, 2].mean(axis=(1, 2))
    # Files sort as 0.jpg, 1.png (grayscale), 2.png (RGBA), 3.jpg, 4.png (grayscale), 5.png (RGBA) per class;
    # bees also have palette.gif (blue) last.
    gray = np.array([False, True, False, False, True, False] + [False, True, False, False, True, False, False])
    assert (np.abs(red_minus_blue[gray]) < 1).all()  # grayscale files stay gray in RGB
    assert (red_minus_blue[(labels == 0) & ~gray] > 100).all()  # ants red: JPEG, RGBA PNG
    assert (red_minus_blue[(labels == 1) & ~gray] < -100).all()  # bees blue: JPEG, RGBA PNG, palette GIF
    assert any("ignored 2 file(s) that are not images" in m for m in messages)
    gray = decode_image_folder(
        root,
        workdir=tmp_path / "decoded",
        image_size=8,
        channels=1,
        on_bad_image="error",
        max_pixels=10**7,
        log=messages.append,
    )
    assert gray.splits["test"][0].shape == (12, 1, 8, 8)


def test_image_folder_without_test_split_is_carved_stratified(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("a", "b", "c"), per_class=10, splits=("train",))
    decoded = decode_image_folder(
        root,
        workdir=tmp_path / "decoded",
        image_size=8,
        channels=3,
        on_bad_image="error",
        max_pixels=10**7,
        log=lambda m: None,
    )
    splits = make_splits(decoded, val_fraction=0.2, test_fraction=0.3, limit=0, seed=1)
    assert np.bincount(splits["test"][1]).tolist() == [3, 3, 3]
    assert np.bincount(splits["val"][1]).tolist() == [1, 1, 1]  # 20% of the 7 left per class
    assert len(splits["train"][1]) == 18
    again = make_splits(decoded, val_fraction=0.2, test_fraction=0.3, limit=0, seed=1)
    assert (again["test"][0] == splits["test"][0]).all()  # seeded


def test_unreadable_images_error_or_skip(tmp_path):
    root = make_image_folder(tmp_path / "f")
    (root / "train" / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\) in train/, first .*broken.jpg"):
        decode_image_folder(
            root,
            workdir=tmp_path / "decoded",
            image_size=8,
            channels=3,
            on_bad_image="error",
            max_pixels=10**7,
            log=lambda m: None,
        )
    messages = []
    decoded = decode_image_folder(
        root,
        workdir=tmp_path / "decoded",
        image_size=8,
        channels=3,
        on_bad_image="skip",
        max_pixels=10**7,
        log=messages.append,
    )
    assert len(decoded.splits["train"][1]) == 12
    assert any("skipped 1 unreadable image file(s)" in m and "broken.jpg" in m for m in messages)


@pytest.mark.parametrize(
    "problem, fragment",
    [
        ("empty_class", "class folder train/wasps holds no images"),
        ("single_class", "has 1 class folder(s) ['ants']; a classifier needs at least two"),
        (
            "different_classes",
            "class folders differ between splits: train has ['ants', 'bees'], test has ['ants', 'wasps']",
        ),
    ],
)
def test_bad_class_layouts(tmp_path, problem, fragment):
    root = make_image_folder(tmp_path / "f", classes=("ants",) if problem == "single_class" else ("ants", "bees"))
    if problem == "empty_class":
        (root / "train" / "wasps").mkdir()
    if problem == "different_classes":
        (root / "test" / "bees").rename(root / "test" / "wasps")
    with pytest.raises(DataError) as caught:
        decode_image_folder(
            root,
            workdir=tmp_path / "decoded",
            image_size=8,
            channels=3,
            on_bad_image="error",
            max_pixels=10**7,
            log=lambda m: None,
        )
    assert fragment in str(caught.value)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_image_folder_archive_over_http(tmp_path, http_server, kind):
    root = make_image_folder(tmp_path / "src" / "bugs")
    archive = tmp_path / f"bugs.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, "bugs/" + str(path.relative_to(root)))  # one top-level folder
    else:
        make_tar(archive, root)
    url = http_server.add(f"data/bugs.{kind}", archive.read_bytes())
    provenance, _ = acquire("imagefolder", url, tmp_path / "raw")
    assert provenance["files"][f"bugs.{kind}"]["sha256"] == digest_file(archive).sha256
    decoded = decode(
        "imagefolder",
        tmp_path / "raw",
        image_size=12,
        channels=3,
        on_bad_image="error",
        max_image_pixels=10**7,
        workdir=tmp_path / "decoded",
    )
    assert decoded.class_names == ["ants", "bees"] and decoded.splits["train"][0].shape == (12, 3, 12, 12)


# ---------------------------------------------------------------------------------------------- stages


def run_stage(project: Path, stage: str, **data_overrides) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update(data_overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py")],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )


def leftovers(project: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
        if (project / "data").exists()
        else []
    )


@pytest.mark.parametrize(
    "case", ["404", "500", "drop", "unreachable", "checksum", "corrupt_archive", "evil_archive", "link_chain"]
)
def test_download_stage_failures_exit_1_and_leave_nothing(tmp_path, http_server, case):
    project = tmp_path / "project"
    project.mkdir()
    fake = tmp_path / "fake"
    make_fashion_like(fake)
    if case == "unreachable":
        overrides, expect = {"source": unused_local_url(), "retries": 1}, "cannot reach http://127.0.0.1:"
    elif case == "checksum":
        overrides, expect = (
            {"source": serve_folder(http_server, fake, "fm")},
            "checksum mismatch for train-images-idx3-ubyte.gz",
        )
    elif case in ("404", "500", "drop"):
        url = serve_folder(http_server, fake, "fm", {"train-images-idx3-ubyte.gz": [case] * 5})
        overrides = {"source": url, "retries": 2}
        expect = {"404": "HTTP 404", "500": "HTTP 500 Internal Server Error", "drop": "dropped"}[case]
    else:
        archive = tmp_path / "images.tar.gz"
        if case == "corrupt_archive":
            make_tar(archive, make_image_folder(tmp_path / "imgs"))
            archive.write_bytes(archive.read_bytes()[:300])
            expect = "images.tar.gz is truncated or corrupt"
        elif case == "evil_archive":
            _tar_with(archive, _info("../../evil.txt"))
            expect = "refusing member '../../evil.txt'"
        else:  # links that each look harmless, chained to lead out of data/raw, then a file written through them
            with tarfile.open(archive, "w:gz") as tar:
                add_bytes(tar, "train/a/ok.png", b"fine")
                for name, link in (("up", "."), ("up/up2", ".."), ("up/up2/up3", ".."), ("up/up2/up3/up4", "..")):
                    tar.addfile(_info(name, tarfile.SYMTYPE, link))
                add_bytes(tar, "up/up2/up3/up4/evil.txt", b"pwned")
            expect = "refusing symbolic link member 'up' -> '.'"
        url = http_server.add("images.tar.gz", archive.read_bytes())
        overrides = {"dataset": "imagefolder", "source": url}
    result = run_stage(project, "download", **overrides)
    assert result.returncode == 1, result.stderr
    assert "download: error: could not get" in result.stderr and expect in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(project) == []
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    "problem, fragment",
    [
        ("bad_image", "unreadable image file(s) in test/"),
        ("empty_class", "class folder train/wasps holds no images"),
        ("single_class", "a classifier needs at least two"),
        ("different_classes", "class folders differ between splits"),
    ],
)
def test_preprocess_stage_failures_exit_1_and_leave_no_prepared_data(tmp_path, problem, fragment):
    project = tmp_path / "project"
    project.mkdir()
    root = make_image_folder(tmp_path / "imgs", classes=("ants",) if problem == "single_class" else ("ants", "bees"))
    if problem == "bad_image":
        (root / "test" / "bees" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    if problem == "empty_class":
        (root / "train" / "wasps").mkdir()
    if problem == "different_classes":
        (root / "train" / "bees").rename(root / "train" / "wasps")
    assert run_stage(project, "download", dataset="imagefolder", source=str(root)).returncode == 0
    result = run_stage(project, "preprocess", dataset="imagefolder", source=str(root))
    assert result.returncode == 1 and fragment in result.stderr and "Traceback" not in result.stderr
    assert not (project / "data" / "prepared").exists()
    assert [p for p in leftovers(project) if "prepared" in p] == []


def test_download_and_preprocess_stages_on_an_image_folder(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    root = make_image_folder(tmp_path / "imgs", classes=("ants", "bees", "wasps"), per_class=8, splits=("train",))
    for stage in ("download", "preprocess"):
        result = run_stage(project, stage, dataset="imagefolder", source=str(root), image_size=10, channels=1)
        assert result.returncode == 0, result.stderr
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert meta["class_names"] == ["ants", "bees", "wasps"] and meta["image_shape"] == [1, 10, 10]
    assert sum(meta["counts"]["test"].values()) == 3 and sum(meta["counts"]["val"].values()) == 3
    images = np.load(project / "data" / "prepared" / "train_images.npy", allow_pickle=False)
    assert images.shape == (18, 1, 10, 10)
    assert abs(meta["mean"][0] - images.mean() / 255) < 1e-6  # statistics of the training split only
    assert [p for p in os.listdir(project / "data") if p.startswith(".")] == []  # no temporary folders left


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_preprocess_stage_refuses_records_of_the_wrong_size(tmp_path, dataset):
    # data/raw as a download would leave it, then damaged: preprocess must stop and publish nothing.
    project = tmp_path / "project"
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "source.json").write_text(json.dumps({"dataset": dataset}))
    if dataset == "fashion-mnist":
        make_fashion_like(raw)
        labels = raw / "train-labels-idx1-ubyte.gz"
        labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-7]))
        expect = "train-labels: IDX records of the wrong size: header says shape (200,)"
    else:
        folder = raw / datasets.CIFAR10_FOLDER
        folder.mkdir()
        for name in datasets.CIFAR10_TRAIN_FILES + datasets.CIFAR10_TEST_FILES:
            (folder / name).write_bytes(cifar_records(10, 0)[: -1 if name == "data_batch_1.bin" else None])
        (folder / "batches.meta.txt").write_text("\n".join("abcdefghij"))
        expect = "data_batch_1.bin: CIFAR records of the wrong size: 30729 bytes is not a multiple of 3073"
    result = run_stage(
        project,
        "preprocess",
        dataset=dataset,
        source="sources/cifar10.txt" if dataset == "cifar10" else "sources/fashion-mnist.txt",
    )
    assert result.returncode == 1 and expect in result.stderr, result.stderr
    assert not (project / "data" / "prepared").exists()
    assert [p for p in os.listdir(project / "data") if p.startswith(".")] == []
