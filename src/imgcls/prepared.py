"""The prepared-data format between preprocess and the stages after it: uint8 .npy files per split plus
meta.json (class names, image shape, counts, normalization statistics). Plain arrays, no pickle.

Images are not loaded: each split's images come as an ``NpyReader`` (rows read on demand, see arrays.py),
so a stage holds what it asks for (a batch, or the whole split when it chooses to keep it resident).

Loading checks the structure (keys, shapes, dtypes, label range) and names what is wrong together with
the command that rebuilds it, instead of failing later with a traceback deep inside training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import ArrayFileError, NpyReader, save_array
from .errors import DataError

REBUILD = "rebuild it with: dvc repro -f preprocess"
# mean and std are of pixel values in [0, 1]: a mean lies in 0..1 and a std in 0..0.5 (half black, half white).
# The smallest std that uint8 data can have without being constant is 1/(255 * sqrt(n)) for n pixels per
# channel: above this floor for any data set up to 10^13 pixels. A std far below it (1e-30) is no statistic of
# any images, and dividing by it overflows float32 (the fast model's whitening then fails in linalg.eigh).
MIN_STD = 1e-9
MAX_STD = 0.5


def images_file(directory: Path, split: str) -> Path:
    return directory / f"{split}_images.npy"


def labels_file(directory: Path, split: str) -> Path:
    return directory / f"{split}_labels.npy"


def meta_file(directory: Path) -> Path:
    return directory / "meta.json"


def names_file(directory: Path, split: str) -> Path:
    """Each image's source, one JSON list per split: the file (image folders) or the official file's row."""
    return directory / f"{split}_files.json"


def save_names(directory: Path, split: str, names: list[str]) -> None:
    names_file(directory, split).write_text(json.dumps(names, ensure_ascii=False) + "\n")


def load_names(directory: Path, split: str, count: int) -> list[str]:
    """The ``count`` source names of ``split`` (prepared data older than these files: "<split> #<row>")."""
    path = names_file(directory, split)
    if not path.is_file():
        return [f"{split} #{row}" for row in range(count)]
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise _bad(path, f"not valid JSON ({type(error).__name__}: {str(error)[:200]})") from None
    if not (isinstance(names, list) and len(names) == count and all(isinstance(n, str) for n in names)):
        raise _bad(path, f"expected a list of {count} file names, one per image of the {split} split")
    return names


def save_labels(directory: Path, split: str, labels: np.ndarray) -> None:
    save_array(labels_file(directory, split), np.asarray(labels, dtype=np.int64))


def save_meta(directory: Path, meta: dict) -> None:
    meta_file(directory).write_text(json.dumps(meta, indent=2) + "\n")


def save_prepared(directory: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """In-memory splits as prepared data (the preprocess stage streams instead: preprocess/write.py)."""
    for split, (images, labels) in splits.items():
        save_array(images_file(directory, split), np.ascontiguousarray(images, dtype=np.uint8))
        save_labels(directory, split, labels)
    save_meta(directory, meta)


@dataclass
class PreparedData:
    meta: dict
    splits: dict[str, tuple[NpyReader, np.ndarray]]  # name -> (images uint8 (N, C, H, W) on disk, labels int64 (N,))

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    def require_classes(self, class_names: list[str], checkpoint: Path) -> None:
        """The model's classes must be the data's, in the same order, or every per-class number is wrong."""
        if list(class_names) != self.class_names:
            raise DataError(
                f"{checkpoint} was trained on classes {list(class_names)[:10]} but data/prepared holds "
                f"{self.class_names[:10]}; retrain on this data (dvc repro train)"
            )


def _bad(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; {REBUILD}")


def _check_meta(path: Path, meta: object) -> dict:
    if not isinstance(meta, dict):
        raise _bad(path, "not a JSON object")
    names = meta.get("class_names")
    if not (
        isinstance(names, list)
        and len(names) >= 2
        and all(isinstance(n, str) for n in names)
        and len(set(names)) == len(names)
    ):
        raise _bad(path, f"class_names must be a list of at least two distinct names, found {names!r}")
    shape = meta.get("image_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and s > 0 for s in shape)
        and shape[0] in (1, 3)
    ):
        raise _bad(path, f"image_shape must be [channels (1 or 3), height, width], found {shape!r}")
    for key in ("mean", "std"):
        values = meta.get(key)
        if not (
            isinstance(values, list) and len(values) == shape[0] and all(isinstance(v, (int, float)) for v in values)
        ):
            raise _bad(path, f"{key} must hold {shape[0]} number(s), one per channel, found {values!r}")
    if not all(np.isfinite(meta["mean"] + meta["std"])) or min(meta["std"]) <= 0:
        raise _bad(path, f"mean must be finite and std finite and positive, found {meta['mean']}, {meta['std']}")
    if not (all(0 <= m <= 1 for m in meta["mean"]) and all(MIN_STD <= s <= MAX_STD for s in meta["std"])):
        raise _bad(
            path,
            f"mean must lie in 0..1 and std in {MIN_STD:g}..{MAX_STD} (pixel values in [0, 1]), found "
            f"mean {meta['mean']}, std {meta['std']}: they are not statistics of these images",
        )
    if not isinstance(meta.get("dataset"), str):
        raise _bad(path, f"dataset must be a name, found {meta.get('dataset')!r}")
    return meta


def _load_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as error:  # MemoryError: a header claiming 2^40 rows
        raise _bad(path, f"not a readable .npy array ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
        raise _bad(path, f"not a .npy array (found {type(array).__name__})")
    return array


def _open_images(path: Path) -> NpyReader:
    try:
        return NpyReader(path)
    except ArrayFileError as error:
        raise _bad(path, str(error)) from None


def _load_split(directory: Path, split: str, meta: dict) -> tuple[NpyReader, np.ndarray]:
    images_path, labels_path = images_file(directory, split), labels_file(directory, split)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise _bad(path, f"missing (the {split} split is needed here)")
    images, labels = _open_images(images_path), _load_array(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape[1:]) != meta["image_shape"]:
        raise _bad(
            images_path,
            f"expected uint8 images of shape (N, {', '.join(map(str, meta['image_shape']))}), "
            f"found {images.dtype} {images.shape}",
        )
    if labels.dtype != np.int64 or labels.ndim != 1 or len(labels) != len(images):
        raise _bad(labels_path, f"expected {len(images)} int64 labels, found {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(meta["class_names"])):
        raise _bad(
            labels_path, f"labels must lie in 0..{len(meta['class_names']) - 1}, found {labels.min()}..{labels.max()}"
        )
    return images, labels


def load_prepared(directory: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> PreparedData:
    """Load and check the ``required`` splits, and the ``optional`` ones where present (plain .npy, no pickle)."""
    meta_path = meta_file(directory)
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing; run the preprocess stage first (dvc repro preprocess)")
    try:
        meta = _check_meta(meta_path, json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise _bad(meta_path, f"not valid JSON ({type(error).__name__}: {str(error)[:200]})") from None
    splits = {split: _load_split(directory, split, meta) for split in required}
    for split in optional:
        if images_file(directory, split).is_file():
            splits[split] = _load_split(directory, split, meta)
    for split in required:  # training on nothing or scoring nothing gives numbers that mean nothing
        if not len(splits[split][1]):
            raise _bad(labels_file(directory, split), f"the {split} split is empty")
    return PreparedData(meta, splits)
