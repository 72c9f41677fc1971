import copy

import pytest
import torch
from conftest import real_params
from torch import nn

from imgcls import runtime
from imgcls.errors import ParamsError, RuntimeChoiceError, TrainingError
from imgcls.model.inference import evaluate_model
from imgcls.model.networks import TTAModel, with_tta
from imgcls.model.registry import MODELS, build_model
from imgcls.train.batches import Augmentation, batch_flip, batch_translate, iterate_batches, reflect_pad
from imgcls.train.loop import FitHooks, FitSetup, StopRequested, fit
from imgcls.train.optim import Lookahead, lr_factor, make_optimizer

CPU = torch.device("cpu")


def arguments(channels=3, size=32, classes=10, width=8):
    return {
        "in_channels": channels,
        "num_classes": classes,
        "image_size": size,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "width": width,
    }


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_model_maps_images_to_class_logits(name, channels, size):
    model = build_model(name, **arguments(channels, size, classes=7)).eval()
    assert model(torch.rand(5, channels, size, size)).shape == (5, 7)


@pytest.mark.parametrize("name", MODELS)
def test_each_model_declares_its_true_minimum_input_size(name):
    smallest = MODELS[name].min_image_size
    with torch.no_grad():
        model = build_model(name, **arguments(3, smallest, classes=3)).eval()
        assert model(torch.rand(2, 3, smallest, smallest)).shape == (2, 3)
        assert TTAModel(model)(torch.rand(1, 3, smallest, smallest)).shape == (1, 3)
        if MODELS[name].torchvision:
            # Adaptive pooling takes any size; the declared floor is where the last stages see one pixel.
            last = model.backbone.get_submodule({"resnet18": "layer4", "mobilenet_v3_small": "features"}[name])
            sides = []
            last.register_forward_hook(lambda module, inputs, output: sides.append(output.shape[-1]))
            for side in (smallest, 32, 64):
                model(torch.rand(1, 3, side, side))
            assert sides == [1, 1, 2]
            return
        with pytest.raises(RuntimeError):
            build_model(name, **arguments(3, smallest - 1, classes=3)).eval()(
                torch.rand(2, 3, smallest - 1, smallest - 1)
            )


@pytest.mark.parametrize("name", MODELS)
def test_params_refuse_an_image_size_the_model_cannot_take(name):
    smallest = MODELS[name].min_image_size
    data = {"dataset": "imagefolder", "source": "images.tar"}
    assert real_params(data={**data, "image_size": smallest}, train={"model": name}).train.model == name
    # Below 8 pixels data.image_size's own range refuses first; above it, the model's minimum does.
    expected = (
        rf"train.model = '{name}' needs images of at least {smallest}x{smallest}"
        if smallest > 8
        else r"data.image_size = 7 is not allowed; expected 8..512"
    )
    with pytest.raises(ParamsError, match=expected):
        real_params(data={**data, "image_size": smallest - 1}, train={"model": name})
    if name == "lenet":  # Fashion-MNIST's fixed 28 pixels are enough; the message names the data set otherwise
        assert real_params(train={"model": name}).train.model == "lenet"


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


def test_tta_mirror_level_averages_the_image_and_its_mirror_only():
    model = build_model("convnet", **arguments(3, 8)).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        got = TTAModel(model, "mirror")(x)
        expected = 0.5 * (model(x) + model(x.flip(3)))
    assert torch.allclose(got, expected, atol=1e-5)
    assert with_tta(model, "none") is model
    assert isinstance(with_tta(model, "mirror_shifts"), TTAModel) and with_tta(model, "mirror_shifts").shifts
    with pytest.raises(ValueError, match="TTA level 'none'"):
        TTAModel(model, "none")


def test_batch_translate_moves_whole_images_within_the_padding():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(batch_translate(images, 0, generator), images)
    moved = batch_translate(images, 2, generator)
    padded = nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        assert any(torch.equal(moved[i], padded[i, :, dy : dy + 6, dx : dx + 6]) for dy in range(5) for dx in range(5))


def test_reflect_pad_matches_torch_for_uint8_data():
    images = torch.randint(0, 256, (3, 2, 7, 5), dtype=torch.uint8)
    expected = nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    assert torch.equal(reflect_pad(images, 2), expected)


def test_iterate_batches_covers_each_image_once_per_epoch_as_unit_floats():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    labels = torch.arange(10)
    batches = list(
        iterate_batches(
            images,
            labels,
            4,
            generator=torch.Generator().manual_seed(0),
            augmentation=Augmentation(flip=True, translate=1),
            drop_last=False,
        )
    )
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
    optimizer = make_optimizer(
        model, name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, bias_lr_scale=64
    )
    others, biases = optimizer.param_groups
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(0.01 / 64)
    assert len(biases["params"]) == 6  # two BatchNorms in each of three groups
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert id(model.stem.weight) in frozen
    assert not frozen & {id(p) for p in others["params"] + biases["params"]}


