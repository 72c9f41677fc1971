"""The whole params.yaml: every section, checked by the validate stage (first in dvc.yaml) and by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from . import core
from .audit import AuditParams, check_audit
from .base import BaseParams
from .core import StageParams
from .data import DataParams, check_data
from .evaluate import EvaluateParams
from .export import ExportParams
from .preprocess import PreprocessParams
from .train import TrainParams, check_train, check_train_with


class Params(StageParams):
    """Every section; unknown sections are errors here (a typo such as ``trian:``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    base: BaseParams
    data: DataParams
    preprocess: PreprocessParams
    audit: AuditParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams

    def check(self) -> None:
        check_data(self.data)
        check_train(self.train)
        check_train_with(self.base, self.data, self.train)
        check_audit(self.audit)


def parse_params(raw: Any) -> Params:
    """Validate a whole parsed params file."""
    return core.parse_params(raw, Params)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file."""
    return core.load_params(path, Params)
