"""params.yaml ``evaluate``: how the test split is scored."""

from __future__ import annotations

from pydantic import Field

from .base import BaseParams
from .core import Section, StageParams, TTALevel
from .train import TrainParams


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
