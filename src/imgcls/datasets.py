"""The data set table and the facts behind it: file names, checksums, class names, record sizes. params
validate ``data.dataset`` against ``DATASETS``; the download stage (which verifies files) and the preprocess
stage (which parses them) read everything else from here.

Adding a data set is one ``DatasetSpec`` entry plus a fetch function (``download/sources.py``, ``FETCHERS``)
and a decode function (``preprocess/decode.py``, ``DECODERS``); tests/test_project_structure.py fails,
naming the missing one, while any of the three lacks the others."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    """One registered data set."""

    image_size: int | None  # its fixed side in pixels; None: data.image_size sets it (image folders)
    offline_advice: str  # the next step when no location in data.source could be fetched
    # Whether a perceptual near-duplicate means a copy here (audit.near_duplicates: auto). Not on Fashion-MNIST:
    # its items are centred silhouettes on black, so distinct plain shirts match as closely as a JPEG copy
    # does (measured: imgcls.audit.duplicates' calibration table); there only exact copies are searched.
    near_duplicates: bool = True


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class ExpectedIdx:
    """Checksum of the *decompressed* IDX bytes: Debian repacks the .gz files (other gzip bytes, same
    data), so hashing the content verifies the system copy and the official mirrors alike."""

    content_sha256: str
    content_bytes: int


FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": ExpectedIdx(
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016
    ),
    "train-labels-idx1-ubyte.gz": ExpectedIdx(
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008
    ),
    "t10k-images-idx3-ubyte.gz": ExpectedIdx(
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016
    ),
    "t10k-labels-idx1-ubyte.gz": ExpectedIdx("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then 1024 R, 1024 G, 1024 B bytes
CIFAR10_RECORDS_PER_FILE = 10000

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "val", "test")


def gunzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise DataError(f"{path.name} is not a valid gzip file ({error}); the copy is truncated or corrupt") from None


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        image_size=28,
        offline_advice="set data.source to a folder holding the four .gz files, or install Debian's package "
        "(apt-get install dataset-fashion-mnist) which puts them in /usr/share/datasets/fashion-mnist",
        near_duplicates=False,
    ),
    "cifar10": DatasetSpec(
        image_size=32,
        offline_advice=f"download {CIFAR10_ARCHIVE} where you have a network and set data.source to that file",
    ),
    "imagefolder": DatasetSpec(
        image_size=None,
        offline_advice="set data.source to a folder or a .tar/.tar.gz/.zip archive laid out as train/<class>/*",
    ),
}
