"""params.yaml ``export``: ONNX/TorchScript export, parity checks and the int8 model."""

from __future__ import annotations

from pydantic import Field

from .base import BaseParams
from .core import Section, StageParams, TTALevel


class ExportParams(Section):
    parity_images: int = Field(ge=1, le=100000)
    parity_atol: float = Field(gt=0, le=1)
    latency_calls: int = Field(
        ge=200, le=100000, description="200..100000 (the median needs enough calls to be stable)"
    )
    opset: int = Field(ge=13, le=21)
    tta: TTALevel
    int8_max_drop: float = Field(ge=0, le=100, description="0..100 (percentage points of test accuracy)")
    int8_calibration_images: int = Field(ge=1, le=100000)


class ExportStageParams(StageParams):
    """What the export stage reads."""

    base: BaseParams
    export: ExportParams
