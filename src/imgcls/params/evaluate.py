"""params.yaml ``evaluate``: how the test split is scored."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from .base import BaseParams
from .core import Section, StageParams
from .train import TrainParams


def _tta_level(value: object) -> object:
    """true and false, the values before there were levels: all 6 views, and none."""
    return {True: "mirror_shifts", False: "none"}.get(value, value) if isinstance(value, bool) else value


# Test-time augmentation: none | mirror (2 views) | mirror_shifts (6 views); imgcls.model.networks.TTA_LEVELS.
TTALevel = Annotated[Literal["none", "mirror", "mirror_shifts"], BeforeValidator(_tta_level)]


class EvaluateParams(Section):
    batch_size: int = Field(ge=1, le=65536)
    tta: TTALevel
    misclassified_images: int = Field(ge=0, le=400)
    activation_maps: int = Field(ge=0, le=64)


class EvaluateStageParams(StageParams):
    """What the evaluate stage reads (train.precision: evaluation runs in the precision training used)."""

    base: BaseParams
    train: TrainParams
    evaluate: EvaluateParams
