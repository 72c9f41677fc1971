"""params.yaml ``audit``: what the duplicates and label_errors stages look for (docs/know-your-data.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import ParamsError
from .core import Section, StageParams
from .data import DataParams


class AuditParams(Section):
    # Near duplicates: perceptual hashes (63 bits) at most duplicates_max_distance bits apart whose 16 x 16
    # thumbnails correlate at least duplicates_min_correlation; exact copies (the same pixels) are always
    # paired. imgcls.audit.duplicates documents how the defaults were calibrated.
    near_duplicates: Literal["auto", "on", "off"]  # auto: on, except for data sets where look-alikes are no copies
    duplicates_max_distance: int = Field(ge=0, le=32)
    duplicates_min_correlation: float = Field(ge=0, le=1)
    duplicate_pairs_drawn: int = Field(ge=0, le=64)
    label_folds: int = Field(ge=0, le=20, description="0 (off) or 2..20")  # cross-validation folds
    label_epochs: int = Field(ge=1, le=1000)  # epochs of each fold's model
    label_suspects_drawn: int = Field(ge=0, le=100)


class DuplicatesStageParams(StageParams):
    """What the duplicates stage reads (data.dataset: whether near duplicates mean copies there)."""

    data: DataParams
    audit: AuditParams


def check_audit(audit: AuditParams) -> None:
    if audit.label_folds == 1:
        raise ParamsError(
            "audit.label_folds = 1: cross-validation needs at least 2 folds (each image scored by a model that "
            "never saw it); 0 turns the label-error search off"
        )
