"""Batches of training images: shuffling and augmentation on whole uint8 batches (a quarter of float's
bytes) before the float conversion (after airbench's batch_flip_lr and batch_crop; the photo ops, random
resized crop, colour jitter, TrivialAugment / RandAugment and mixup / cutmix, live in augment.py).

The images come from one of two sources with the same interface: ``ResidentImages`` (the whole split as a
tensor in memory or on the GPU: the fast path for data that fits) or ``StreamedImages`` (each batch read
from the prepared .npy file, the next batch read by a background thread while the current one trains).
Both give the same batches for the same seed: only where the pixels come from differs."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..arrays import NpyReader
from ..model.inference import to_float_images
from .augment import (
    POLICIES,
    adjust_colors,
    apply_policy,
    jitter_factors,
    mix_batch,
    policy_seeds,
    resized_crop,
    resized_crop_boxes,
)

# train.in_memory: auto keeps a split resident when it is at most this large and at most a quarter of the
# memory available (host memory, or the GPU's free memory when training there).
RESIDENT_MAX_BYTES = 1 << 30
RESIDENT_MAX_SHARE = 0.25


def keep_resident(setting: str, nbytes: int, available_bytes: int) -> bool:
    """train.in_memory: always / never, or auto by size."""
    if setting != "auto":
        return setting == "always"
    return nbytes <= min(RESIDENT_MAX_BYTES, RESIDENT_MAX_SHARE * available_bytes)


class ResidentImages:
    """uint8 images (N, C, H, W) held as one tensor on the training device."""

    streamed = False

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.device = images.device

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index.to(self.device)]

    def first(self, n: int) -> torch.Tensor:
        return self.images[:n]


class StreamedImages:
    """uint8 images read batch by batch from a prepared .npy file; memory holds a few batches, not the split."""

    streamed = True

    def __init__(self, reader: NpyReader, device: torch.device):
        self.reader, self.device = reader, device

    def __len__(self) -> int:
        return len(self.reader)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        batch = torch.from_numpy(self.reader.take(index.cpu().numpy()))
        return batch.to(self.device, non_blocking=True) if self.device.type != "cpu" else batch

    def first(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.reader.read(0, n)).to(self.device)


ImageSource = ResidentImages | StreamedImages


def batch_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mirror a random half of the batch (or the images selected by ``mask``) left-right."""
    if mask is None:
        mask = torch.rand(len(images), generator=generator, device="cpu") < 0.5
    mask = mask.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)


def reflect_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad (N, C, H, W) by ``pad`` pixels on each side, for any dtype. iterate_batches pads each uint8
    batch before its float conversion (F.pad's reflect mode rejects uint8, and a uint8 batch is a quarter of the
    bytes of a float one); no padded copy of the whole split is kept."""
    h, w = images.shape[2], images.shape[3]

    def reflect_index(size: int) -> torch.Tensor:
        index = torch.arange(-pad, size + pad, device=images.device).abs()
        return torch.where(index >= size, 2 * (size - 1) - index, index)

    return images[:, :, reflect_index(h)][:, :, :, reflect_index(w)]


def random_offsets(n: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) window offsets in 0..2 pad for ``n`` images."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return dy, dx


def batch_crop(
    padded: torch.Tensor,
    pad: int,
    generator: torch.Generator | None = None,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A random (H, W) window of each padded image (or the window at ``offsets``): a translation by up to
    ``pad`` pixels each way. One slice copy per distinct offset (at most (2 pad + 1)^2) instead of a
    per-pixel gather."""
    n, c, padded_h, padded_w = padded.shape
    h, w = padded_h - 2 * pad, padded_w - 2 * pad
    dy, dx = offsets if offsets is not None else random_offsets(n, pad, generator)
    dy, dx = dy.to(padded.device), dx.to(padded.device)
    out = torch.empty((n, c, h, w), dtype=padded.dtype, device=padded.device)
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            chosen = (dy == y) & (dx == x)
            out[chosen] = padded[chosen, :, y : y + h, x : x + w]
    return out


