"""Recipes that follow the model (model/registry.py), any torchvision network by name, and the collapse
warnings: a model that predicts one class for everything is caught in the train log, eval.json and the card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import committed_params_raw, merge, real_params
from test_transfer import project

from imgcls.deploy.card import results_section
from imgcls.errors import ParamsError
from imgcls.evaluate.stage import evaluate
from imgcls.model.registry import FAST_RECIPE, MODELS, TORCHVISION_RECIPE, model_spec, torchvision_spec
from imgcls.params.core import parse_params
from imgcls.params.train import TrainStageParams, augmentation_defaults, describe_recipe
from imgcls.stats import prediction_spread
from imgcls.train.stage import train
from imgcls.train.watch import CHANCE_EPOCHS, CONSTANT_EPOCHS, TrainingWatch

PHOTOS = {"dataset": "imagefolder", "source": "photos", "image_size": 96}


def resolved(data: dict | None = None, **train_keys):
    """The committed params (recipe keys auto) with these changes, parsed but not resolved."""
    return parse_params(merge(committed_params_raw(), {"data": data or {}, "train": train_keys}), TrainStageParams)


def test_auto_keys_take_the_models_recipe_and_set_keys_win():
    params = resolved()  # committed params: fast_lite, every recipe key auto
    assert params.train.lr == "auto"
    lite = params.with_recipe().train
    assert (lite.optimizer, lite.lr, lite.bias_lr_scale, lite.ema, lite.label_smoothing) == (
        "sgd",
        0.375,
        64.0,
        0.95,
        0.1,
    )
    fast = resolved(model="fast").with_recipe().train
    assert (fast.optimizer, fast.lr, fast.bias_lr_scale, fast.ema, fast.label_smoothing) == (
        "sgd",
        0.375,
        64.0,
        0.95,
        0.2,
    )
    assert fast.recompute_batchnorm is FAST_RECIPE.recompute_batchnorm is False
    mobilenet = resolved(model="mobilenet_v3_small", label_smoothing=0.0).with_recipe().train
    assert mobilenet.lr == TORCHVISION_RECIPE.lr and mobilenet.bias_lr_scale == 1.0 and mobilenet.ema == 0.0
    assert mobilenet.recompute_batchnorm is True
    assert mobilenet.label_smoothing == 0.0  # set in params.yaml: kept, not the recipe's 0.1
    line = describe_recipe(resolved(model="mobilenet_v3_small", label_smoothing=0.0).train, mobilenet)
    assert "label_smoothing 0.0 (set)" in line and "lr 0.2," in line and "mobilenet_v3_small's" in line


def test_augmentation_defaults_follow_the_image_size():
    small = resolved().with_recipe().train.augment  # Fashion-MNIST: 28 px, fast_lite's 1-pixel shift
    assert (small.translate, small.crop_scale, small.color_jitter, small.policy) == (1, 1.0, 0.0, "none")
    assert resolved(model="fast").with_recipe().train.augment.translate == 2  # the other models' shift
    photos = resolved(data=PHOTOS).with_recipe().train.augment
    assert photos.crop_scale < 1 and photos.color_jitter > 0 and photos.policy == "none"
    assert photos.translate == 0
    assert augmentation_defaults(63)["crop_scale"] == 1.0 and augmentation_defaults(64)["crop_scale"] < 1
    kept = resolved(data=PHOTOS, augment={"policy": "randaugment"})
    assert kept.with_recipe().train.augment.policy == "randaugment"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lr", "fast", "train.lr"),
        ("lr", -1, "train.lr"),
        ("optimizer", "adam", "train.optimizer"),
        ("recompute_batchnorm", "yes", "train.recompute_batchnorm"),
        ("model", "googlenet", "train.model"),  # its training output is a tuple: refused
        ("model", "resnet9000", "train.model"),
    ],
)
def test_bad_recipe_values_are_refused_naming_the_key(key, value, expected):
    raw = committed_params_raw()
    raw["train"][key] = value
    with pytest.raises(ParamsError) as caught:
        parse_params(raw, TrainStageParams)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("efficientnet_b0", "classifier.1"),
        ("shufflenet_v2_x1_0", "fc"),
        ("regnet_x_400mf", "fc"),
        ("vgg11", "classifier.6"),
    ],
)
def test_any_torchvision_network_by_name(name, head):
    assert name not in MODELS
    spec = model_spec(name)
    assert spec.torchvision_head == head and spec.recipe == TORCHVISION_RECIPE and spec is torchvision_spec(name)
    assert resolved(data=PHOTOS, model=name).train.model == name


def test_prediction_spread_flags_a_constant_classifier():
    labels = np.arange(100) % 4
    constant = prediction_spread(np.zeros(100, dtype=np.int64), labels, 4)
    assert constant.constant and constant.top_share == 1.0 and constant.top_true_share == 0.25
    assert constant.chance == 0.25
    assert not prediction_spread(labels, labels, 4).constant
    # A class that really is 96% of the images may be predicted for all of them.
    skewed = np.where(np.arange(100) < 96, 0, 1)
    assert not prediction_spread(np.zeros(100, dtype=np.int64), skewed, 2).constant


def test_watch_says_collapse_and_chance_once_naming_the_params():
    lines = []
    config = resolved(model="mobilenet_v3_small", recompute_batchnorm=False).with_recipe().train
    watch = TrainingWatch(config, 27, ["cat", "dog"], lines.append)
    for epoch in range(1, 6):
        watch(
            {
                "epoch": epoch,
                "train_accuracy": 0.9,
                "val_accuracy": 0.5,
                "val_top_class": 0,
                "val_top_share": 1.0,
                "val_top_true_share": 0.5,
                "val_chance": 0.5,
                "val_images": 40,
            }
        )
    constant = [line for line in lines if "constant classifier" in line]
    chance = [line for line in lines if "stayed at chance" in line]
    assert len(constant) == 1 and f"epoch {CONSTANT_EPOCHS}" in constant[0] and "'cat' for 100%" in constant[0]
    assert len(chance) == 1 and f"for {CHANCE_EPOCHS} epochs" in chance[0]
    assert "train.recompute_batchnorm" in constant[0] and "train.lr (0.2 at batch 256" in constant[0]
    assert "constant classifier" in watch.final_warning()


def test_collapsed_model_is_flagged_by_the_stages(tmp_path, capsys):
    """mobilenet_v3_small with the BatchNorm statistics left to lag (recompute_batchnorm: false, the fast
    recipe's lookahead) predicts one class in eval mode: the train log says so; with the recipe's recompute
    the same run does not collapse. The evaluate stage flags the collapsed model in eval.json, the card too."""
    paths = project(tmp_path, "collapse", ["a", "b"], n_train=64, size=32, n_val=20, n_test=20)
    keys = {"model": "mobilenet_v3_small", "epochs": 3, "min_steps": 0, "batch_size": 16, "log_images": 0}
    train(real_params(train={**keys, "recompute_batchnorm": False, "ema": 0.95}), paths)
    log = capsys.readouterr().out
    assert "a constant classifier" in log and "train.recompute_batchnorm" in log
    evaluate(real_params(evaluate={"tta": False}), paths)
    verdict = json.loads((paths.metrics_dir / "eval.json").read_text())
    assert verdict["constant_classifier"] is True and verdict["most_predicted_share"] >= 0.95
    assert verdict["chance_accuracy"] == 0.5
    assert "a constant classifier" in capsys.readouterr().out
    confusion = np.array([[8, 0], [8, 0]])
    card = "\n".join(
        results_section(["a", "b"], confusion, {"test_accuracy": 0.5, "images": 16, "ci95": [0.28, 0.72]}, None)
    )
    assert "Warning: a constant classifier" in card

    train(real_params(train=keys), paths)  # the recipe: recompute_batchnorm auto (true for torchvision)
    assert "constant classifier" not in capsys.readouterr().out
    evaluate(real_params(evaluate={"tta": False}), paths)
    assert json.loads((paths.metrics_dir / "eval.json").read_text())["constant_classifier"] is False


CPU = torch.device("cpu")
PHOTO_AUGMENT = {"crop_scale": 0.4, "color_jitter": 0.3, "policy": "trivialaugment", "mixup": 0.2, "cutmix": 1.0}


def fit_photo(resume_from=None, save_state=None, should_stop=None):
    """Two epochs of convnet with every photo augmentation on (crop, jitter, policy, mixup/cutmix) and the
    BatchNorm statistics recomputed, on 256 tiny images."""
    from test_models_training import arguments, separable_data

    from imgcls import runtime
    from imgcls.model.registry import build_model
    from imgcls.train.loop import FitHooks, FitSetup, fit

    images, labels = separable_data()
    config = real_params(
        train={"model": "convnet", "width": 8, "epochs": 2, "min_steps": 0, "batch_size": 32, "augment": PHOTO_AUGMENT}
    ).train
    assert config.recompute_batchnorm is True and config.augment.policy == "trivialaugment"
    generator = runtime.seed_everything(0)
    model = build_model("convnet", **arguments(1, 12, classes=4, width=8))
    hooks = FitHooks(save_state=save_state, should_stop=should_stop or (lambda: False))
    fit(
        model,
        (images, labels),
        (images[:64], labels[:64]),
        FitSetup(config, CPU, "fp32"),
        generator,
        resume_from=resume_from,
        hooks=hooks,
    )
    return model.state_dict()


def test_photo_augmentation_runs_resume_bit_identical():
    """Stopped after its 11th step (mid-epoch 2) and resumed, a run with every photo augmentation ends with the
    weights and BatchNorm statistics of the uninterrupted run: every draw comes from the run's generator."""
    import copy
    import itertools

    from imgcls.train.loop import StopRequested

    straight = fit_photo()
    states, asked = [], itertools.count(1)
    with pytest.raises(StopRequested):
        fit_photo(save_state=lambda s: states.append(copy.deepcopy(s)), should_stop=lambda: next(asked) == 11)
    resumed = fit_photo(resume_from=states[-1])
    assert states[-1]["epoch_progress"] is not None  # stopped inside an epoch
    assert all(torch.equal(straight[name], value) for name, value in resumed.items())


def test_recompute_batchnorm_takes_full_batches_spread_over_the_classes():
    """A split of 28 images at batch 27 leaves one image over: a 1x1 BatchNorm cannot normalize one image,
    so only full batches run. The images are spread over the split, which is sorted by class."""
    from imgcls.model.registry import build_model
    from imgcls.train.batches import ResidentImages
    from imgcls.train.loop import FitSetup, recompute_batchnorm

    arguments = {"in_channels": 3, "num_classes": 2, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    model = build_model("resnet18", **arguments)
    images = torch.zeros((28, 3, 32, 32), dtype=torch.uint8)
    recompute_batchnorm(model, ResidentImages(images), 27, FitSetup(real_params().train, CPU, "fp32"))
    first = model.backbone.bn1
    assert int(first.num_batches_tracked) == 1 and torch.isfinite(first.running_var).all()
    # 4,000 images sorted by class (dark class 0, bright class 1): the statistics see both halves.
    model = build_model("convnet", **{**arguments, "width": 8})
    sorted_images = torch.cat([torch.zeros((2000, 3, 32, 32)), torch.full((2000, 3, 32, 32), 255.0)]).to(torch.uint8)
    recompute_batchnorm(model, ResidentImages(sorted_images), 256, FitSetup(real_params().train, CPU, "fp32"))
    model.eval()
    with torch.no_grad():  # a mean over both classes: neither image is far off it after normalization
        dark = model(torch.zeros((1, 3, 32, 32)).contiguous(memory_format=torch.channels_last))
        bright = model(torch.ones((1, 3, 32, 32)).contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(dark).all() and torch.isfinite(bright).all() and not torch.equal(dark, bright)


@pytest.mark.parametrize("architecture", ["vit_h_14", "regnet_y_128gf"])
def test_a_tiny_checkpoint_naming_a_huge_network_is_refused_before_building_it(tmp_path, architecture):
    """A model file is data: 1 KB naming a 600-million-weight network must not allocate gigabytes."""
    import resource
    import time

    from imgcls.errors import CheckpointError
    from imgcls.model.checkpoint import FORMAT_VERSION, load_checkpoint

    path = tmp_path / "hostile.pt"
    arguments = {"in_channels": 3, "num_classes": 100000, "image_size": 224, "mean": [0.5] * 3, "std": [0.2] * 3}
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "state_dict": {"x": torch.zeros(2)},
            "architecture": architecture,
            "arguments": arguments,
            "class_names": [f"c{i}" for i in range(100000)],
            "params": {},
            "extra": {},
        },
        path,
    )
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(CheckpointError, match="weights|holds 2 weights"):
        load_checkpoint(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500 and time.perf_counter() - started < 30