def test_lookahead_follows_a_wrapped_model():
    # torch.compile and DDP wrappers prefix state_dict names; the average must still follow the weights.
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    lookahead = Lookahead(model, decay_per_step=0.5, every=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = lookahead.state["weight"].clone()
    lookahead.update(nn.DataParallel(model), step=0, lr_ratio=1.0)
    assert not torch.equal(lookahead.state["weight"], before)
    assert torch.equal(model.weight, lookahead.state["weight"])


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
        images[labels == c, :, 3 * c : 3 * c + 3, :] += 200
    return images, labels


def train_tiny(seed: int, model_name="fast", **overrides):
    """The committed recipe (params.yaml), shrunk to 256 tiny images: the code path a real run takes."""
    images, labels = separable_data()
    # Six epochs: with only 8 steps an epoch, BatchNorm's running statistics need that long to settle.
    shrink = dict(model=model_name, width=8, epochs=6, min_steps=0, batch_size=32, precision="fp32", compile=False)
    config = real_params(train={**shrink, **overrides}).train
    generator = runtime.seed_everything(seed)
    model = build_model(
        model_name, **arguments(1, 12, classes=4, width=8), whiten_bias_epochs=config.whiten_bias_epochs
    )
    records = fit(
        model,
        (images, labels),
        (images[:64], labels[:64]),
        FitSetup(config, CPU, "fp32"),
        generator,
    )
    return model, records


def test_fit_learns_and_is_identical_for_the_same_seed():
    model_a, records_a = train_tiny(0, "convnet", lr=0.1, ema=0.0)
    model_b, records_b = train_tiny(0, "convnet", lr=0.1, ema=0.0)
    _, records_c = train_tiny(1, "convnet", lr=0.1, ema=0.0)
    assert records_a[-1]["val_accuracy"] > 0.9
    keys = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert [[r[k] for k in keys] for r in records_a] == [[r[k] for k in keys] for r in records_b]
    assert all(
        torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True)
    )
    assert records_a[-1]["train_loss"] != records_c[-1]["train_loss"]


def test_fast_recipe_whitens_trains_and_owns_its_bias_schedule(monkeypatch):
    # fit() knows nothing of the fast model: the model whitens its stem from the data and freezes the stem's
    # bias after whiten_bias_epochs through its own hooks.
    bias_trainable = []
    original = nn.Module.train

    def spy(self, mode=True):
        if hasattr(self, "stem") and mode:
            bias_trainable.append(self.stem.bias.requires_grad)
        return original(self, mode)

    monkeypatch.setattr(nn.Module, "train", spy)
    model, records = train_tiny(0, "fast", whiten_bias_epochs=2.0)
    assert bias_trainable == [True, True, False, False, False, False]  # one entry per epoch
    assert records[-1]["val_accuracy"] > 0.75  # chance is 0.25; 48 steps are few for frozen-scale BatchNorm
    assert model.stem.bias.requires_grad  # restored after training
    assert model.stem.weight.abs().sum() > 0 and not model.stem.weight.requires_grad  # whitened, never trained


def test_one_epoch_runs_with_the_other_defaults():
    # whiten_bias_epochs (3) and warmup_epochs longer than the run: clamped to the run, not refused.
    _, records = train_tiny(0, "fast", epochs=1, warmup_epochs=4.0)
    assert len(records) == 1 and records[0]["train_loss"] > 0


class FirstPixelClassifier(nn.Module):
    """Logits that are known in advance: class = first pixel value (0..3), as a one-hot times 5."""

    def forward(self, x):
        return nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long() % 4, 4).float() * 5


def test_evaluate_reports_loss_accuracy_and_predictions_across_batches():
    labels = torch.arange(10) % 4
    predicted = torch.tensor([0, 1, 2, 3, 0, 1, 3, 3, 1, 0])  # 7 of 10 right
    images = predicted.to(torch.uint8).view(10, 1, 1, 1).expand(10, 1, 3, 3).contiguous()
    result = evaluate_model(
        FirstPixelClassifier(), images, labels, batch_size=3, device=torch.device("cpu"), precision="fp32"
    )
    assert result["predictions"].tolist() == predicted.tolist()
    assert result["accuracy"] == pytest.approx(0.7)
    expected_loss = nn.functional.cross_entropy(nn.functional.one_hot(predicted, 4).float() * 5, labels)
    assert result["loss"] == pytest.approx(float(expected_loss))


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


