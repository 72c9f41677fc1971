"""The model table: the one place that says which models exist and what the pipeline knows about each.

Adding a model is one ``ModelSpec`` entry in ``MODELS`` plus its network (an ``nn.Module`` subclass of
``Network``, usually in networks.py). params validate ``train.model`` against this table, checkpoints are
rebuilt from it, and tests/test_models_training.py builds, checks and trains every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .networks import ConvNet, LeNet, Network, TorchvisionNet, TutorialCNN

# (width, whiten_bias_epochs, in_channels=, num_classes=, image_size=, mean=, std=) -> the network
Builder = Callable[..., Network]


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

    @property
    def torchvision(self) -> bool:
        return self.torchvision_head is not None


def _torchvision(architecture: str, head: str) -> ModelSpec:
    # torchvision's ImageNet networks take any size (adaptive pooling) but halve it five times: at 16 pixels
    # their last two stages see a single pixel, below that more of them would (a floor we set, not a layer's
    # limit). Their ImageNet weights were trained on 224-pixel crops: larger images suit them better.
    def build(width: int, whiten_bias_epochs: float, **arguments: Any) -> Network:
        return TorchvisionNet(architecture, head, **arguments)

    return ModelSpec(build, min_image_size=16, torchvision_head=head)


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
    ),
    "resnet18": _torchvision("resnet18", head="fc"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", head="classifier.3"),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, *, width: int = 32, whiten_bias_epochs: float = 0.0, **arguments: Any) -> Network:
    """Build a registered model; the keyword arguments are what the checkpoint stores to rebuild it.
    ``arguments``: in_channels, num_classes, image_size, mean, std. Models without ``takes_width`` ignore
    ``width``."""
    return model_spec(name).build(width, whiten_bias_epochs, **arguments)


def normalized_channels(architecture: str, in_channels: int) -> int:
    """How many mean/std values a model's normalization holds: torchvision networks always see RGB."""
    return 3 if model_spec(architecture).torchvision else in_channels
