"""The model table: the one place that says which models exist, how each trains, and what else the pipeline
knows about it.

Adding a model is one ``ModelSpec`` entry in ``MODELS`` plus its network (an ``nn.Module`` subclass of
``Network``, usually in networks.py) and the ``Recipe`` it trains well with. params validate ``train.model``
against this table, the train keys left at ``auto`` take the model's recipe, checkpoints are rebuilt from it,
and tests/test_models_training.py builds, checks and trains every entry. Any other torchvision
classification network is available by its torchvision name (``torchvision_spec``), with the torchvision
recipe.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .networks import ConvNet, LeNet, Network, TorchvisionNet, TutorialCNN

# (width, whiten_bias_epochs, in_channels=, num_classes=, image_size=, mean=, std=) -> the network
Builder = Callable[..., Network]


@dataclass(frozen=True)
class Recipe:
    """How a model trains well: the values the train keys set to ``auto`` take (params.yaml overrides any of
    them). ``lr`` is the rate at batch 256 for a mean loss and scales linearly with the batch, as train.lr."""

    optimizer: str  # sgd | adamw
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    bias_lr_scale: float  # rate multiplier for BatchNorm biases
    label_smoothing: float
    schedule: str  # constant | cosine | linear
    warmup_epochs: float
    ema: float  # lookahead EMA decay per step (0 = off)
    # BatchNorm statistics recomputed from training images, with the weights as they are, before each
    # validation and at the end (torch.optim.swa_utils.update_bn). Running statistics lag weights that
    # move fast; torchvision's networks update them at momentum 0.01, and a few hundred steps of a small
    # data set leave them describing a network that no longer exists: eval-mode outputs collapse to one
    # class while training accuracy climbs (mobilenet_v3_small: 0.97 training, 0.50 validation).
    recompute_batchnorm: bool
    # train.augment.translate's auto below 64 pixels (params/train.py augmentation_defaults): random shift, pixels
    small_image_translate: int = 2


# airbench94's recipe (Keller Jordan), converted to this pipeline's conventions (see bench/recipes.yaml):
# high rate, BatchNorm biases at 64x, label smoothing 0.2, lookahead. Made for the fast network only.
FAST_RECIPE = Recipe(
    optimizer="sgd",
    lr=0.375,
    momentum=0.85,
    nesterov=True,
    weight_decay=0.00133,
    bias_lr_scale=64.0,
    label_smoothing=0.2,
    schedule="linear",
    warmup_epochs=1.0,
    ema=0.95,
    recompute_batchnorm=False,
)
# fast_lite: the fast recipe with half the label smoothing and a 1-pixel shift. Issue 25's search
# (docs/performance.md): in the tutorial's time budget the network underfits rather than overfits (training
# accuracy ~ test accuracy), and label smoothing 0.1 with translate 1 beat 0.2 with translate 2 (fast, width 16,
# 10 epochs, no validation split: 93.91% against 93.45%, one seed each).
FAST_LITE_RECIPE = dataclasses.replace(FAST_RECIPE, label_smoothing=0.1, small_image_translate=1)
# The small classic networks (lenet, tutorial_cnn, convnet): AdamW. Two of them have no BatchNorm, and SGD at
# lr 0.1 (0.2 at batch 512) left tutorial_cnn a constant classifier (0.101) and lenet at 0.276 on 5,000
# CIFAR-10 images in 200 steps; AdamW at 0.001 scored 0.479 / 0.550 / 0.708 (lenet / tutorial_cnn /
# convnet, one seed each, bench/photos.py's CIFAR-10 subset).
SMALL_CNN_RECIPE = Recipe(
    optimizer="adamw",
    lr=0.001,
    momentum=0.9,  # unused by AdamW
    nesterov=True,  # unused by AdamW
    weight_decay=0.05,
    bias_lr_scale=1.0,
    label_smoothing=0.1,
    schedule="cosine",
    warmup_epochs=0.5,
    ema=0.0,
    recompute_batchnorm=True,
)
# torchvision's ImageNet networks (references/classification: SGD, momentum 0.9, cosine, label smoothing
# 0.1, weight decay 1e-4 to 5e-5), with the BatchNorm statistics recomputed (see Recipe).
TORCHVISION_RECIPE = Recipe(
    optimizer="sgd",
    lr=0.2,
    momentum=0.9,
    nesterov=True,
    weight_decay=0.00005,
    bias_lr_scale=1.0,
    label_smoothing=0.1,
    schedule="cosine",
    warmup_epochs=1.0,
    ema=0.0,
    recompute_batchnorm=True,
)


@dataclass(frozen=True)
class ModelSpec:
    """One registered model."""

    build: Builder
    # The smallest input side (pixels) its layers take: validation refuses smaller images before any stage
    # runs; tests/test_models_training.py checks each value against the layers.
    min_image_size: int
    # torchvision ImageNet networks: the classifier submodule replaced for our classes. train.pretrained
    # (torchvision's weights) applies only to them, and they always see three channels.
    torchvision_head: str | None = None
    takes_width: bool = False  # train.width sets its channel counts (the others have fixed widths)
    recipe: Recipe = SMALL_CNN_RECIPE

    @property
    def torchvision(self) -> bool:
        return self.torchvision_head is not None


def _torchvision(architecture: str, head: str, min_image_size: int = 16) -> ModelSpec:
    # torchvision's ImageNet networks take any size (adaptive pooling) but halve it five times: at 16 pixels
    # their last two stages see a single pixel, below that more of them would (a floor we set, not a layer's
    # limit). Their ImageNet weights were trained on 224-pixel crops: larger images suit them better.
    def build(width: int, whiten_bias_epochs: float, **arguments: Any) -> Network:
        return TorchvisionNet(architecture, head, **arguments)

    return ModelSpec(build, min_image_size=min_image_size, torchvision_head=head, recipe=TORCHVISION_RECIPE)


MODELS: dict[str, ModelSpec] = {
    # the PyTorch tutorial's LeNet: two (5x5 valid conv, 2x2 pool) steps must leave a pixel: 16 -> 12 -> 6 -> 2 -> 1
    "lenet": ModelSpec(lambda width, whiten_bias_epochs, **a: LeNet(**a), min_image_size=16),
    "tutorial_cnn": ModelSpec(lambda width, whiten_bias_epochs, **a: TutorialCNN(**a), min_image_size=8),  # 3 pools
    "convnet": ModelSpec(  # three 2x2 pools
        lambda width, whiten_bias_epochs, **a: ConvNet(**a, widths=(width, 2 * width, 4 * width), fast=False),
        min_image_size=8,
        takes_width=True,
    ),
    "fast": ModelSpec(  # the 2x2 valid whitening stem loses a pixel, then three 2x2 pools
        lambda width, whiten_bias_epochs, **a: ConvNet(
            **a, widths=(width, 4 * width, 4 * width), fast=True, whiten_bias_epochs=whiten_bias_epochs
        ),
        min_image_size=9,
        takes_width=True,
        recipe=FAST_RECIPE,
    ),
    # The default. Issue 25's search winner: the fast network's blocks with a narrow first group (the
    # 27-pixel maps of Fashion-MNIST, whose cost is mostly memory traffic) and 6x wider later groups (small maps,
    # where the matrix units are busy): width/6x/6x channels (16/96/96 at train.width 16).
    "fast_lite": ModelSpec(
        lambda width, whiten_bias_epochs, **a: ConvNet(
            **a, widths=(width, 6 * width, 6 * width), fast=True, whiten_bias_epochs=whiten_bias_epochs
        ),
        min_image_size=9,
        takes_width=True,
        recipe=FAST_LITE_RECIPE,
    ),
    "resnet18": _torchvision("resnet18", head="fc"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", head="classifier.3"),
}


# torchvision classification networks left out: in training mode they return auxiliary logits as well
# (a tuple), which no loss here takes. params name them when refusing them.
TORCHVISION_EXCLUDED = ("googlenet", "inception_v3")


@functools.cache
def torchvision_models() -> tuple[str, ...]:
    """torchvision's classification networks (its registry), less TORCHVISION_EXCLUDED."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(name for name in names if name not in TORCHVISION_EXCLUDED)


