"""Where the model looks: class activation maps for any model the project trains, and a picture grid of them.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization"): the map of a class is ReLU(sum_k alpha_k A_k), where A_k are the channels of the last
convolutional feature map and alpha_k the spatial mean of the class score's gradient with respect to A_k.
The layer is found by a probe forward pass with hooks (``find_cam_layer``), so no model's insides are
named here. Models without such a map (vit_*: its only 4-D map is the patch embedding, and the classifier
reads tokens) get integrated gradients instead (Sundararajan et al. 2017, "Axiomatic Attribution for Deep
Networks"; black baseline, a few steps), smoothed, which works for every differentiable model;
``CamLayer.method`` says which one was used. Plain input gradients (Simonyan et al. 2014) were tried first and
dropped: on a trained convnet they were smallest exactly on the saturated square that decided the class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_path
from ..model.checkpoint import unwrap
from ..model.inference import to_float_images
from ..model.networks import TTAModel

GRAD_CAM = "grad-cam"
INTEGRATED_GRADIENTS = "integrated-gradients"  # the fallback: positive pixel attributions, Gaussian-smoothed
INPUT_LAYER = "input"  # CamLayer.name of the fallback: the map is taken at the input itself

# A token sequence (N, L, D) with at least this many tokens after the last 4-D map means the classifier reads
# tokens, not that map (vit_*: 196 patches + the class token after its patch-embedding conv).
MIN_TOKENS = 4
# Integrated gradients: the midpoint rule over this many images between black and the image. Each step costs a
# forward and backward pass (vit_b_16 at 224 px: ~1.1 s per image per step on one Xeon core); on the patch test
# (tests/test_cam.py) 4 steps put 0.36 of the map's mass on the square, 8 steps 0.23: more is not better there.
INTEGRATED_STEPS = 4
# Pixel attributions are speckled; a Gaussian of this fraction of the image side (at least one pixel) turns
# them into regions comparable with Grad-CAM's.
SALIENCY_SIGMA_FRACTION = 1 / 32


@dataclass(frozen=True)
class CamLayer:
    """Where a model's activation maps come from. ``name``: the module (as in ``named_modules()`` of the plain
    model, ``INPUT_LAYER`` for the fallback); ``method``: ``GRAD_CAM`` or ``INTEGRATED_GRADIENTS``; ``call``: which
    call of that module during one forward pass (lenet's one pooling module runs twice); ``map_size``: the
    (h, w) of the feature map before upsampling."""

    name: str
    method: str
    call: int = 0
    map_size: tuple[int, int] = (0, 0)


def plain_model(model: nn.Module) -> nn.Module:
    """The model inside TTAModel, torch.compile and (Distributed)DataParallel wrappers, in any nesting:
    maps are of the plain model (test-time augmentation would average mirrored maps)."""
    while True:
        model = unwrap(model)  # compile, DataParallel/DDP (not TTAModel: its inner model is .model)
        if not isinstance(model, TTAModel):
            return model
        model = model.model


def _is_spatial_map(shape: torch.Size, height: int, width: int) -> bool:
    """A (N, C, h, w) feature map of an (N, C, H, W) input: h, w >= 2, no larger than the input, and with the
    input's aspect ratio to within rounding. NHWC maps (swin_t's stages: (N, h, w, C)) fail the last two
    tests, since their channel count takes the place of w."""
    if len(shape) != 4:
        return False
    h, w = shape[2], shape[3]
    return 2 <= h <= height and 2 <= w <= width and abs(h * width - w * height) <= 2 * max(height, width)


def find_cam_layer(model: nn.Module, image_shape: tuple[int, int, int]) -> CamLayer:
    """The layer Grad-CAM reads for images of ``image_shape`` (C, H, W), found by one probe forward pass with
    hooks on every module: the last module output that is a (N, C, h, w) feature map (h, w >= 2) computed after
    at least one layer with weights (so not the normalized input), i.e. the last map before global pooling.
    When none exists, or a token sequence follows it (a vision transformer's patch embedding), the fallback
    ``INTEGRATED_GRADIENTS`` is returned. The model's train/eval modes are restored."""
    model = plain_model(model)
    channels, height, width = image_shape
    events: list[tuple[str, int, torch.Size | None, bool]] = []  # (module name, call, output shape, weights ran)
    calls: dict[str, int] = {}
    weighted_ran = False

    def make_hook(name: str, module: nn.Module):
        has_weights = any(True for _ in module.parameters(recurse=False))

        def hook(_module: nn.Module, _inputs, output) -> None:
            nonlocal weighted_ran
            weighted_ran = weighted_ran or has_weights
            call = calls.get(name, 0)
            calls[name] = call + 1
            shape = output.shape if isinstance(output, torch.Tensor) else None
            events.append((name, call, shape, weighted_ran))

        return hook

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    probe = torch.full((1, channels, height, width), 0.5, device=device).contiguous(memory_format=torch.channels_last)
    handles = [module.register_forward_hook(make_hook(name, module)) for name, module in model.named_modules() if name]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()  # BatchNorm on one image in training mode fails at 1x1 maps, and would move running stats
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    chosen = None
    for index, (_name, _call, shape, after_weights) in enumerate(events):
        if shape is not None and after_weights and _is_spatial_map(shape, height, width):
            chosen = index
    if chosen is None:
        return CamLayer(INPUT_LAYER, INTEGRATED_GRADIENTS, map_size=(height, width))
    later_tokens = any(
        shape is not None and len(shape) == 3 and shape[1] >= MIN_TOKENS for _, _, shape, _ in events[chosen + 1 :]
    )
    if later_tokens:
        return CamLayer(INPUT_LAYER, INTEGRATED_GRADIENTS, map_size=(height, width))
    name, call, shape, _ = events[chosen]
    return CamLayer(name, GRAD_CAM, call=call, map_size=(int(shape[2]), int(shape[3])))


def class_activation_maps(
    model: nn.Module,
    images_uint8,
    classes: Sequence[int],
    *,
    device: torch.device,
    batch_size: int = 32,
    method: str | None = None,
) -> tuple[np.ndarray, CamLayer]:
    """Float32 maps (N, H, W) in [0, 1] at the input size, one per image for its class in ``classes`` (the
    predicted class, usually), and the layer and method that made them (``find_cam_layer``). ``images_uint8``:
    uint8 (N, C, H, W), a tensor, an array or anything sliced into arrays (an NpyReader); the model (wrapped in
    TTAModel or not) is already on ``device``. ``method``: None lets ``find_cam_layer`` choose; ``INTEGRATED_GRADIENTS``
    forces the fallback (to compare the two). Runs in float32 with gradients enabled even inside
    ``torch.no_grad()``; the model's modes and requires_grad flags are restored, and no ``.grad`` is written.
    A map with no positive evidence for its class is all zeros."""
    model = plain_model(model)
    count, image_shape, classes = _checked_request(images_uint8, classes, method)
    if method == INTEGRATED_GRADIENTS:
        layer = CamLayer(INPUT_LAYER, INTEGRATED_GRADIENTS, map_size=image_shape[1:])
    else:
        layer = find_cam_layer(model, image_shape)
    if count == 0:
        return np.zeros((0, *image_shape[1:]), dtype=np.float32), layer
    module = dict(model.named_modules())[layer.name] if layer.method == GRAD_CAM else None
    modes = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    maps = []
    try:
        model.eval()
        for p, _ in flags:
            # No weight gradients: the backward pass computes only what the map needs (about half the work),
            # and nothing can reach a parameter's .grad.
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for start in range(0, count, batch_size):
                batch = images_uint8[start : start + batch_size]
                batch = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.asarray(batch))
                x = to_float_images(batch.to(device))  # (B, C, H, W) float32 [0, 1]
                targets = torch.tensor(classes[start : start + batch_size], device=device)
                if module is not None:
                    raw = _grad_cam(model, module, layer.call, x, targets)
                else:
                    raw = _integrated_gradients(model, x, targets)
                maps.append(_scale_to_unit(raw).cpu())
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        for m, training in modes.items():
            m.training = training
    return torch.cat(maps).numpy().astype(np.float32, copy=False), layer


