"""params.yaml ``train``: the model, its starting weights and the recipe. ``train.model`` is checked
against the model table (model/registry.py), which holds every fact about a model, the recipe it trains well
with included: a recipe key set to ``auto`` takes the model's value (``with_recipe``), any other value is the
user's. The augmentation keys at ``auto`` follow the image size (``augmentation_defaults``)."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Literal

from pydantic import Field, field_validator

from ..errors import ParamsError
from ..model.registry import MODELS, TORCHVISION_EXCLUDED, Recipe, is_model, model_spec
from .base import BaseParams
from .core import URL_SCHEME, Section, StageParams, StageParamsT, show
from .data import DataParams, check_data, input_size

Auto = Literal["auto"]  # the model's recipe (or, for augmentation, what the image size suggests)
# The train keys a recipe fills (small_image_translate fills train.augment.translate's auto instead)
RECIPE_KEYS = tuple(field.name for field in fields(Recipe) if field.name != "small_image_translate")
# From this side up images are photos rather than thumbnails: random resized crops, colour jitter and an
# automatic policy help them; at 32 pixels (CIFAR-10, Fashion-MNIST) a flip and a 2-pixel shift do best.
PHOTO_IMAGE_SIZE = 64


class AugmentParams(Section):
    flip: bool
    alternate_flip: bool  # flip a fixed random half in even epochs, the other half in odd ones (airbench)
    translate: Annotated[int, Field(ge=0, le=8)] | Auto
    crop_scale: Annotated[float, Field(gt=0, le=1)] | Auto  # random resized crop: least area share (1 = off)
    color_jitter: Annotated[float, Field(ge=0, le=1)] | Auto  # brightness/contrast/saturation (0 = off)
    policy: Literal["auto", "none", "trivialaugment", "randaugment"]
    mixup: float = Field(ge=0, le=10)  # Beta(alpha, alpha) of mixup (0 = off)
    cutmix: float = Field(ge=0, le=10)  # Beta(alpha, alpha) of cutmix (0 = off)


def augmentation_defaults(image_size: int, small_image_translate: int = 2) -> dict:
    """What train.augment's ``auto`` keys become for images of this side (``small_image_translate``: the
    model's recipe's shift below PHOTO_IMAGE_SIZE)."""
    if image_size < PHOTO_IMAGE_SIZE:
        return {"translate": small_image_translate, "crop_scale": 1.0, "color_jitter": 0.0, "policy": "none"}
    # The random resized crop moves and scales the image itself: no shift on top. No automatic policy by
    # default: per image it runs at 0.28x the flip-and-shift path at 64 px (bench/results/augment.json) and,
    # on the 244-image cat/dog set at 64 px, it scored 0.53 against 0.65 without it (one seed, 200 steps).
    return {"translate": 0, "crop_scale": 0.35, "color_jitter": 0.3, "policy": "none"}


class TrainParams(Section):
    model: str = Field(
        description=f"one of {', '.join(map(repr, MODELS))} or a torchvision classification network's name "
        f"(torchvision.models.list_models(); not {' or '.join(TORCHVISION_EXCLUDED)}, whose training output "
        "carries auxiliary logits)"
    )
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
    # The recipe: auto takes the model's (model/registry.py), a value overrides it.
    optimizer: Literal["auto", "sgd", "adamw"]
    lr: Annotated[float, Field(gt=0, le=10)] | Auto
    momentum: Annotated[float, Field(ge=0, lt=1)] | Auto
    nesterov: bool | Auto
    weight_decay: Annotated[float, Field(ge=0, lt=1)] | Auto
    bias_lr_scale: Annotated[float, Field(gt=0, le=1000)] | Auto
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] | Auto
    schedule: Literal["auto", "constant", "cosine", "linear"]
    warmup_epochs: Annotated[float, Field(ge=0, le=1000)] | Auto  # a warm-up longer than the run ends with it
    ema: Annotated[float, Field(ge=0, lt=1)] | Auto
    recompute_batchnorm: bool | Auto  # BatchNorm statistics recomputed before each validation and at the end
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
        if not is_model(value):
            raise ValueError("not a registered model")
        return value


def with_recipe(train: TrainParams, image_size: int) -> TrainParams:
    """``train`` with every ``auto`` replaced: the recipe keys by the model's recipe, the augmentation keys by
    what ``image_size`` suggests (small images: the shift of the model's recipe)."""
    recipe = model_spec(train.model).recipe
    update = {key: getattr(recipe, key) for key in RECIPE_KEYS if getattr(train, key) == "auto"}
    defaults = augmentation_defaults(image_size, recipe.small_image_translate)
    augment = {key: value for key, value in defaults.items() if getattr(train.augment, key) == "auto"}
    return train.model_copy(update={**update, "augment": train.augment.model_copy(update=augment)})


def describe_recipe(train: TrainParams, resolved: TrainParams) -> str:
    """One line: every recipe and augmentation value the run uses, marking those params.yaml set."""

    def show_value(key: str, given: object, used: object) -> str:
        return f"{key} {used}" + ("" if given == "auto" else " (set)")

    recipe = [show_value(key, getattr(train, key), getattr(resolved, key)) for key in RECIPE_KEYS]
    augment = [
        show_value(key, getattr(train.augment, key), getattr(resolved.augment, key))
        for key in augmentation_defaults(PHOTO_IMAGE_SIZE)
    ]
    kept = [f"{key} {getattr(resolved.augment, key)}" for key in ("flip", "alternate_flip", "mixup", "cutmix")]
    return (
        f"recipe: {train.model}'s where params.yaml says auto, else (set): {', '.join(recipe)}; augmentation: "
        f"{', '.join(augment + kept)}"
    )


def check_train(train: TrainParams) -> None:
    """Rules across the train section's keys."""
    for key in ("pretrained", "init_from"):
        value = getattr(train, key)
        if URL_SCHEME.match(value):  # a path is opened as given: "https://x" would become the folder "https:/x"
            raise ParamsError(
                f"params: train.{key} = {show(value)} is a URL, but it takes a file's path: download "
                f"the file (curl -LO <URL>) and set train.{key} to where it is"
            )
    if train.pretrained != "none" and not model_spec(train.model).torchvision:
        torchvision = [name for name, spec in MODELS.items() if spec.torchvision]
        raise ParamsError(
            f"params: train.pretrained = {show(train.pretrained)} loads torchvision's ImageNet weights, "
            f"which exist for torchvision's networks ({', '.join(torchvision)}, ...), not for train.model = "
            f"{train.model!r}; set "
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
    size, smallest = input_size(data), model_spec(train.model).min_image_size
    if size < smallest:
        where = "data.image_size" if data.dataset == "imagefolder" else f"{data.dataset}'s image size"
        advice = "raise data.image_size or choose" if data.dataset == "imagefolder" else "choose"
        raise ParamsError(
            f"params: train.model = {train.model!r} needs images of at least {smallest}x{smallest} "
            f"pixels, but {where} is {size}; {advice} another train.model"
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

    def with_recipe(self) -> TrainStageParams:
        return params_with_recipe(self)


def params_with_recipe(params: StageParamsT) -> StageParamsT:
    """Params (any with data and train sections) with train's ``auto`` keys resolved for the model and the
    image size."""
    return params.model_copy(update={"train": with_recipe(params.train, input_size(params.data))})