@functools.cache
def torchvision_spec(architecture: str) -> ModelSpec:
    """A torchvision classification network by its torchvision name, its classifier found by building it on
    the meta device (no memory, no weights): the last layer with 1,000 outputs (ImageNet's classes; regnet_*,
    which cannot be built there, have theirs at fc). Its input floor is 32 pixels (five halvings leave one);
    networks with a fixed input size (vit_*) are refused with torch's message when the train stage tries its
    first batch."""
    import torch
    import torchvision

    if architecture.startswith("regnet_"):  # widths computed with tensors: no meta build; its head is fc
        return _torchvision(architecture, head="fc", min_image_size=32)
    with torch.device("meta"):
        network = torchvision.models.get_model(architecture, weights=None)
    heads = [
        name
        for name, module in network.named_modules()
        if getattr(module, "out_features", None) == 1000 or getattr(module, "out_channels", None) == 1000
    ]
    return _torchvision(architecture, head=heads[-1], min_image_size=32)


def is_model(name: str) -> bool:
    """A name train.model takes: a registered model, or a torchvision classification network."""
    return name in MODELS or name in torchvision_models()


def model_spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if name in torchvision_models():
        return torchvision_spec(name)
    raise ValueError(
        f"unknown model {name!r}; registered: {', '.join(MODELS)}, or any torchvision classification network"
    )


def build_model(name: str, *, width: int = 32, whiten_bias_epochs: float = 0.0, **arguments: Any) -> Network:
    """Build a registered model; the keyword arguments are what the checkpoint stores to rebuild it.
    ``arguments``: in_channels, num_classes, image_size, mean, std. Models without ``takes_width`` ignore
    ``width``."""
    return model_spec(name).build(width, whiten_bias_epochs, **arguments)


def normalized_channels(architecture: str, in_channels: int) -> int:
    """How many mean/std values a model's normalization holds: torchvision networks always see RGB."""
    return 3 if model_spec(architecture).torchvision else in_channels