def batch_translate(
    images: torch.Tensor,
    pad: int,
    generator: torch.Generator | None = None,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Random crop after reflect-padding by ``pad`` pixels: each image moves by up to ``pad`` each way."""
    return images if pad == 0 else batch_crop(reflect_pad(images, pad), pad, generator, offsets)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation. Every field after ``translate`` defaults to off, and an op that is off draws no
    random numbers: batches with them all off are byte-identical to those before they existed."""

    flip: bool
    translate: int
    alternate_flip: bool = False  # airbench: flip a fixed random half in even epochs, the other half in odd ones
    crop_scale: float = 1.0  # random resized crop: smallest area share of a box, aspect 3/4..4/3 (1.0: off)
    color_jitter: float = 0.0  # brightness, contrast and saturation factors uniform in 1 +- this (0: off)
    policy: str = "none"  # "trivialaugment" or "randaugment" (torchvision v2, per image), or "none"
    policy_group_size: int = 1  # images in a row sharing one policy op (1: per image; more: faster, less varied)
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup's blend (0: off)
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix's area; with mixup too, one of the two per batch (0: off)
    num_classes: int = 0  # width of the soft targets that mixup and cutmix yield (needed when either is on)

    def __post_init__(self):
        if self.policy != "none" and self.policy not in POLICIES:
            raise ValueError(f"augmentation policy {self.policy!r}: expected none or one of {', '.join(POLICIES)}")
        if self.policy_group_size < 1:
            raise ValueError(f"policy_group_size must be at least 1 (1: an op per image), got {self.policy_group_size}")
        if self.mixes and self.num_classes < 2:
            raise ValueError(f"mixup / cutmix need num_classes (>= 2) for their soft targets, got {self.num_classes}")

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (and yield soft targets instead of int labels)."""
        return self.mixup > 0 or self.cutmix > 0


def _batch_reads(images: ImageSource, indices: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches at ``indices`` in order; a streamed source reads the next one on a thread meanwhile
    (file reads release the GIL, so reading overlaps the step)."""
    if not images.streamed:
        yield from (images.take(index) for index in indices)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="imgcls-read") as reader:
        pending = reader.submit(images.take, indices[0]) if indices else None
        for position in range(len(indices)):
            batch = pending.result()
            if position + 1 < len(indices):
                pending = reader.submit(images.take, indices[position + 1])
            yield batch


def augment_batch(
    batch: torch.Tensor,
    augmentation: Augmentation,
    *,
    whole_size: int,
    part: slice,
    index: torch.Tensor,
    epoch: int,
    flip_halves: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """The uint8 ops on one batch (B, C, H, W), in order: flip, translate, random resized crop, colour jitter,
    policy. Each draws its random numbers for the whole global batch (``whole_size`` images) and applies the rows
    of ``part``, this rank's share (``index``: their positions in the split); an op that is off draws nothing."""
    if augmentation.flip:
        if augmentation.alternate_flip and flip_halves is not None:
            mask = flip_halves[index] ^ bool(epoch % 2)
        else:
            mask = (torch.rand(whole_size, generator=generator) < 0.5)[part]
        batch = batch_flip(batch, mask=mask)
    if augmentation.translate:
        dy, dx = random_offsets(whole_size, augmentation.translate, generator)
        batch = batch_translate(batch, augmentation.translate, offsets=(dy[part], dx[part]))
    if augmentation.crop_scale < 1:
        height, width = batch.shape[2:]
        boxes = resized_crop_boxes(whole_size, height, width, scale=(augmentation.crop_scale, 1.0), generator=generator)
        batch = resized_crop(batch, boxes[part])
    if augmentation.color_jitter > 0:
        batch = adjust_colors(batch, jitter_factors(whole_size, augmentation.color_jitter, generator)[part])
    if augmentation.policy != "none":
        seeds = policy_seeds(whole_size, generator, augmentation.policy_group_size)
        batch = apply_policy(batch, augmentation.policy, seeds[part])
    return batch


def iterate_batches(
    images: ImageSource | torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator,
    augmentation: Augmentation | None = None,
    epoch: int = 0,
    flip_halves: torch.Tensor | None = None,
    drop_last: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented float batches with their int64 labels (N,) on the training device, or, when the
    augmentation mixes (mixup / cutmix), with soft targets (N, num_classes) float.

    Augmentation works on uint8 (a quarter of float's bytes) before the conversion to float (``augment_batch``;
    translation reflect-pads the batch and crops it per batch: no padded copy of the whole split); mixing works
    on the float batch after it.

    ``shard`` = (rank, world size): data-parallel training. Every rank draws the same order and the same
    augmentation for the whole global batch of ``batch_size`` (a multiple of the world size) and reads and
    yields only its own contiguous part of it: the ranks' parts together are exactly one process's batch
    (with mixing: when each part has an even size, as mixing pairs neighbours, 0 with 1, 2 with 3, ...).
    """
    if isinstance(images, torch.Tensor):
        images = ResidentImages(images)
    rank, world = shard
    order = torch.randperm(len(images), generator=generator)
    end = len(images) - (len(images) % batch_size if drop_last and len(images) >= batch_size else 0)
    batches = [order[start : start + batch_size] for start in range(0, end, batch_size)]
    mine = [slice(rank * len(b) // world, (rank + 1) * len(b) // world) for b in batches]
    indices = [b[part] for b, part in zip(batches, mine, strict=False)]
    for whole, part, index, batch in zip(batches, mine, indices, _batch_reads(images, indices), strict=True):
        # batch: uint8 (B, C, H, W)
        if augmentation is not None:
            batch = augment_batch(
                batch,
                augmentation,
                whole_size=len(whole),
                part=part,
                index=index,
                epoch=epoch,
                flip_halves=flip_halves,
                generator=generator,
            )
        images_float, targets = to_float_images(batch), labels[index.to(labels.device)]
        if augmentation is not None and augmentation.mixes:
            images_float, targets = mix_batch(
                images_float,
                targets,
                augmentation.num_classes,
                mixup_alpha=augmentation.mixup,
                cutmix_alpha=augmentation.cutmix,
                generator=generator,
            )
        yield images_float, targets
