"""The model and data set tables: adding a model is one table entry plus its network, and every data set in
the table has its fetch and decode functions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_fashion_like, real_params
from torch import nn

from imgcls import datasets
from imgcls.datasets import DATASETS
from imgcls.download.sources import FETCHERS
from imgcls.download.stage import download
from imgcls.errors import ParamsError
from imgcls.evaluate.stage import evaluate
from imgcls.model.checkpoint import load_checkpoint
from imgcls.model.networks import Network, Normalize
from imgcls.model.registry import MODELS, ModelSpec
from imgcls.paths import ProjectPaths
from imgcls.preprocess.decode import DECODERS
from imgcls.preprocess.stage import preprocess
from imgcls.train.stage import train


class PixelLinear(Network):
    """A throwaway model: one linear layer over the pixels."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.head = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalize(x).flatten(1))


@pytest.fixture
def pixel_linear(monkeypatch):
    """The whole of adding a model: its network above, and this one entry in the table."""
    spec = ModelSpec(lambda width, whiten_bias_epochs, **a: PixelLinear(**a), min_image_size=4)
    monkeypatch.setitem(MODELS, "pixel_linear", spec)
    return spec


def test_a_model_added_to_the_table_is_validated_trained_evaluated_and_reloaded(pixel_linear, tmp_path, monkeypatch):
    source = tmp_path / "fashion"
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", make_fashion_like(source, n_train=300, n_test=100))
    project = tmp_path / "project"
    project.mkdir()
    paths = ProjectPaths(project)
    params = real_params(
        data={"source": str(source)},
        train={"model": "pixel_linear", "epochs": 2, "min_steps": 200, "batch_size": 32, "compile": False},
        evaluate={"tta": False, "misclassified_images": 0},
    )
    for stage in (download, preprocess, train, evaluate):
        stage(params, paths)
    model, checkpoint = load_checkpoint(paths.checkpoint)
    assert isinstance(model, PixelLinear) and checkpoint["architecture"] == "pixel_linear"
    accuracy = json.loads((paths.metrics_dir / "eval.json").read_text())["test"]["accuracy"]
    # make_fashion_like's classes are bands of pixels: 200 steps of a linear model on 300 images score 0.46 on
    # the 100 test images (95% interval 0.37..0.56), far above chance (0.10)
    assert accuracy > 0.25


def test_params_take_exactly_the_registered_models(pixel_linear):
    assert real_params(train={"model": "pixel_linear"}).train.model == "pixel_linear"
    with pytest.raises(ParamsError, match="train.model = 'pixel_linearr' is not allowed; expected one of"):
        real_params(train={"model": "pixel_linearr"})
    with pytest.raises(ParamsError, match="needs images of at least 64x64"):
        MODELS["pixel_linear"] = ModelSpec(pixel_linear.build, min_image_size=64)
        real_params(train={"model": "pixel_linear"})


def test_every_data_set_in_the_table_can_be_fetched_and_decoded():
    assert set(FETCHERS) == set(DATASETS), "download/sources.py FETCHERS must have one entry per data set"
    assert set(DECODERS) == set(DATASETS), "preprocess/decode.py DECODERS must have one entry per data set"


def test_params_take_exactly_the_registered_data_sets():
    with pytest.raises(ParamsError, match="data.dataset = 'cifar100' is not allowed; expected one of"):
        real_params(data={"dataset": "cifar100"})
