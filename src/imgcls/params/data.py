"""params.yaml ``data``: which data set, from where, and how its images are read."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..datasets import DATASETS
from ..errors import ParamsError
from .core import MAX_IMAGE_SIZE, Section, StageParams, show


class DataParams(Section):
    dataset: str = Field(description=f"one of {', '.join(map(repr, DATASETS))}")
    source: str = Field(min_length=1, description="a path, a URL or a source list (.txt)")
    limit: int = Field(ge=0)  # at most this many train and test images (0 = all)
    test_fraction: float = Field(gt=0, lt=1)
    on_bad_image: Literal["error", "skip"]
    image_size: int = Field(ge=8, le=MAX_IMAGE_SIZE)
    # imagefolder: how a non-square picture becomes image_size x image_size (preprocess/images.py RESIZE_MODES)
    resize: Literal["squash", "crop", "pad"]
    channels: Literal[1, 3]
    # Pillow itself refuses images of more than 178,956,970 pixels (its decompression-bomb limit).
    max_image_pixels: int = Field(ge=1024, le=178_956_970)
    # imagefolder with train/ and val/ but no test/: val/ is the test split (test) or the validation split (val)
    val_folder: Literal["test", "val"]
    retries: int = Field(ge=1, le=20)
    timeout_s: float = Field(gt=0, le=600)
    max_extract_gb: float = Field(gt=0, le=10000)

    @field_validator("dataset")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError("not a registered data set")
        return value


def input_size(data: DataParams) -> int:
    """The side of the images the model will see: the data set's fixed size, else data.image_size."""
    fixed = DATASETS[data.dataset].image_size
    return data.image_size if fixed is None else fixed


def check_data(data: DataParams) -> None:
    """Rules across the data section's keys."""
    list_name = Path(data.source).name
    if list_name in ("fashion-mnist.txt", "cifar10.txt") and list_name != f"{data.dataset}.txt":
        raise ParamsError(
            f"params: data.source = {show(data.source)} lists {list_name[:-4]} locations but data.dataset = "
            f"{data.dataset!r}; set data.source to sources/{data.dataset}.txt or to your own copy"
        )


class DownloadStageParams(StageParams):
    """What the download stage reads."""

    data: DataParams

    def check(self) -> None:
        check_data(self.data)
