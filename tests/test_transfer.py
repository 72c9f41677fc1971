"""Small data sets (issue 9): torchvision backbones with ImageNet weights from torch's cache, fine-tuning from
a checkpoint of this pipeline, run lengths fitted to the data, warnings, confidence intervals, layouts."""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest
import torch
from conftest import real_params

from imgcls.errors import ParamsError, TrainingError
from imgcls.evaluate.metrics import per_class_metrics
from imgcls.model.checkpoint import load_checkpoint
from imgcls.model.registry import build_model
from imgcls.paths import ProjectPaths
from imgcls.prepared import save_prepared
from imgcls.preprocess.splits import plan_splits
from imgcls.stats import wilson_interval
from imgcls.train.loop import make_training_setup
from imgcls.train.optim import SHORT_RUN_STEPS, run_length
from imgcls.train.stage import small_split_warnings, train
from imgcls.train.transfer import (
    TransferError,
    apply_starting_weights,
    imagenet_weights,
    load_init_checkpoint,
    load_pretrained,
    torch_cache_file,
)


def project(
    tmp_path,
    name: str,
    classes: list[str],
    n_train: int = 48,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int | None = None,
) -> ProjectPaths:
    """A prepared data set of learnable images: each class a brightness level, plus noise."""
    paths = ProjectPaths(tmp_path / name)
    paths.prepared_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val or 2 * len(classes)), ("test", n_test or 4 * len(classes))):
        labels = np.arange(n, dtype=np.int64) % len(classes)
        base = (40 + 170 * labels / max(1, len(classes) - 1))[:, None, None, None]
        images = np.clip(base + rng.normal(0, 25, (n, channels, size, size)), 0, 255).astype(np.uint8)
        splits[split] = (images, labels)
    counts = {
        split: {c: int((labels == i).sum()) for i, c in enumerate(classes)} for split, (_, labels) in splits.items()
    }
    save_prepared(
        paths.prepared_dir,
        splits,
        {
            "dataset": name,
            "class_names": classes,
            "counts": counts,
            "image_shape": [channels, size, size],
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
        },
    )
    return paths


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    """An empty torch cache (TORCH_HOME) and no network: a download attempt fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    attempts = []

    def offline(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return attempts


def write_torchvision_weights(architecture: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A weights file in torchvision's name and format, in torch's cache (random weights, not ImageNet's)."""
    import torchvision

    torch.manual_seed(seed)
    state = getattr(torchvision.models, architecture)(weights=None).state_dict()  # 1,000-class head, as published
    path = torch_cache_file(imagenet_weights(architecture))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_pretrained_weights_come_from_the_torch_cache_with_a_new_head(tmp_path, torch_cache, architecture):
    published = write_torchvision_weights(architecture)
    lines = []
    opened = []
    with pytest.MonkeyPatch.context() as patch:  # not torchvision's file (random weights): not even opened untrusted
        patch.setattr(torch, "load", lambda *a, **k: opened.append(a))
        with pytest.raises(TransferError, match="not torchvision's published file.*train.trust_weights_file: true"):
            load_pretrained(architecture, "imagenet", lines.append)
    assert opened == []
    start = load_pretrained(architecture, "imagenet", lines.append, trust=True)
    assert torch_cache == []  # found in the cache: nothing downloaded
    assert start.mean == [0.485, 0.456, 0.406] and start.std == [0.229, 0.224, 0.225]
    assert start.provenance["file"].endswith(torch_cache_file(imagenet_weights(architecture)).name)
    assert not start.provenance["official_file"] and any("not torchvision's published file" in line for line in lines)
    model = build_model(architecture, in_channels=3, num_classes=5, image_size=32, mean=start.mean, std=start.std)
    apply_starting_weights(model, start, "test")
    state = model.state_dict()
    head = model.head_parameter_names()
    assert head and all(state[name].shape[0] == 5 for name in head)  # sized for our 5 classes, not ImageNet's 1,000
    loaded = [name for name in published if f"backbone.{name}" not in head]
    assert len(loaded) == len(published) - len(head)
    for name in loaded:
        assert torch.equal(state[f"backbone.{name}"], published[name]), name
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor(start.mean))


def test_pretrained_without_cache_or_network_says_where_the_file_goes(tmp_path, torch_cache):
    with pytest.raises(TransferError) as caught:
        load_pretrained("resnet18", "imagenet", print)
    message = str(caught.value)
    assert torch_cache == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]  # the real, official URL
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    assert "train.pretrained" in message
    # A truncated file in the cache: named, with what to do.
    cache_file = torch_cache_file(imagenet_weights("resnet18"))
    assert not cache_file.exists()  # nothing half-written by the failed download
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TransferError, match="resnet18-f37072fd.pth is not torchvision's published file.*delete it"):
        load_pretrained("resnet18", "imagenet", print)
    with pytest.raises(
        TransferError, match="the cached file .*resnet18-f37072fd.pth is not readable weights.*delete it"
    ):
        load_pretrained("resnet18", "imagenet", print, trust=True)


