"""Warnings while a run trains: the model that predicts one class for everything (collapse), and validation
that stays at chance while training accuracy climbs. Both cost a user a whole run when nothing says so;
both name the params most likely behind them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..params.train import TrainParams
from ..stats import PredictionSpread

CONSTANT_EPOCHS = 2  # a constant classifier this many epochs in a row is reported (an untrained one often is)
CHANCE_EPOCHS = 3  # validation at chance this many epochs in a row (training learning meanwhile) is reported
CHANCE_MARGIN = 0.05  # "at chance": validation accuracy at most chance + this
LEARNING_MARGIN = 0.15  # "training learns": training accuracy at least chance + this


def is_constant(record: dict) -> bool:
    """Whether an epoch record's validation predictions are a constant classifier's."""
    spread = PredictionSpread(
        record["val_images"],
        record["val_top_class"],
        record["val_top_share"],
        record["val_top_true_share"],
        record["val_chance"],
    )
    return spread.constant


def likely_causes(config: TrainParams, batch_size: int) -> str:
    """The params most often behind a collapsed or stuck run, with this run's values."""
    causes = [f"train.lr ({config.lr} at batch 256, so {config.lr * batch_size / 256:.4g} at this run's {batch_size})"]
    if not config.recompute_batchnorm:
        causes.append("train.recompute_batchnorm (false: BatchNorm statistics that lag fast-moving weights)")
    causes += [
        f"train.label_smoothing ({config.label_smoothing})",
        f"train.model ({config.model}: too many weights for the images, or a recipe not made for it: set the "
        "recipe keys to auto)",
    ]
    return "; ".join(causes)


@dataclass
class TrainingWatch:
    """Fed each epoch record (after the console line); says once what looks wrong. The records' validation
    fields come from epoch_record: val_accuracy, val_top_class, val_top_share, val_top_true_share, val_chance,
    val_images (numbers only: records go into resume states, which hold numbers)."""

    config: TrainParams
    batch_size: int
    class_names: list[str]
    emit: Callable[[str], None]
    at_chance: int = 0
    constant: int = 0
    said: set[str] = field(default_factory=set)
    last: dict | None = None

    def __call__(self, record: dict) -> None:
        if "val_top_share" not in record:
            return
        self.last = record
        name = self.class_names[record["val_top_class"]]
        self.constant = self.constant + 1 if is_constant(record) else 0
        if self.constant == CONSTANT_EPOCHS and "constant" not in self.said:
            self.said.add("constant")
            self.emit(
                f"warning: epoch {record['epoch']}: the model predicts {name!r} for "
                f"{record['val_top_share']:.0%} of the validation images ({record['val_top_true_share']:.0%} are "
                f"{name!r}) while training accuracy is {record['train_accuracy']:.2f}: a constant classifier. "
                f"Likely causes: {likely_causes(self.config, self.batch_size)}"
            )
        learning = record["train_accuracy"] >= record["val_chance"] + LEARNING_MARGIN
        stuck = record["val_accuracy"] <= record["val_chance"] + CHANCE_MARGIN
        self.at_chance = self.at_chance + 1 if stuck and learning else 0
        if self.at_chance == CHANCE_EPOCHS and "chance" not in self.said:
            self.said.add("chance")
            self.emit(
                f"warning: validation accuracy has stayed at chance ({record['val_chance']:.2f}: always answering "
                f"the most common class) for {CHANCE_EPOCHS} epochs while training accuracy reached "
                f"{record['train_accuracy']:.2f}: the model learns the training images, not the classes. Likely "
                f"causes: {likely_causes(self.config, self.batch_size)}"
            )

    def final_warning(self) -> str | None:
        """After the run: the trained model's verdict on the validation split, if it is a constant classifier."""
        if self.last is None or not is_constant(self.last):
            return None
        return (
            f"warning: the trained model predicts {self.class_names[self.last['val_top_class']]!r} for "
            f"{self.last['val_top_share']:.0%} of the validation images: it is a constant classifier and its "
            "test accuracy will be chance; see the likely causes above"
        )
