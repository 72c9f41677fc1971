"""Class activation maps (imgcls.evaluate.cam): the layer found for every model, maps that point at the evidence
in a trained model, the model left as it was, the sample picked for the picture, and the picture itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from imgcls.evaluate.cam import (
    GRAD_CAM,
    INPUT_LAYER,
    INTEGRATED_GRADIENTS,
    CamLayer,
    class_activation_maps,
    find_cam_layer,
    pick_cam_sample,
    plot_cam_grid,
)
from imgcls.model.inference import predict, to_float_images
from imgcls.model.networks import TTAModel
from imgcls.model.registry import MODELS, build_model, normalized_channels

CPU = torch.device("cpu")


# One torch thread for every test here (conftest.one_thread says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(name: str, channels: int, size: int, num_classes: int = 3, width: int = 8) -> nn.Module:
    n = normalized_channels(name, channels)
    arguments = dict(in_channels=channels, num_classes=num_classes, image_size=size, mean=[0.5] * n, std=[0.25] * n)
    return build_model(name, width=width, **arguments)


def predicted(model: nn.Module, images: torch.Tensor) -> list[int]:
    return predict(model, images, batch_size=64, device=CPU, precision="fp32").argmax(1).tolist()


# (model, channels, size, images) -> (method, layer name, map size). Every registered model has a row (checked
# below); the torchvision networks are a few of different kinds: a conv classifier (squeezenet), NHWC stages
# (swin_t, whose permute module gives the NCHW map), squeeze-excitation blocks, a vision transformer.
CASES = {
    ("lenet", 1, 28, 2): (GRAD_CAM, "pool", (4, 4)),  # pool's second call: 28 -> 24 -> 12 -> 8 -> 4
    ("tutorial_cnn", 3, 32, 2): (GRAD_CAM, "features", (4, 4)),
    ("convnet", 1, 28, 2): (GRAD_CAM, "groups", (3, 3)),
    ("fast", 3, 32, 2): (GRAD_CAM, "groups", (3, 3)),  # the valid 2x2 stem: 32 -> 31 -> 15 -> 7 -> 3
    ("fast_lite", 1, 28, 2): (GRAD_CAM, "groups", (3, 3)),  # 28 -> 27 -> 13 -> 6 -> 3
    ("resnet18", 1, 32, 2): (GRAD_CAM, "backbone.layer3", (2, 2)),  # layer4 is 1x1 at 32 px: no place in it
    ("mobilenet_v3_small", 3, 64, 2): (GRAD_CAM, "backbone.features", (2, 2)),
    ("shufflenet_v2_x0_5", 3, 64, 2): (GRAD_CAM, "backbone.conv5", (2, 2)),
    ("squeezenet1_0", 3, 64, 2): (GRAD_CAM, "backbone.classifier.2", (3, 3)),  # the class conv's ReLU (in place)
    ("efficientnet_b0", 3, 64, 2): (GRAD_CAM, "backbone.features", (2, 2)),
    ("swin_t", 3, 64, 2): (GRAD_CAM, "backbone.permute", (2, 2)),
    ("vit_b_16", 3, 224, 1): (INTEGRATED_GRADIENTS, INPUT_LAYER, (224, 224)),  # only the patch embedding is 4-D
}


def test_every_registered_model_has_a_case():
    assert set(MODELS) <= {name for name, *_ in CASES}


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: f"{case[0]}-{case[2]}px")
def test_maps_for_every_model(case):
    name, channels, size, count = case
    method, layer_name, map_size = CASES[case]
    torch.manual_seed(0)
    model = small_model(name, channels, size)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8)
    model.initialize_from_data(images)  # fast's whitening stem (a no-op for the others)
    for module in model.modules():
        # torchvision's ViT starts with a zero head: every gradient is zero until it has trained
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    assert find_cam_layer(model, (channels, size, size)) == CamLayer(
        layer_name, method, call=1 if name == "lenet" else 0, map_size=map_size
    )
    maps, layer = class_activation_maps(model, images, predicted(model, images), device=CPU)
    assert (layer.method, layer.name) == (method, layer_name)
    assert maps.shape == (count, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all()
    # each map is scaled to exactly [0, 1] by its own range (all zeros only when nothing speaks for the class)
    lows, highs = maps.reshape(count, -1).min(1), maps.reshape(count, -1).max(1)
    assert (lows == 0).all() and np.isin(highs, (0.0, 1.0)).all() and highs.max() == 1.0
    assert len(np.unique(maps[highs.argmax()])) > 10  # a smooth upsampled map, not a few blocks or a constant


class NHWCStages(nn.Module):
    """A conv map (N, 8, 16, 16), then a stage on channels-last features (as swin_t's) that stays NHWC up to
    global pooling: the last 4-D output is (N, 16, 16, 24), which is not a map of the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mixer = nn.Linear(8, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(self.conv(x).permute(0, 2, 3, 1))  # (N, 16, 16, 24)
        return self.head(x.mean(dim=(1, 2)))


def test_nhwc_outputs_are_not_taken_for_feature_maps():
    torch.manual_seed(0)
    model = NHWCStages()
    assert find_cam_layer(model, (3, 32, 32)) == CamLayer("conv", GRAD_CAM, map_size=(16, 16))
    maps, _ = class_activation_maps(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), [0, 1], device=CPU)
    assert maps.shape == (2, 32, 32)


class NoMap(nn.Module):
    """An MLP: no layer with weights gives a 4-D map, only the input is one."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_a_model_without_feature_maps_gets_the_fallback():
    torch.manual_seed(0)
    maps, layer = class_activation_maps(
        NoMap(), torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), [0, 1, 0], device=CPU
    )
    assert layer == CamLayer(INPUT_LAYER, INTEGRATED_GRADIENTS, map_size=(16, 16))
    assert maps.shape == (3, 16, 16) and maps.max() == 1.0


# The localization task: class 1 images hold a white 16x16 square (1/16 of the area) at a random place in
# colour noise, class 0 images only the noise. The square is the only evidence for class 1, so its map must sit
# on the square; a map flipped, transposed, shifted or made for the wrong class would not, and neither would a
# map of brightness (0.12 of its mass on the square, against the 3/16 required).
SIZE, PATCH = 64, 16


def patch_data(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, SIZE, SIZE), labels (N,) and the square's mask (N, SIZE, SIZE)."""
    labels = torch.randint(0, 2, (count,), generator=generator)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    corners = torch.randint(0, SIZE - PATCH + 1, (count, 2), generator=generator)
    pixels = torch.arange(SIZE)
    rows = (pixels >= corners[:, :1]) & (pixels < corners[:, :1] + PATCH)  # (N, SIZE)
    columns = (pixels >= corners[:, 1:]) & (pixels < corners[:, 1:] + PATCH)
    masks = rows[:, :, None] & columns[:, None, :]
    images = torch.where((masks & (labels[:, None, None] == 1))[:, None], torch.tensor(255, dtype=torch.uint8), images)
    return images, labels, masks


@pytest.fixture(scope="module")
def trained_convnet() -> nn.Module:
    """convnet (width 8) trained ~2 s with Adam on the patch task, its BatchNorm statistics then recomputed
    (a few hundred steps leave running statistics behind the weights)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels, _ = patch_data(512, generator)
    model = small_model("convnet", 3, SIZE, num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _epoch in range(2):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(to_float_images(images[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for start in range(0, len(images), 128):
            model(to_float_images(images[start : start + 128]))
    model.eval()
    torch.set_num_threads(threads)
    return model


def mass_in_patch(maps: np.ndarray, masks: torch.Tensor) -> np.ndarray:
    maps = torch.from_numpy(maps)
    return ((maps * masks).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)).numpy()


@pytest.mark.parametrize("method", [None, INTEGRATED_GRADIENTS])
def test_maps_point_at_the_evidence(trained_convnet, method):
    images, labels, masks = patch_data(128, torch.Generator().manual_seed(1))
    predictions = np.array(predicted(trained_convnet, images))
    assert (predictions == labels.numpy()).mean() > 0.9, "the model did not learn the task; the check means nothing"
    found = np.flatnonzero((predictions == 1) & (labels.numpy() == 1))
    maps, layer = class_activation_maps(trained_convnet, images[found], [1] * len(found), device=CPU, method=method)
    assert layer.method == (method or GRAD_CAM)
    share = PATCH * PATCH / SIZE**2  # 1/16: what a map blind to the square would hold there
    inside = mass_in_patch(maps, masks[found])
    assert inside.mean() > 3 * share, f"mean map mass in the square {inside.mean():.3f}, area share {share:.3f}"
    peaks = masks[found].flatten(1).gather(1, torch.from_numpy(maps).flatten(1).argmax(1, keepdim=True))
    assert peaks.float().mean() > 0.8, f"only {peaks.float().mean():.2f} of the maps peak inside the square"
    # the same maps against the square's mirror image: what a map flipped left-right would score
    assert mass_in_patch(maps, masks[found].flip(2)).mean() < inside.mean() / 2
    if method is None:
        # the map of the other class (no square) is not the square's: the target class is honoured
        other, _ = class_activation_maps(trained_convnet, images[found], [0] * len(found), device=CPU)
        assert mass_in_patch(other, masks[found]).mean() < inside.mean() / 2


def test_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = small_model("fast", 3, 32)  # fast: its whitening stem's weight does not train (requires_grad False)
    model.initialize_from_data(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    model.train()
    model.groups[1].eval()  # a mix of modes, restored module by module
    modes = {name: module.training for name, module in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not flags["stem.weight"]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    class_activation_maps(model, images, [0, 1, 2, 0], device=CPU)
    class_activation_maps(model, images, [0, 1, 2, 0], device=CPU, method=INTEGRATED_GRADIENTS)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # eval mode throughout: no BatchNorm running statistics moved
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


def test_same_maps_inside_no_grad_inference_mode_and_through_tta(trained_convnet):
    images, _, _ = patch_data(6, torch.Generator().manual_seed(2))
    classes = [0, 1, 1, 0, 1, 0]
    expected, layer = class_activation_maps(trained_convnet, images, classes, device=CPU, batch_size=4)
    assert layer.name == "groups"
    with torch.no_grad():
        in_no_grad, _ = class_activation_maps(trained_convnet, images, classes, device=CPU)
    with torch.inference_mode():
        in_inference, _ = class_activation_maps(trained_convnet, images, classes, device=CPU)
    # TTA would average mirrored maps; the maps are of the plain model inside it
    through_tta, tta_layer = class_activation_maps(TTAModel(trained_convnet), images, classes, device=CPU)
    assert tta_layer == layer
    for maps in (in_no_grad, in_inference, through_tta):
        np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert all(p.grad is None for p in trained_convnet.parameters())


def test_bad_targets_are_refused_with_the_reason(trained_convnet):
    images = torch.zeros((2, 3, SIZE, SIZE), dtype=torch.uint8)
    with pytest.raises(ValueError, match="2 images but 1 target"):
        class_activation_maps(trained_convnet, images, [0], device=CPU)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.1"):
        class_activation_maps(trained_convnet, images, [0, 2], device=CPU)
    maps, _ = class_activation_maps(trained_convnet, images[:0], [], device=CPU)
    assert maps.shape == (0, SIZE, SIZE)


def test_pick_cam_sample_mixes_misclassified_and_correct():
    labels = np.zeros(100, dtype=np.int64)
    predictions = labels.copy()
    wrong = np.array([3, 17, 42, 50, 61, 77, 88, 95, 96, 99])
    predictions[wrong] = 1
    picked = pick_cam_sample(labels, predictions, 8, seed=0)
    assert len(picked) == len(set(picked.tolist())) == 8
    assert set(picked[:4]) <= set(wrong) and not set(picked[4:]) & set(wrong)  # half each, misclassified first
    np.testing.assert_array_equal(picked, pick_cam_sample(labels, predictions, 8, seed=0))
    assert not np.array_equal(picked, pick_cam_sample(labels, predictions, 8, seed=1))
    # too few misclassified: the correct ones fill up; too few correct: the misclassified do
    one_wrong = labels.copy()
    one_wrong[5] = 1
    picked = pick_cam_sample(labels, one_wrong, 9)
    assert picked[0] == 5 and len(picked) == 9 and 5 not in picked[1:]
    picked = pick_cam_sample(labels, 1 - one_wrong, 9)  # 99 misclassified, 1 correct
    assert len(picked) == 9 and picked[-1] == 5
    # more asked than there are, no errors at all, nothing asked
    assert sorted(pick_cam_sample(labels[:7], predictions[:7], 50).tolist()) == list(range(7))
    assert len(pick_cam_sample(labels, labels, 6)) == 6
    assert len(pick_cam_sample(labels, predictions, 0)) == 0
    with pytest.raises(ValueError, match="100 labels but 3 predictions"):
        pick_cam_sample(labels, predictions[:3], 4)


def red_pixels(path) -> int:
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)).sum())


def test_plot_cam_grid(tmp_path):
    rng = np.random.default_rng(0)
    names = ["t-shirt/top", "trouser", "a class name much too long for a caption"]
    gray = rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    flat = np.zeros((5, 28, 28), dtype=np.float32)  # turbo at 0 is dark blue: any red is a caption or frame
    labels, confidences = np.array([0, 1, 2, 0, 1]), np.full(5, 0.93)
    assert plot_cam_grid(tmp_path / "right.png", gray, flat, labels, labels, confidences, names, title="t") == 5
    wrong = labels.copy()
    wrong[1] = 2
    assert plot_cam_grid(tmp_path / "wrong.png", gray, flat, labels, wrong, confidences, names, title="t") == 5
    assert red_pixels(tmp_path / "right.png") == 0 < red_pixels(tmp_path / "wrong.png")

    colour = rng.integers(0, 256, (9, 3, 64, 64), dtype=np.uint8)
    maps = rng.random((9, 64, 64), dtype=np.float32)
    drawn = plot_cam_grid(
        tmp_path / "colour.png", torch.from_numpy(colour), maps, labels.repeat(2)[:9], labels.repeat(2)[:9],
        np.linspace(0.3, 1, 9), names, title="nine",
    )  # fmt: skip
    assert drawn == 9
    five, nine = Image.open(tmp_path / "right.png"), Image.open(tmp_path / "colour.png")
    assert five.format == nine.format == "PNG"
    assert nine.height > five.height  # three rows of four pairs against two

    assert plot_cam_grid(tmp_path / "none.png", gray[:0], flat[:0], [], [], [], names, title="empty") == 0
    assert Image.open(tmp_path / "none.png").size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour.png", "none.png", "right.png", "wrong.png"]

    with pytest.raises(ValueError, match="5 images, 4 maps"):
        plot_cam_grid(tmp_path / "bad.png", gray, flat[:4], labels, labels, confidences, names, title="t")
    assert not (tmp_path / "bad.png").exists()
