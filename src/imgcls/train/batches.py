"""Batches of training images: shuffling and augmentation on whole uint8 batches (a quarter of float's
bytes) before the float conversion (after airbench's batch_flip_lr and batch_crop).

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
    flip: bool
    translate: int
    alternate_flip: bool = False  # airbench: flip a fixed random half in even epochs, the other half in odd ones


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
    """Shuffled, augmented float batches; ``labels`` are on the training device.

    Augmentation works on uint8 (a quarter of float's bytes) before the conversion to float; translation
    reflect-pads the batch and crops it (per batch: no padded copy of the whole split).

    ``shard`` = (rank, world size): data-parallel training. Every rank draws the same order and the same
    augmentation for the whole global batch of ``batch_size`` (a multiple of the world size) and reads and
    yields only its own contiguous part of it: the ranks' parts together are exactly one process's batch.
    """
    if isinstance(images, torch.Tensor):
        images = ResidentImages(images)
    rank, world = shard
    order = torch.randperm(len(images), generator=generator)
    end = len(images) - (len(images) % batch_size if drop_last and len(images) >= batch_size else 0)
    translate = augmentation.translate if augmentation is not None else 0
    batches = [order[start : start + batch_size] for start in range(0, end, batch_size)]
    mine = [slice(rank * len(b) // world, (rank + 1) * len(b) // world) for b in batches]
    indices = [b[part] for b, part in zip(batches, mine, strict=False)]
    for whole, part, index, batch in zip(batches, mine, indices, _batch_reads(images, indices), strict=True):
        # batch: uint8 (B, C, H, W)
        if augmentation is not None and augmentation.flip:
            if augmentation.alternate_flip and flip_halves is not None:
                mask = flip_halves[index] ^ bool(epoch % 2)
            else:
                mask = (torch.rand(len(whole), generator=generator) < 0.5)[part]
            batch = batch_flip(batch, mask=mask)
        if translate:
            dy, dx = random_offsets(len(whole), translate, generator)
            batch = batch_translate(batch, translate, offsets=(dy[part], dx[part]))
        yield to_float_images(batch), labels[index.to(labels.device)]
