"""What the label_errors stage reads: its audit keys, and the train keys its folds train with."""

from __future__ import annotations

from .audit import AuditParams, check_audit
from .base import BaseParams
from .core import StageParams
from .data import DataParams, check_data
from .train import TrainParams, check_train, check_train_with


class LabelErrorsStageParams(StageParams):
    """What the label_errors stage reads: the folds train train.model with train's recipe."""

    base: BaseParams
    data: DataParams
    train: TrainParams
    audit: AuditParams

    def check(self) -> None:
        check_data(self.data)
        check_train(self.train)
        check_train_with(self.base, self.data, self.train)
        check_audit(self.audit)
