import dataclasses

import pytest
import torch
from torch import nn

from imgcls import runtime
from imgcls.errors import RuntimeChoiceError
from imgcls.models import MODEL_NAMES, TTAModel, build_model
from imgcls.params import TrainParams
from imgcls.training import (Lookahead, batch_flip, batch_translate, evaluate, fit, iterate_batches, lr_factor,
                             make_optimizer, reflect_pad, Augmentation)


def arguments(channels=3, size=32, classes=10, width=8):
    return {"in_channels": channels, "num_classes": classes, "image_size": size, "mean": [0.5] * channels,
            "std": [0.25] * channels, "width": width}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_model_maps_images_to_class_logits(name, channels, size):
    model = build_model(name, **arguments(channels, size, classes=7)).eval()
    assert model(torch.rand(5, channels, size, size)).shape == (5, 7)


def test_lenet_is_the_tutorial_network_on_cifar_shapes():
    model = build_model("lenet", **arguments(3, 32))
    # The tutorial's Net has 62,006 parameters; normalization adds buffers, not parameters.
    assert sum(p.numel() for p in model.parameters()) == 62006


def test_whitening_stem_decorrelates_patches():
    torch.manual_seed(0)
    base = torch.rand(64, 1, 16, 16)
    images = torch.cat([base, base, base], dim=1) * 0.8 + 0.2 * torch.rand(64, 3, 16, 16)  # correlated channels
    model = build_model("fast", **arguments(3, 16))
    model.init_whitening(images)
    with torch.no_grad():
        out = nn.functional.conv2d(model.normalize(images), model.stem.weight)  # (N, 24, 15, 15), no bias
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(half.T)
    assert torch.allclose(covariance.diagonal(), torch.ones(12), atol=0.05)  # unit variance per filter
    off_diagonal = covariance - torch.diag(covariance.diagonal())
    assert off_diagonal.abs().max() < 0.05
    assert torch.equal(out[:, 12:], -out[:, :12])  # second half is the negation


def test_tta_averages_mirror_and_shifts():
    model = build_model("convnet", **arguments(3, 8)).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        got = TTAModel(model)(x)
        plain = 0.5 * (model(x) + model(x.flip(3)))
        padded = nn.functional.pad(torch.cat([x, x.flip(3)]), (1, 1, 1, 1), mode="reflect")
        shifted = torch.stack([model(padded[:, :, :8, :8]), model(padded[:, :, 2:, 2:])]).mean(0)
        expected = 0.5 * plain + 0.5 * 0.5 * (shifted[:3] + shifted[3:])
    assert torch.allclose(got, expected, atol=1e-5)


def test_batch_translate_moves_whole_images_within_the_padding():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(batch_translate(images, 0, generator), images)
    moved = batch_translate(images, 2, generator)
    padded = nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        assert any(torch.equal(moved[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))


def test_reflect_pad_matches_torch_for_uint8_data():
    images = torch.randint(0, 256, (3, 2, 7, 5), dtype=torch.uint8)
    expected = nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    assert torch.equal(reflect_pad(images, 2), expected)


def test_iterate_batches_covers_each_image_once_per_epoch_as_unit_floats():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    labels = torch.arange(10)
    batches = list(iterate_batches(images, labels, 4, generator=torch.Generator().manual_seed(0),
                                   augmentation=Augmentation(flip=True, translate=1), drop_last=False))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    for batch, batch_labels in batches:  # constant images: augmentation keeps each image's value
        assert batch.dtype == torch.float32 and torch.allclose(batch[:, 0, 0, 0], batch_labels.float() / 255)


def test_batch_flip_mirrors_only_the_masked_images():
    images = torch.rand(4, 1, 3, 5)
    flipped = batch_flip(images, mask=torch.tensor([True, False, True, False]))
    assert torch.equal(flipped[0], images[0].flip(2)) and torch.equal(flipped[1], images[1])


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(70, 100, 10, "constant") == 1.0


def test_batchnorm_biases_get_their_own_rate_and_frozen_weights_are_left_out():
    model = build_model("fast", **arguments(3, 16))
    optimizer = make_optimizer(model, name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                               bias_lr_scale=64)
    others, biases = optimizer.param_groups
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(0.01 / 64)
    assert len(biases["params"]) == 6  # two BatchNorms in each of three groups
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert id(model.stem.weight) in frozen
    assert not frozen & {id(p) for p in others["params"] + biases["params"]}


def test_lookahead_finish_leaves_the_average_in_the_model():
    model = nn.Linear(2, 1)
    lookahead = Lookahead(model, decay_per_step=0.9, every=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.update(model, step=0, lr_ratio=1.0)
    assert torch.allclose(model.weight, start + (1 - 0.9))  # pulled back onto the average
    with torch.no_grad():
        model.weight.add_(5.0)
    lookahead.finish(model)
    assert torch.allclose(model.weight, start + 0.1)


def separable_data(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 40, (n, 1, 12, 12), generator=generator, dtype=torch.uint8)
    for c in range(4):  # class c lights up band c (rows 3c..3c+2): unchanged by a horizontal flip
        images[labels == c, :, 3 * c:3 * c + 3, :] += 200
    return images, labels


def train_tiny(seed: int, model_name="convnet", **overrides):
    images, labels = separable_data()
    # Six epochs: with only 8 steps an epoch, BatchNorm's running statistics need that long to settle.
    settings = dict(model=model_name, width=8, epochs=6, batch_size=32, lr=0.1, warmup_epochs=0.5, precision="fp32")
    config = dataclasses.replace(TrainParams(), **{**settings, **overrides})
    generator = runtime.seed_everything(seed)
    model = build_model(model_name, **arguments(1, 12, classes=4, width=8))
    if model_name == "fast":
        model.init_whitening(images.float() / 255)
    records = fit(model, (images, labels), (images[:64], labels[:64]), config=config, device=torch.device("cpu"),
                  precision="fp32", generator=generator)
    return model, records


def test_fit_learns_and_is_identical_for_the_same_seed():
    model_a, records_a = train_tiny(0)
    model_b, records_b = train_tiny(0)
    _, records_c = train_tiny(1)
    assert records_a[-1]["val_accuracy"] > 0.9
    keys = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert [[r[k] for k in keys] for r in records_a] == [[r[k] for k in keys] for r in records_b]
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert records_a[-1]["train_loss"] != records_c[-1]["train_loss"]


def test_fast_recipe_trains_with_lookahead_and_bias_schedule():
    model, records = train_tiny(0, "fast", ema=0.9, bias_lr_scale=16.0, whiten_bias_epochs=1.0, lr=0.2)
    assert records[-1]["val_accuracy"] > 0.75  # chance is 0.25; 48 steps are few for frozen-scale BatchNorm
    assert model.stem.bias.requires_grad  # restored after training


def test_evaluate_reports_loss_accuracy_and_predictions():
    images, labels = separable_data(64)
    model = build_model("convnet", **arguments(1, 12, classes=4))
    result = evaluate(model, images, labels, batch_size=10, device=torch.device("cpu"), precision="fp32")
    assert result["predictions"].shape == (64,)
    assert result["accuracy"] == pytest.approx(float((result["predictions"] == labels).float().mean()))
    assert result["loss"] > 0


def test_precision_auto_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"


def test_cuda_request_without_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeChoiceError, match="no CUDA GPU is visible"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto").type == "cpu"