def _checked_request(images_uint8, classes: Sequence[int], method: str | None) -> tuple[int, tuple, list[int]]:
    """(image count, (C, H, W), target classes as ints) of a class_activation_maps call; ValueError when the
    images, the classes or the method do not fit together."""
    if method not in (None, INTEGRATED_GRADIENTS):
        raise ValueError(
            f"class_activation_maps: method must be None (automatic) or {INTEGRATED_GRADIENTS!r}, got {method!r}"
        )
    shape = tuple(int(side) for side in images_uint8.shape)  # tensors, arrays and NpyReaders all have one
    if len(shape) != 4:
        raise ValueError(f"class_activation_maps: expected uint8 images (N, C, H, W), got shape {shape}")
    classes = [int(c) for c in classes]
    if len(classes) != shape[0]:
        raise ValueError(f"class_activation_maps: {shape[0]} images but {len(classes)} target classes; give one each")
    return shape[0], shape[1:], classes


def _class_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum over the batch of each image's target logit: its gradient is each image's own (eval mode keeps
    images independent)."""
    if logits.ndim != 2:
        raise ValueError(f"class_activation_maps: expected logits (N, classes), got shape {tuple(logits.shape)}")
    if int(targets.max()) >= logits.shape[1] or int(targets.min()) < 0:
        raise ValueError(
            f"class_activation_maps: target classes must lie in 0..{logits.shape[1] - 1}, "
            f"got {int(targets.min())}..{int(targets.max())}"
        )
    return logits.float().gather(1, targets[:, None]).sum()


def _grad_cam(model: nn.Module, module: nn.Module, call: int, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (B, H, W), not yet scaled, from the ``call``-th output of ``module``."""
    captured: list[torch.Tensor] = []
    calls = 0

    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        nonlocal calls
        calls += 1
        if calls - 1 != call:
            return None
        # A fresh leaf: the graph starts here (nothing before the map is differentiated), and the network goes
        # on with a copy, so an in-place op after it (squeezenet's ReLU(inplace=True)) cannot change A_k.
        activations = output.detach().float().requires_grad_()
        captured.append(activations)
        return activations.clone().to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"Grad-CAM: the layer's call {call} did not happen in this forward pass")
    activations = captured[0]  # (B, K, h, w)
    (gradients,) = torch.autograd.grad(_class_scores(logits, targets), activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # alpha_k: (B, K, 1, 1)
    cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)
    return cam[:, 0]


