"""params.yaml ``train``: the model, its starting weights and the recipe. ``train.model`` is checked
against the model table (model/registry.py), which holds every fact about a model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..errors import ParamsError
from ..model.registry import MODELS
from .base import BaseParams
from .core import URL_SCHEME, Section, StageParams, show
from .data import DataParams, check_data, input_size


class AugmentParams(Section):
    flip: bool
    alternate_flip: bool  # flip a fixed random half in even epochs, the other half in odd ones (airbench)
    translate: int = Field(ge=0, le=8)


class TrainParams(Section):
    model: str = Field(description=f"one of {', '.join(map(repr, MODELS))}")
    # none | imagenet (torchvision's weights: torch's cache, else downloaded) | path to torchvision's .pth file
    pretrained: str = Field(min_length=1, description="none, imagenet or the path of a torchvision weights file")
    init_from: str = Field(min_length=1, description="none or the path of a checkpoint.pt this pipeline wrote")
    # Checkpoints and .pth files are pickles: torch reads them with its restricted weights_only loader, but the
    # format was made to run code, so a file that is not torchvision's published one loads only when trusted.
    trust_weights_file: bool
    backbone_lr_scale: float = Field(gt=0, le=1)  # rate multiplier for loaded (pretrained) weights
    freeze_backbone_epochs: int = Field(ge=0, le=1000)  # loaded weights stay fixed this many epochs
    width: int = Field(ge=8, le=256)
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=65536)
    min_batches_per_epoch: int = Field(ge=1, le=10000)  # the batch is cut so an epoch has at least this many
    min_steps: int = Field(ge=0, le=1000000)  # epochs are raised so the run has at least this many steps
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0, lt=1)
    bias_lr_scale: float = Field(gt=0, le=1000)
    label_smoothing: float = Field(ge=0, lt=1)
    schedule: Literal["constant", "cosine", "linear"]
    warmup_epochs: float = Field(ge=0, le=1000)  # a warm-up longer than the run ends with the run
    ema: float = Field(ge=0, lt=1)
    whiten_bias_epochs: float = Field(ge=0, le=1000)  # longer than the run: the bias trains throughout
    augment: AugmentParams
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool
    log_images: int = Field(ge=0, le=1024)
    in_memory: Literal["auto", "always", "never"]
    processes: int = Field(ge=1, le=256)  # data-parallel processes on this machine (torchrun); 1 = one plain process
    sync_batchnorm: bool  # with several processes on CUDA: BatchNorm statistics over the whole global batch

    @field_validator("model")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError("not a registered model")
        return value


def check_train(train: TrainParams) -> None:
    """Rules across the train section's keys."""
    for key in ("pretrained", "init_from"):
        value = getattr(train, key)
        if URL_SCHEME.match(value):  # a path is opened as given: "https://x" would become the folder "https:/x"
            raise ParamsError(
                f"params: train.{key} = {show(value)} is a URL, but it takes a file's path: download "
                f"the file (curl -LO <URL>) and set train.{key} to where it is"
            )
    torchvision = [name for name, spec in MODELS.items() if spec.torchvision]
    if train.pretrained != "none" and train.model not in torchvision:
        raise ParamsError(
            f"params: train.pretrained = {show(train.pretrained)} loads torchvision's ImageNet weights, "
            f"which exist for {', '.join(torchvision)}, not for train.model = {train.model!r}; set "
            "train.pretrained: none, or start from a checkpoint of your own with train.init_from"
        )
    if train.pretrained != "none" and train.init_from != "none":
        raise ParamsError("params: train.pretrained and train.init_from both name starting weights; set one to none")
    if train.init_from != "none" and not train.trust_weights_file:
        raise ParamsError(
            f"params: train.init_from = {show(train.init_from)} names a checkpoint, a pickle-format file "
            "(read through torch's restricted weights_only loader, but pickle is a format made to run "
            "code); set train.trust_weights_file: true if you or someone you trust wrote it"
        )
    if train.freeze_backbone_epochs and train.pretrained == "none" and train.init_from == "none":
        raise ParamsError(
            f"params: train.freeze_backbone_epochs = {train.freeze_backbone_epochs} freezes weights loaded "
            "by train.pretrained or train.init_from, and both are none; set it to 0 or name the weights"
        )


def check_train_with(base: BaseParams, data: DataParams, train: TrainParams) -> None:
    """Rules between the train section and the base and data sections."""
    if train.processes > 1 and ":" in base.device:
        raise ParamsError(
            f"params: base.device = {base.device!r} names one GPU, but train.processes = "
            f"{train.processes} gives each process the GPU of its local rank; set base.device: cuda or auto"
        )
    size, smallest = input_size(data), MODELS[train.model].min_image_size
    if size < smallest:
        where = "data.image_size" if data.dataset == "imagefolder" else f"{data.dataset}'s image size"
        raise ParamsError(
            f"params: train.model = {train.model!r} needs images of at least {smallest}x{smallest} "
            f"pixels, but {where} is {size}; raise data.image_size or choose another train.model"
        )


class TrainStageParams(StageParams):
    """What the train stage reads."""

    base: BaseParams
    data: DataParams
    train: TrainParams

    def check(self) -> None:
        check_data(self.data)
        check_train(self.train)
        check_train_with(self.base, self.data, self.train)