def test_pretrained_file_paths_are_loaded_safely_and_checked(tmp_path):
    with pytest.raises(TransferError, match="no such file"):
        load_pretrained("resnet18", str(tmp_path / "missing.pth"), print)

    # A pickle that would run code when unpickled: weights_only refuses it.
    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(pickle.dumps({"conv1.weight": Boom()}))
    with pytest.raises(TransferError, match="not torchvision's published file"):  # untrusted: never unpickled
        load_pretrained("resnet18", str(hostile), print)
    with pytest.raises(TransferError, match="not a readable weights file"):  # trusted: weights_only still refuses
        load_pretrained("resnet18", str(hostile), print, trust=True)
    # Another network's weights: every missing name is reported, nothing half-loaded silently.
    import torchvision

    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), other)
    start = load_pretrained("resnet18", str(other), print, trust=True)
    model = build_model("resnet18", in_channels=3, num_classes=2, image_size=32, mean=start.mean, std=start.std)
    with pytest.raises(TransferError, match="does not hold this model's weights: missing"):
        apply_starting_weights(model, start, "train.pretrained = mobilenet.pth")


def test_train_stage_with_pretrained_resnet_on_grayscale_records_the_start(tmp_path, torch_cache, capsys):
    published = write_torchvision_weights("resnet18")
    paths = project(tmp_path, "gray", ["a", "b"], channels=1)
    params = real_params(
        train={
            "model": "resnet18",
            "pretrained": "imagenet",
            "epochs": 1,
            "min_steps": 0,
            "freeze_backbone_epochs": 1,
            "log_images": 0,
            "trust_weights_file": True,
        }
    )
    train(params, paths)
    out = capsys.readouterr().out
    assert "head replaced for 2 classes" in out and "frozen for the first 1 epoch" in out
    model, checkpoint = load_checkpoint(paths.checkpoint)
    start = checkpoint["extra"]["start"]
    assert start["kind"] == "pretrained" and start["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert checkpoint["arguments"]["mean"] == [0.485, 0.456, 0.406] and checkpoint["arguments"]["in_channels"] == 1
    # Frozen for the whole (one-epoch) run: every backbone weight is still the published one; the head learnt.
    state = model.state_dict()
    for name, value in published.items():
        if not name.startswith("fc.") and value.is_floating_point() and "running_" not in name:
            assert torch.equal(state[f"backbone.{name}"], value), name
    assert state["backbone.fc.weight"].shape == (2, 512)
    with torch.no_grad():
        assert model(torch.rand(3, 1, 32, 32)).shape == (3, 2)


def test_fine_tuning_from_a_checkpoint_with_other_classes(tmp_path, capsys):
    source = project(tmp_path, "source", ["a", "b", "c"], n_train=96, size=16)
    small = {"model": "fast", "width": 8, "epochs": 2, "min_steps": 0, "batch_size": 16, "log_images": 0}
    train(real_params(train=small), source)
    _, source_checkpoint = load_checkpoint(source.checkpoint)
    source_state = source_checkpoint["state_dict"]

    # The starting weights: everything but the 3-class head, including the whitening stem and normalization.
    start = load_init_checkpoint(
        str(source.checkpoint), architecture="fast", in_channels=3, width=8, class_names=["x", "y"]
    )
    assert start.head_replaced and start.mean == [0.5] * 3 and "head.weight" not in start.state
    fresh = build_model("fast", in_channels=3, num_classes=2, image_size=16, mean=start.mean, std=start.std, width=8)
    apply_starting_weights(fresh, start, "test")
    for name, value in fresh.state_dict().items():
        if name.startswith("head."):
            assert value.shape[0] == 2
        else:
            assert torch.equal(value, source_state[name]), name

    # Fine-tune on a 2-class set with the backbone frozen throughout: only the new head moves.
    target = project(tmp_path, "target", ["x", "y"], n_train=40, size=16, seed=3)
    with pytest.raises(ParamsError, match="train.init_from = .* set train.trust_weights_file: true"):
        real_params(train={**small, "init_from": str(source.checkpoint)})  # refused before any stage runs
    params = real_params(
        train={**small, "init_from": str(source.checkpoint), "freeze_backbone_epochs": 2, "trust_weights_file": True}
    )
    capsys.readouterr()
    train(params, target)
    out = capsys.readouterr().out
    assert f"starting from train.init_from = {source.checkpoint}" in out and "head replaced for 2 classes" in out
    tuned, checkpoint = load_checkpoint(target.checkpoint)
    assert (
        checkpoint["extra"]["start"]["classes"] == ["a", "b", "c"]
        and checkpoint["extra"]["start"]["head"] == "replaced"
    )
    for name, value in tuned.named_parameters():
        if name.startswith("head."):
            assert not torch.equal(value, fresh.state_dict()[name])
        else:
            assert torch.equal(value, source_state[name]), name

    # Unfrozen at train.backbone_lr_scale: the backbone moves, from the loaded weights (not a new whitening).
    params = real_params(train={**small, "init_from": str(source.checkpoint), "trust_weights_file": True})
    train(params, target)
    tuned, _ = load_checkpoint(target.checkpoint)
    assert not torch.equal(tuned.state_dict()["groups.0.conv1.weight"], source_state["groups.0.conv1.weight"])
    assert torch.equal(
        tuned.state_dict()["stem.weight"], source_state["stem.weight"]
    )  # whitening kept, never re-fitted

    # The same classes: the head is kept too.
    same = load_init_checkpoint(
        str(source.checkpoint), architecture="fast", in_channels=3, width=8, class_names=["a", "b", "c"]
    )
    assert not same.head_replaced and torch.equal(same.state["head.weight"], source_state["head.weight"])


def test_init_from_mismatches_name_the_param_to_change(tmp_path, monkeypatch):
    source = project(tmp_path, "source", ["a", "b"], n_train=32, size=16)
    train(
        real_params(
            train={"model": "convnet", "width": 8, "epochs": 1, "min_steps": 0, "batch_size": 16, "log_images": 0}
        ),
        source,
    )
    path = str(source.checkpoint)
    cases = [
        (
            {"architecture": "fast", "in_channels": 3, "width": 8},
            "holds a convnet model but train.model is 'fast'; set train.model: convnet",
        ),
        (
            {"architecture": "convnet", "in_channels": 1, "width": 8},
            "trained on 3-channel images, this data has 1; use data of that many channels (data.channels: 3",
        ),
        (
            {"architecture": "convnet", "in_channels": 3, "width": 16},
            "has width 8, train.width is 16; set train.width: 8",
        ),
    ]
    for arguments, fragment in cases:
        with pytest.raises(TransferError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_init_checkpoint(path, class_names=["x", "y"], **arguments)
    with pytest.raises(TransferError, match="train.init_from: .*does not exist; name a checkpoint.pt") as caught:
        load_init_checkpoint(
            str(tmp_path / "nope.pt"), architecture="convnet", in_channels=3, width=8, class_names=["x"]
        )
    assert "dvc repro" not in str(caught.value)  # the advice for the pipeline's own checkpoint is not given here
    monkeypatch.chdir(tmp_path)  # the project root: its own checkpoint is gone while train runs
    with pytest.raises(TransferError, match="the train stage's own output, which DVC removes before the stage runs"):
        load_init_checkpoint(
            "data/model/checkpoint.pt", architecture="convnet", in_channels=3, width=8, class_names=["x"]
        )
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(TransferError, match="train.init_from: .*not a readable imgcls checkpoint"):
        load_init_checkpoint(str(damaged), architecture="convnet", in_channels=3, width=8, class_names=["x"])
    # lenet's first Linear layer depends on the image size: another size is named, not a shape traceback.
    lenet = project(tmp_path, "lenet", ["a", "b"], n_train=32, size=16)
    train(real_params(train={"model": "lenet", "epochs": 1, "min_steps": 0, "batch_size": 16, "log_images": 0}), lenet)
    start = load_init_checkpoint(
        str(lenet.checkpoint), architecture="lenet", in_channels=3, width=32, class_names=["x", "y"]
    )
    model = build_model("lenet", in_channels=3, num_classes=2, image_size=32, mean=start.mean, std=start.std)
    with pytest.raises(TransferError, match="use images of the size it was trained on"):
        apply_starting_weights(model, start, "train.init_from")


def test_params_keep_transfer_settings_consistent():
    assert (
        real_params(train={"model": "resnet18", "pretrained": "imagenet", "freeze_backbone_epochs": 2}).train.pretrained
        == "imagenet"
    )
    with pytest.raises(ParamsError, match="train.pretrained = 'imagenet' loads torchvision's ImageNet weights"):
        real_params(train={"model": "convnet", "pretrained": "imagenet"})


def test_small_data_gets_enough_steps_and_short_runs_warn():
    config = real_params().train  # the committed recipe: batch 512, 9 epochs, at least 8 batches and 200 steps
    ants_bees = run_length(220, config)
    assert (ants_bees.batch_size, ants_bees.steps_per_epoch, ants_bees.epochs) == (27, 8, 25)
    assert any("train.min_batches_per_epoch = 8" in note for note in ants_bees.notes)
    assert any("25 epochs instead of train.epochs 9" in note for note in ants_bees.notes)
    assert not ants_bees.warnings
    fashion = run_length(54000, config)  # large data: the recipe as written
    assert (fashion.batch_size, fashion.epochs, fashion.notes, fashion.warnings) == (512, 9, [], [])
    # Freezing for at least train.epochs means the head alone, however many epochs min_steps adds.
    images = torch.zeros(220, 3, 16, 16, dtype=torch.uint8)
    model = build_model("fast", in_channels=3, num_classes=2, image_size=16, mean=[0.5] * 3, std=[0.25] * 3, width=8)
    frozen = real_params(train={"init_from": "a.pt", "freeze_backbone_epochs": 10, "trust_weights_file": True}).train
    setup = make_training_setup(model, images, config=frozen, generator=torch.Generator(), fine_tune=True)
    assert setup.epochs == 25 and setup.frozen_epochs == 25
    # Several processes: equal shares of at least two images each, or a clear refusal.
    assert run_length(220, config, processes=2).batch_size == 26
    assert run_length(220, config, processes=4).batch_size == 24
    with pytest.raises(TrainingError, match="cannot give each of train.processes = 16 processes two images"):
        run_length(20, config, processes=16)
    short = run_length(220, real_params(train={"min_steps": 0}).train)
    assert short.total_steps == 72 < SHORT_RUN_STEPS
    assert short.warnings and "only 72 optimizer steps" in short.warnings[0] and "train.min_steps" in short.warnings[0]


def test_a_tiny_test_split_warns_with_its_interval(tmp_path, capsys):
    warnings = small_split_warnings({"ants": 12, "bees": 12}, "a test/ folder")
    assert (
        len(warnings) == 1
        and "has 24 images" in warnings[0]
        and "+-16 points" in warnings[0]
        and "0.60..0.91" in warnings[0]
    )
    assert small_split_warnings({"a": 1000, "b": 1000}, "x") == []
    empty = small_split_warnings({"a": 500, "b": 0}, "x")
    assert any("no test images of class(es) ['b']" in w for w in empty)
    # The train stage prints them, with the run-length notes, before training.
    paths = project(tmp_path, "tiny", ["a", "b"], n_train=24, size=16)
    train(real_params(train={"model": "convnet", "width": 8, "epochs": 1, "min_steps": 0, "log_images": 0}), paths)
    out = capsys.readouterr().out
    assert "warning: the test split has 8 images" in out and "warning: this run has only 8 optimizer steps" in out
    assert "batch size 3 instead of train.batch_size 512" in out


def test_wilson_interval_and_per_class_counts():
    low, high = wilson_interval(8, 10)  # textbook values (Wilson 1927; e.g. R's prop.test without correction)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] > 0.69
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])  # class c: no test images and never predicted
    metrics = per_class_metrics(confusion, ["a", "b", "c"])
    assert metrics["a"]["images"] == 10 and metrics["a"]["correct"] == 8 and metrics["a"]["accuracy"] == 0.8
    assert (metrics["a"]["ci95_low"], metrics["a"]["ci95_high"]) == wilson_interval(8, 10)
    assert metrics["c"] == {
        "accuracy": None,
        "ci95_low": None,
        "ci95_high": None,
        "precision": None,
        "recall": None,
        "images": 0,
        "correct": 0,
    }


def test_ants_bees_layout_val_folder_becomes_the_test_split_unless_told_otherwise():
    labels = {"train": np.arange(40) % 2, "val": np.arange(20) % 2}
    plan = plan_splits(labels, val_fraction=0.1, test_fraction=0.1, limit=0, seed=0)
    assert plan["test"][0] == "val" and len(plan["test"][1]) == 20  # every val/ image tests
    assert plan["val"][0] == "train" and plan["train"][0] == "train"
    assert len(plan["val"][1]) + len(plan["train"][1]) == 40 and not set(plan["val"][1]) & set(plan["train"][1])
    kept = plan_splits(labels, val_fraction=0.1, test_fraction=0.1, limit=0, seed=0, val_folder="val")
    assert kept["val"] == ("val", kept["val"][1]) and len(kept["val"][1]) == 20
    assert kept["test"][0] == "train" and len(kept["test"][1]) == 4  # carved from train by data.test_fraction
    with_test = plan_splits({**labels, "test": np.arange(10) % 2}, val_fraction=0.1, test_fraction=0.1, limit=0, seed=0)
    assert with_test["val"][0] == "val" and with_test["test"][0] == "test"  # a test/ folder: val/ validates