def test_resuming_from_any_epoch_ends_with_the_uninterrupted_weights():
    images, labels = separable_data()
    config = real_params(
        train={
            "model": "fast",
            "width": 8,
            "epochs": 4,
            "min_steps": 0,
            "batch_size": 32,
            "precision": "fp32",
            "whiten_bias_epochs": 2.0,
        }
    ).train

    def run(resume_from=None):
        generator = runtime.seed_everything(0)
        model = build_model("fast", **arguments(1, 12, classes=4, width=8), whiten_bias_epochs=2.0)
        states, logged = [], []
        records = fit(
            model,
            (images, labels),
            (images[:64], labels[:64]),
            FitSetup(config, CPU, "fp32"),
            generator,
            resume_from=resume_from,
            hooks=FitHooks(on_epoch=logged.append, save_state=lambda state: states.append(copy.deepcopy(state))),
        )
        return model, records, states, logged

    model, records, states, _ = run()
    assert [s["epoch"] for s in states] == [1, 2, 3]  # after every epoch but the last
    # A stop requested after the 11th step (3 into epoch 2): the state of that step boundary is saved.
    asked = iter(range(1000))
    with pytest.raises(StopRequested):
        generator = runtime.seed_everything(0)
        fit(
            build_model("fast", **arguments(1, 12, classes=4, width=8), whiten_bias_epochs=2.0),
            (images, labels),
            (images[:64], labels[:64]),
            FitSetup(config, CPU, "fp32"),
            generator,
            hooks=FitHooks(
                save_state=lambda state: states.append(copy.deepcopy(state)), should_stop=lambda: next(asked) == 10
            ),
        )
    assert states[-1]["epoch"] == 1 and states[-1]["epoch_progress"]["batches_done"] == 3
    keys = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    for state in states:
        resumed, resumed_records, _, logged = run(resume_from=state)
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True)
        )
        assert [[r[k] for k in keys] for r in resumed_records] == [[r[k] for k in keys] for r in records]
        assert [r["epoch"] for r in logged] == [1, 2, 3, 4]  # earlier epochs replayed into the logs


def test_resume_state_from_other_params_or_data_is_discarded(tmp_path):
    from imgcls.train.resume import load_resume_state, run_digest, save_resume_state

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "meta.json").write_text("{}")
    params = real_params()
    digest = run_digest(params, prepared)
    path = tmp_path / "resume" / "state.pt"
    save_resume_state(path, digest, {"epoch": 3})
    messages = []
    assert load_resume_state(path, digest, messages.append)["epoch"] == 3
    other_params = run_digest(real_params(train={"lr": 0.1}), prepared)
    (prepared / "meta.json").write_text('{"changed": 1}')
    other_data = run_digest(params, prepared)
    assert len({digest, other_params, other_data}) == 3
    assert load_resume_state(path, other_params, messages.append) is None
    assert not path.exists() and "saved with other params, data or code" in messages[-1]
    path.write_bytes(b"truncated")
    assert load_resume_state(path, digest, messages.append) is None and "unreadable" in messages[-1]


def test_a_diverged_run_stops_with_a_message_instead_of_saving_a_nan_model():
    # A model whose loss turns NaN (as a too-high rate or degenerate data make it): fit must stop with an
    # error a user can act on, not hand a NaN model to the checkpoint, evaluate and export stages.
    from imgcls.model.networks import Network

    class Diverging(Network):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(144, 4)

        def forward(self, x):
            return self.linear(x.flatten(1)) * float("inf")  # inf - inf in the loss: NaN

    images, labels = separable_data()
    config = real_params(
        train={"model": "convnet", "epochs": 2, "min_steps": 0, "batch_size": 32, "precision": "fp32", "ema": 0.0}
    ).train
    with pytest.raises(TrainingError, match=r"loss became nan in epoch 1.*Lower train\.lr"):
        fit(
            Diverging(),
            (images, labels),
            None,
            FitSetup(config, CPU, "fp32"),
            runtime.seed_everything(0),
        )


def test_whitening_takes_fewer_images_at_larger_sizes_so_its_memory_does_not_grow():
    # 5,000 images at 28 and 32 pixels (the recipes' results stay as they were); at 128 pixels as many
    # 2x2 patches as 5,000 32-pixel images give (5,000 x 127 x 127 patches would be 3.9 GB of float32).
    sizes = {
        size: build_model(
            "fast", in_channels=3, num_classes=10, image_size=size, mean=[0.5] * 3, std=[0.25] * 3
        ).init_images
        for size in (28, 32, 96, 128)
    }
    assert sizes[28] == sizes[32] == 5000 and sizes[128] == 5000 * 31 * 31 // (127 * 127)
    assert sizes[128] * 127 * 127 <= 5000 * 31 * 31 and sizes[96] * 95 * 95 <= 5000 * 31 * 31
    assert (
        build_model("convnet", in_channels=3, num_classes=10, image_size=32, mean=[0.5] * 3, std=[0.25] * 3).init_images
        == 0
    )