def _integrated_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Smoothed integrated gradients (B, H, W), not yet scaled: ReLU(sum_c x_c * mean_k d score / d x_c at
    (k + 1/2) / steps * x), the evidence for the class that each pixel adds to a black image."""
    x = x.detach()
    gradients = torch.zeros_like(x)
    for step in range(INTEGRATED_STEPS):
        scaled = (x * ((step + 0.5) / INTEGRATED_STEPS)).requires_grad_()
        gradients += torch.autograd.grad(_class_scores(model(scaled), targets), scaled)[0]
    attributions = (x * gradients / INTEGRATED_STEPS).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    saliency = F.relu(attributions)
    sigma = max(1.0, min(x.shape[2], x.shape[3]) * SALIENCY_SIGMA_FRACTION)
    return _gaussian_blur(saliency, sigma)[:, 0]


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W), edges replicated (no dark border)."""
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


def _scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map (B, H, W) scaled to [0, 1] by its own minimum and maximum; a constant map becomes zeros."""
    maps = maps.detach().float()
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    scaled = torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))
    return scaled.clamp_(0, 1).nan_to_num_(0.0)


def pick_cam_sample(labels: np.ndarray, predictions: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``count`` images to show: up to half of them misclassified and the rest correctly
    classified (more of one kind when the other runs short), drawn at random with ``seed``, misclassified
    first, each kind in index order."""
    labels, predictions = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    if len(labels) != len(predictions):
        raise ValueError(f"pick_cam_sample: {len(labels)} labels but {len(predictions)} predictions")
    if count < 0:
        raise ValueError(f"pick_cam_sample: count must be >= 0, got {count}")
    wrong = np.flatnonzero(labels != predictions)
    right = np.flatnonzero(labels == predictions)
    take_wrong = min(len(wrong), count // 2)
    take_right = min(len(right), count - take_wrong)
    take_wrong = min(len(wrong), count - take_right)  # fill with misclassified when correct ones ran short
    rng = np.random.default_rng(seed)
    chosen_wrong = np.sort(rng.choice(wrong, size=take_wrong, replace=False))
    chosen_right = np.sort(rng.choice(right, size=take_right, replace=False))
    return np.concatenate([chosen_wrong, chosen_right]).astype(np.int64)


def _short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _draw_pair(panels, image: np.ndarray, heat: np.ndarray, caption: tuple[str, str], wrong: bool, alpha: float):
    """One image (C, H, W) in ``panels[0]`` and with its map overlaid in ``panels[1]``; ``caption``: (true
    class, "predicted confidence"); a misclassified pair gets red captions and frames."""
    picture_ax, overlay_ax = panels
    image = image.transpose(1, 2, 0)  # (H, W, C)
    gray = image.shape[2] != 3
    shown = image.mean(axis=2) if gray else image  # 1 channel (or an unusual count): gray
    # nearest: a 28-pixel image stays sharp when blown up to the panel; the map itself is smooth already
    for ax in (picture_ax, overlay_ax):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=255, interpolation="nearest")
    overlay_ax.imshow(heat, cmap="turbo", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
    colour = "red" if wrong else "black"
    picture_ax.set_title(f"true {caption[0]}", fontsize=7, color=colour)
    overlay_ax.set_title(f"pred {caption[1]}", fontsize=7, color=colour)
    for ax in (picture_ax, overlay_ax):
        for spine in ax.spines.values():
            spine.set_visible(wrong)
            spine.set_color("red")
            spine.set_linewidth(2)


def plot_cam_grid(
    path: Path,
    images_uint8,
    maps: np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int],
    confidences: Sequence[float],
    class_names: Sequence[str],
    *,
    title: str,
    overlay_alpha: float = 0.45,
) -> int:
    """A PNG grid: per image the picture (captioned with its true class) beside it with its activation map
    overlaid (captioned with the prediction and its confidence); misclassified pairs have red captions and
    frames. ``images_uint8``: (N, C, H, W) with 1 or 3 channels; ``maps``: (N, H, W) in [0, 1]. Returns how
    many images it drew; with none, the picture says so. Written atomically."""
    from matplotlib.figure import Figure  # no pyplot: nothing global changes, and no display is needed

    images = images_uint8.cpu().numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    maps = np.asarray(maps, dtype=np.float32)
    count = len(images)
    if not (len(maps) == len(labels) == len(predictions) == len(confidences) == count):
        raise ValueError(
            f"plot_cam_grid: {count} images, {len(maps)} maps, {len(labels)} labels, {len(predictions)} predictions "
            f"and {len(confidences)} confidences; give one of each per image"
        )
    if count and (images.ndim != 4 or maps.shape != (count, *images.shape[2:])):
        raise ValueError(f"plot_cam_grid: images (N, C, H, W) {images.shape} and maps (N, H, W) {maps.shape} differ")
    pairs_per_row = max(1, min(4, count))
    rows = max(1, math.ceil(count / pairs_per_row))
    columns = 2 * pairs_per_row
    fig = Figure(figsize=(max(4.0, 1.5 * columns), 1.85 * rows + 0.5))
    fig.suptitle(title, fontsize=9)
    if count == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no images to show", ha="center", va="center", fontsize=10)
    else:
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(count):
            panels = axes[i // pairs_per_row, 2 * (i % pairs_per_row) : 2 * (i % pairs_per_row) + 2]
            caption = (
                _short(class_names[int(labels[i])]),
                f"{_short(class_names[int(predictions[i])])} {float(confidences[i]):.2f}",
            )
            _draw_pair(panels, images[i], maps[i], caption, int(labels[i]) != int(predictions[i]), overlay_alpha)
    fig.tight_layout()
    with atomic_path(path, clean_stale=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return count
