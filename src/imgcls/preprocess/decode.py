"""One entry point for the preprocess stage: the raw folder of any data set -> DecodedDataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DataError
from .formats import DecodedDataset, decode_cifar10, decode_fashion_mnist
from .imagefolder import decode_image_folder, is_hidden


def decode(
    dataset: str,
    raw_dir: Path,
    *,
    image_size: int,
    channels: int,
    on_bad_image: str,
    max_image_pixels: int,
    workdir: Path,
    log: Callable[[str], None] = print,
) -> DecodedDataset:
    """Fashion-MNIST and CIFAR-10 (fixed, small) decode in memory; image folders stream into ``workdir``."""
    return DECODERS[dataset](
        raw_dir,
        image_size=image_size,
        channels=channels,
        on_bad_image=on_bad_image,
        max_image_pixels=max_image_pixels,
        workdir=workdir,
        log=log,
    )


def _decode_images(raw_dir: Path, **options: Any) -> DecodedDataset:
    return decode_image_folder(
        find_image_root(raw_dir / "images"),
        image_size=options["image_size"],
        channels=options["channels"],
        on_bad_image=options["on_bad_image"],
        max_pixels=options["max_image_pixels"],
        workdir=options["workdir"],
        log=options["log"],
    )


# How each data set in datasets.DATASETS is decoded from data/raw (one entry per data set, a test checks).
DECODERS: dict[str, Callable[..., DecodedDataset]] = {
    "fashion-mnist": lambda raw_dir, **_: decode_fashion_mnist(raw_dir),
    "cifar10": lambda raw_dir, **_: decode_cifar10(raw_dir),
    "imagefolder": _decode_images,
}


def find_image_root(images_dir: Path) -> Path:
    """The folder holding ``train/``: the extracted folder itself or its single top-level subfolder."""
    if (images_dir / "train").is_dir():
        return images_dir
    children = [c for c in images_dir.iterdir() if c.is_dir() and not is_hidden(c.name)]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise DataError(
        f"no train/ folder in the image source (found: {sorted(c.name for c in images_dir.iterdir())[:10]}); "
        "lay it out as train/<class>/*, test/<class>/* (optional) and val/<class>/* (optional)"
    )
