"""Batches from in-memory uint8 tensors: shuffling and augmentation on whole uint8 batches (a quarter of
float's bytes) before the float conversion (after airbench's batch_flip_lr and batch_crop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..model.inference import to_float_images


def batch_flip(images: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror a random half of the batch (or the images selected by ``mask``) left-right."""
    if mask is None:
        mask = torch.rand(len(images), generator=generator, device="cpu") < 0.5
    mask = mask.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)


def reflect_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad (N, C, H, W) by ``pad`` pixels on each side, for any dtype (F.pad's reflect mode
    rejects uint8, and padding the uint8 data set once is 4x cheaper than padding float batches)."""
    h, w = images.shape[2], images.shape[3]

    def reflect_index(size: int) -> torch.Tensor:
        index = torch.arange(-pad, size + pad, device=images.device).abs()
        return torch.where(index >= size, 2 * (size - 1) - index, index)

    return images[:, :, reflect_index(h)][:, :, :, reflect_index(w)]


def batch_crop(padded: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """A random (H, W) window of each padded image: a translation by up to ``pad`` pixels each way.
    One slice copy per distinct offset (at most (2 pad + 1)^2) instead of a per-pixel gather."""
    n, c, padded_h, padded_w = padded.shape
    h, w = padded_h - 2 * pad, padded_w - 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(padded.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(padded.device)
    out = torch.empty((n, c, h, w), dtype=padded.dtype, device=padded.device)
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            chosen = (dy == y) & (dx == x)
            out[chosen] = padded[chosen, :, y:y + h, x:x + w]
    return out


def batch_translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflect-padding by ``pad`` pixels: each image moves by up to ``pad`` each way."""
    return images if pad == 0 else batch_crop(reflect_pad(images, pad), pad, generator)


@dataclass(frozen=True)
class Augmentation:
    flip: bool
    translate: int
    alternate_flip: bool = False  # airbench: flip a fixed random half in even epochs, the other half in odd ones


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, generator: torch.Generator,
    augmentation: Augmentation | None = None, epoch: int = 0, flip_halves: torch.Tensor | None = None,
    drop_last: bool = True, padded_images: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented float batches from uint8 tensors already on the device.

    Augmentation works on uint8 (a quarter of float's bytes) before the conversion to float; with
    ``translate`` it crops from ``padded_images`` (the data set reflect-padded once per fit).
    """
    order = torch.randperm(len(images), generator=generator).to(images.device)
    end = len(images) - (len(images) % batch_size if drop_last and len(images) >= batch_size else 0)
    translate = augmentation.translate if augmentation is not None else 0
    if translate and padded_images is None:
        padded_images = reflect_pad(images, translate)
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size]
        batch = (padded_images if translate else images)[index]  # uint8 (B, C, H[+2p], W[+2p])
        if augmentation is not None and augmentation.flip:
            if augmentation.alternate_flip and flip_halves is not None:
                batch = batch_flip(batch, mask=flip_halves[index.cpu()] ^ bool(epoch % 2))
            else:
                batch = batch_flip(batch, generator)
        if translate:
            batch = batch_crop(batch, translate, generator)
        yield to_float_images(batch), labels[index]


