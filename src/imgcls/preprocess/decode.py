"""One entry point for the preprocess stage: the raw folder of any data set -> DecodedDataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..manifest import MANIFEST_NAME, read_manifest, scan_folder
from .formats import DecodedDataset, decode_cifar10, decode_fashion_mnist
from .imagefolder import decode_manifest


def decode(
    dataset: str,
    raw_dir: Path,
    *,
    image_size: int,
    channels: int,
    on_bad_image: str,
    max_image_pixels: int,
    workdir: Path,
    resize: str = "squash",
    log: Callable[[str], None] = print,
    cache_dir: Path | None = None,
    project_root: Path | None = None,
) -> DecodedDataset:
    """Fashion-MNIST and CIFAR-10 (fixed, small, square) decode in memory; image folders stream into
    ``workdir``, made square by ``resize`` (squash | crop | pad), reusing what ``cache_dir`` holds. A folder read
    in place that the manifest names by a relative path is found under ``project_root`` (the current folder
    when None)."""
    return DECODERS[dataset](
        raw_dir,
        image_size=image_size,
        channels=channels,
        resize=resize,
        on_bad_image=on_bad_image,
        max_image_pixels=max_image_pixels,
        workdir=workdir,
        log=log,
        cache_dir=cache_dir,
        project_root=project_root or Path.cwd(),
    )


def _decode_images(raw_dir: Path, **options: Any) -> DecodedDataset:
    """The images data/raw/manifest.json lists: in the source folder (read in place) or in data/raw/images
    (fetched). A data/raw without a manifest (written before manifests) is scanned here."""
    manifest_path = raw_dir / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        folder = options["project_root"] / manifest.folder if manifest.folder is not None else raw_dir / "images"
    else:
        folder = raw_dir / "images"
        manifest = scan_folder(folder, on_bad_link=options["on_bad_image"], log=options["log"])
    if not folder.is_dir():
        raise DataError(
            f"the image folder {folder} named in {manifest_path} is missing",
            "put it back, or point data.source at the images and rerun the download stage (dvc repro)",
        )
    return decode_manifest(
        manifest,
        folder,
        image_size=options["image_size"],
        channels=options["channels"],
        resize=options["resize"],
        on_bad_image=options["on_bad_image"],
        max_pixels=options["max_image_pixels"],
        workdir=options["workdir"],
        log=options["log"],
        cache_dir=options["cache_dir"],
    )


# How each data set in datasets.DATASETS is decoded from data/raw (one entry per data set, a test checks).
DECODERS: dict[str, Callable[..., DecodedDataset]] = {
    "fashion-mnist": lambda raw_dir, **_: decode_fashion_mnist(raw_dir),
    "cifar10": lambda raw_dir, **_: decode_cifar10(raw_dir),
    "imagefolder": _decode_images,
}
