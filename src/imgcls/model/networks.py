"""The networks. Every model takes float images in [0, 1], shape (N, C, H, W), and normalizes them itself,
so TorchScript/ONNX exports and the evaluate stage feed the same input as training. Which names build which
network, and what the pipeline knows about each, is the table in registry.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, so they travel in the state_dict."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Network(nn.Module):
    """What the training loop may ask of any model. The defaults do nothing; a model with data-dependent
    initialisation or parameters frozen on a schedule overrides them, so the recipe never needs to know
    one model's insides."""

    init_images = 0  # how many of the first training images initialize_from_data needs (0: none)
    HEAD = "head"  # the submodule that maps features to class logits: replaced when fine-tuning to new classes

    def head_parameter_names(self) -> set[str]:
        """Names (as in named_parameters/state_dict) of the head's parameters and buffers."""
        return {name for name in self.state_dict() if name.startswith(self.HEAD + ".")}

    def initialize_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from the first ``init_images`` training images (uint8, (N, C, H, W)),
        before any step."""

    def start_epoch(self, epochs_done: int) -> None:
        """Called before each epoch: freeze or unfreeze parameters on the model's own schedule."""

    def finish_training(self) -> None:
        """Called once after the last epoch: undo any temporary freezing."""


class LeNet(Network):
    """The PyTorch tutorial's network, with its first conv and first Linear sized from the input."""

    HEAD = "fc3"

    def __init__(self, in_channels: int, num_classes: int, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2  # two (5x5 valid conv, 2x2 pool) steps
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TutorialCNN(Network):
    """Three 5x5 conv + 2x2 max-pool blocks of 32/32/64 channels, then Linear 64 and Linear to classes."""

    HEAD = "classifier.3"

    def __init__(self, in_channels: int, num_classes: int, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers, channels = [], in_channels
        for width in (32, 32, 64):
            layers += [nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale can be frozen at 1 (airbench: the following GELU's scale does the job)."""

    def __init__(self, num_features: int, frozen_scale: bool):
        super().__init__(num_features, eps=1e-12 if frozen_scale else 1e-5, momentum=0.4 if frozen_scale else 0.1)
        self.weight.requires_grad = not frozen_scale


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias; optional identity-like (dirac) init of the first in-channels filters."""

    def __init__(self, in_channels: int, out_channels: int, dirac: bool):
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)
        if dirac:
            # Start close to identity on the first in_channels filters: a deep stack trains like a shallow one.
            torch.nn.init.dirac_(self.weight.data[:in_channels])


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then ``convs - 1`` times conv -> BN -> GELU (pooling early makes the
    later convs four times cheaper). Layers are named conv1/norm1, conv2/norm2, ... (two convs: the airbench block)."""

    def __init__(self, in_channels: int, out_channels: int, fast: bool, convs: int = 2):
        super().__init__()
        self.convs = convs
        self.conv1 = Conv(in_channels, out_channels, dirac=fast)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(out_channels, frozen_scale=fast)
        for index in range(2, convs + 1):
            setattr(self, f"conv{index}", Conv(out_channels, out_channels, dirac=fast))
            setattr(self, f"norm{index}", BatchNorm(out_channels, frozen_scale=fast))
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        for index in range(2, self.convs + 1):
            x = self.activation(getattr(self, f"norm{index}")(getattr(self, f"conv{index}")(x)))
        return x


class ConvNet(Network):
    """The BatchNorm CNN behind ``convnet`` and ``fast`` (the default) (the airbench recipe's network).

    fast: a 2x2 first conv whose weights are set from the eigenvectors of training-image patches
    (whitening, after tysam-code/hlb-cifar10 and airbench), BatchNorm with frozen scale, dirac init,
    a bias-free head scaled by 1/9. convnet: a learnable 3x3 stem conv and ordinary BatchNorm.

    The layout: one ConvGroup per entry of ``widths`` (each halves the side), with ``convs`` convolutions
    each; ``stem_stride`` 2 (fast only) makes the whitening stem a space-to-depth step (2x2 patches, stride 2:
    a quarter of the pixels, nothing lost) so every later layer costs a quarter.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: list[float],
        std: list[float],
        widths: tuple[int, ...],
        fast: bool,
        whiten_bias_epochs: float = 0.0,
        convs: tuple[int, ...] = (2, 2, 2),
        stem_stride: int = 1,
    ):
        super().__init__()
        self.fast = fast
        self.whiten_bias_epochs = whiten_bias_epochs  # fast: the whitening stem's bias trains this long
        # Larger images give more patches each: take fewer of them, so memory stays that of 5,000 CIFAR-10
        # images (5,000 x 127 x 127 patches of 128-pixel images would be 3.9 GB of float32, copied twice).
        patches_per_image = (image_size - 1) ** 2
        self.init_images = (
            min(self.WHITENING_IMAGES, max(1, self.WHITENING_PATCHES // patches_per_image)) if fast else 0
        )
        self.normalize = Normalize(mean, std)
        if fast:
            stem_width = 2 * in_channels * 2 * 2  # each 2x2 patch eigenvector, positive and negated
            self.stem = nn.Conv2d(in_channels, stem_width, kernel_size=2, stride=stem_stride, padding=0, bias=True)
            self.stem.weight.requires_grad = False  # set by init_whitening, never trained
            self.stem_post = nn.GELU()
        else:
            stem_width = widths[0]
            self.stem = nn.Conv2d(in_channels, stem_width, kernel_size=3, padding=1, bias=False)
            self.stem_post = nn.Sequential(nn.BatchNorm2d(stem_width), nn.GELU())
        if len(convs) != len(widths) or (stem_stride != 1 and not fast):
            raise ValueError(
                f"ConvNet layout: {len(widths)} widths, {len(convs)} conv counts, stem stride {stem_stride}"
            )
        inputs = (stem_width, *widths[:-1])
        self.groups = nn.Sequential(*(ConvGroup(i, o, fast, n) for i, o, n in zip(inputs, widths, convs, strict=True)))
        self.head = nn.Linear(widths[-1], num_classes, bias=not fast)
        self.head_scale = 1 / 9 if fast else 1.0  # airbench: keeps initial logits small with frozen-scale BN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_post(self.stem(self.normalize(x)))  # (N, stem, H, W)
        x = self.groups(x)  # (N, widths[-1], H/2^groups, W/2^groups)
        x = torch.amax(x, dim=(2, 3))  # global max pool -> (N, widths[-1])
        return self.head(x) * self.head_scale

    # airbench whitens from 5,000 training images: enough for a stable 12x12 (RGB) patch covariance.
    WHITENING_IMAGES = 5000
    WHITENING_PATCHES = WHITENING_IMAGES * 31 * 31  # the 2x2 patches of 5,000 32-pixel images

    def initialize_from_data(self, images: torch.Tensor) -> None:
        if self.fast:
            self.init_whitening(images[: self.init_images].float() / 255)

    def start_epoch(self, epochs_done: int) -> None:
        if self.fast and epochs_done >= self.whiten_bias_epochs:
            self.stem.bias.requires_grad_(False)  # airbench trains the whitening bias for the first epochs only

    def finish_training(self) -> None:
        if self.fast:
            self.stem.bias.requires_grad_(True)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 stem to whiten patches of ``images`` (float [0, 1], (N, C, H, W))."""
        x = self.normalize(images.float())
        c = x.shape[1]
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c, 2, 2).float()  # (P, C, 2, 2)
        flat = patches.reshape(len(patches), -1)
        flat = flat - flat.mean(dim=0)
        covariance = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).view(-1, c, 2, 2)
        self.stem.weight.copy_(torch.cat([filters, -filters]))


class TorchvisionNet(Network):
    """A torchvision ImageNet network (``backbone``) with its classifier sized for our classes. Grayscale
    images are repeated to three channels before normalization, so ImageNet's RGB weights apply unchanged;
    mean and std therefore always have three values (ImageNet's when its weights are loaded)."""

    def __init__(
        self,
        architecture: str,
        head: str,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: list[float],
        std: list[float],
    ):
        super().__init__()
        import torchvision

        self.in_channels = in_channels
        self.normalize = Normalize(mean, std)
        self.backbone = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
        self.HEAD = "backbone." + head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone(self.normalize(x))


# Test-time augmentation levels (evaluate.tta, export.tta) and the views each averages.
TTA_LEVELS = {"none": 1, "mirror": 2, "mirror_shifts": 6}


class TTAModel(nn.Module):
    """Average logits over views of each image (airbench's TTA levels 1 and 2). ``level`` mirror: the image and
    its mirror; mirror_shifts: half that average, half the average of both shifted by one pixel up-left and
    down-right (6 views)."""

    def __init__(self, model: nn.Module, level: str = "mirror_shifts"):
        super().__init__()
        if level not in ("mirror", "mirror_shifts"):
            raise ValueError(f"TTA level {level!r}: mirror or mirror_shifts (none is the model itself)")
        self.model = model
        self.shifts = level == "mirror_shifts"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        both = torch.cat([x, torch.flip(x, dims=[3])])  # (2N, C, H, W): image and mirror
        if not self.shifts:
            return self.model(both).view(2, n, -1).mean(dim=0)
        padded = F.pad(both, (1, 1, 1, 1), mode="reflect")
        views = torch.cat([both, padded[:, :, 0:h, 0:w], padded[:, :, 2 : h + 2, 2 : w + 2]])  # (6N, C, H, W)
        logits = self.model(views).view(3, 2, n, -1)  # (view, mirror, N, classes)
        return 0.5 * logits[0].mean(dim=0) + 0.5 * logits[1:].mean(dim=(0, 1))


def with_tta(model: nn.Module, level: str) -> nn.Module:
    """``model`` wrapped for test-time augmentation at ``level`` (TTA_LEVELS); none: the model itself."""
    return model if level == "none" else TTAModel(model, level)
