"""params.yaml ``preprocess``: how the decoded images are split."""

from __future__ import annotations

from pydantic import Field

from .base import BaseParams
from .core import Section, StageParams
from .data import DataParams, check_data


class PreprocessParams(Section):
    val_fraction: float = Field(ge=0, lt=1)


class PreprocessStageParams(StageParams):
    """What the preprocess stage reads."""

    base: BaseParams
    data: DataParams
    preprocess: PreprocessParams

    def check(self) -> None:
        check_data(self.data)
