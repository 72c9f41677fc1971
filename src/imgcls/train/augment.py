"""Photo-grade augmentation on whole batches: what torchvision's classification references and timm apply to
photos (random resized crop, colour jitter, TrivialAugment / RandAugment, mixup / cutmix), drawn from a
``torch.Generator`` so that the same seed gives the same batches and torch's global RNG is left as it was.

Each image op comes in two steps: draw the parameters for ``n`` images (``resized_crop_boxes``,
``jitter_factors``, ``policy_seeds``), then apply them (``resized_crop``, ``adjust_colors``, ``apply_policy``).
Data-parallel training draws for the whole global batch and applies its own rows (see
``batches.iterate_batches``); the one-call forms (``random_resized_crop``, ``color_jitter``, ``auto_policy``)
do both for a batch of their own. Images are uint8 (N, C, H, W) in and out, on any device; the random numbers
are drawn on the CPU."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop aspect range (width / height)
CROP_TRIES = 10  # torchvision's tries at a box that fits before falling back to a centre crop
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
POLICIES = ("trivialaugment", "randaugment")
SEED_LIMIT = 1 << 62  # seeds for the global RNG, drawn from the caller's generator


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """torch's global CPU RNG seeded with ``seed`` inside, restored on exit, for library code that draws from it
    (torchvision's policies, torch.distributions). Only the CPU generator is reseeded: ``torch.manual_seed``
    would also reseed the CUDA generators, which ``fork_rng(devices=[])`` does not restore."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator,
) -> torch.Tensor:
    """int64 (n, 4) boxes (top, left, box height, box width): torchvision's RandomResizedCrop.get_params for
    ``n`` images at once. Up to 10 tries per image of an area share uniform in ``scale`` and an aspect
    log-uniform in ``ratio``; the first box that fits wins; an image with none gets the centre crop at the
    nearest allowed aspect. Always draws the same amount (a fixed 22 numbers per image)."""
    log_ratio = torch.tensor(ratio, dtype=torch.float64).log()
    area = height * width * torch.empty((n, CROP_TRIES), dtype=torch.float64).uniform_(*scale, generator=generator)
    aspect = torch.empty((n, CROP_TRIES), dtype=torch.float64).uniform_(*log_ratio.tolist(), generator=generator).exp()
    tries_w, tries_h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (tries_w > 0) & (tries_w <= width) & (tries_h > 0) & (tries_h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(1)
    fallback_h, fallback_w = centre_crop_size(height, width, ratio)
    h = torch.where(found, tries_h.gather(1, first).squeeze(1), fallback_h).long()
    w = torch.where(found, tries_w.gather(1, first).squeeze(1), fallback_w).long()
    # The box's corner uniform over the positions where it fits: torch.randint(0, height - h + 1) per image.
    corner = torch.rand((n, 2), dtype=torch.float64, generator=generator)
    top = torch.minimum((corner[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((corner[:, 1] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def centre_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(h, w) of RandomResizedCrop's fallback: the whole image, cut to the nearest aspect inside ``ratio``."""
    if width / height < min(ratio):
        return round(width / min(ratio)), width
    if width / height > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def box_sample_points(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, size): where the ``size`` output pixels along one axis sample boxes at ``start`` of ``length``
    pixels, in grid_sample's align_corners=False coordinates. Output pixel x samples the box at start +
    (x + 0.5) length / size - 0.5 (half-pixel centres, as resize does), clamped to the box (as cropping first
    would: the box's edge pixels repeat and its neighbours never leak in), which is (2 p + 1) / size - 1."""
    centres = torch.arange(size, device=start.device, dtype=torch.float32).add_(0.5)
    points = start[:, None] + centres * (length / size)[:, None] - 0.5
    points = torch.minimum(torch.maximum(points, start[:, None]), (start + length - 1)[:, None])
    return (2 * points + 1) / size - 1


def resized_crop(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box (top, left, box height, box width) resampled bilinearly to the image's full (H, W), the
    whole batch in one grid_sample, rounded back to uint8: torchvision's resized_crop, within rounding. Boxes lie
    inside their images and are never larger, so this only magnifies (no antialiasing needed)."""
    height, width = images.shape[2:]
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(1)
    # The grid by broadcasting, not affine_grid's matmul: each image's grid is the same whatever the batch.
    grid_x, grid_y = box_sample_points(left, w, width), box_sample_points(top, h, height)  # (N, W), (N, H)
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)  # (N, H, W, 2)
    resampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return resampled.round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop(
    images: torch.Tensor,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop on a uint8 batch (N, C, H, W), same size out: per image a box of random
    area share in ``scale`` and aspect in ``ratio``, magnified bilinearly back to H x W."""
    n, _, height, width = images.shape
    return resized_crop(images, resized_crop_boxes(n, height, width, scale=scale, ratio=ratio, generator=generator))


def jitter_factors(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """float (n, 3): brightness, contrast and saturation factors, each uniform in [1 - strength, 1 + strength]
    (floored at 0, as torchvision's ColorJitter)."""
    return torch.empty((n, 3)).uniform_(max(0.0, 1.0 - strength), 1.0 + strength, generator=generator)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """float (N, 1, H, W) luma of float (N, C, H, W) images with 1 or 3 channels."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g * GRAY_WEIGHTS[1]).add_(b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_colors(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with per-image (brightness, contrast, saturation) ``factors`` (N, 3) applied in that
    order, each as torchvision's adjust_* defines it: brightness scales; contrast blends with the mean luma of the
    image; saturation blends with the image's luma (3 channels only). Clamped after each step like torchvision,
    computed in float and rounded once at the end (torchvision truncates to uint8 after every step)."""
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"colour jitter works on 1- or 3-channel images, got {channels} channels")
    brightness, contrast, saturation = factors.to(images.device, torch.float32).view(-1, 3, 1, 1, 1).unbind(1)
    x = images.float().mul_(brightness).clamp_(0, 255)
    # The mean in float64: a per-image sum whose order may change with the batch's size, kept far from
    # flipping a rounding so a rank's part of a batch matches the same rows of the whole batch.
    pixels = images.shape[2] * images.shape[3]
    mean = grayscale(x).sum(dim=(1, 2, 3), keepdim=True, dtype=torch.float64).div_(pixels).float()  # (N, 1, 1, 1)
    x.mul_(contrast).add_((1 - contrast) * mean).clamp_(0, 255)
    if channels == 3:
        luma = grayscale(x)  # before x changes in place
        x.mul_(saturation).add_((1 - saturation) * luma).clamp_(0, 255)
    return x.round_().to(torch.uint8)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness=s, contrast=s, saturation=s) per image of a uint8 batch, in a fixed
    order (grayscale images: brightness and contrast)."""
    return adjust_colors(images, jitter_factors(len(images), strength, generator))


def policy_seeds(n: int, generator: torch.Generator, group_size: int = 1) -> torch.Tensor:
    """int64 (n,) seeds for ``apply_policy``: one per run of ``group_size`` images (1: one per image)."""
    groups = -(-n // group_size)
    return torch.randint(0, SEED_LIMIT, (groups,), generator=generator).repeat_interleave(group_size)[:n]


def policy_transform(name: str):
    """torchvision v2's TrivialAugmentWide or RandAugment at their defaults (the references' settings)."""
    from torchvision.transforms import v2  # here, not at the top: only runs that use a policy pay its import

    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment()
    raise ValueError(f"unknown augmentation policy {name!r}; expected one of {', '.join(POLICIES)}")


def apply_policy(images: torch.Tensor, name: str, seeds: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) through the policy ``name``, one call per run of equal ``seeds`` (each run draws one op
    and magnitude for all its images) with the global RNG seeded from the run's seed and restored afterwards.
    A policy draws one op per call, so a call on the whole batch would give every image the same op."""
    transform = policy_transform(name)
    runs, lengths = torch.unique_consecutive(seeds, return_counts=True)
    out = torch.empty_like(images)
    start = 0
    with torch.random.fork_rng(devices=[]):
        for seed, length in zip(runs.tolist(), lengths.tolist(), strict=True):
            torch.random.default_generator.manual_seed(seed)  # the CPU RNG the policies draw from
            out[start : start + length] = transform(images[start : start + length])
            start += length
    return out


def auto_policy(images: torch.Tensor, name: str, generator: torch.Generator, *, group_size: int = 1) -> torch.Tensor:
    """TrivialAugmentWide ("trivialaugment") or RandAugment ("randaugment") per image of a uint8 batch, or per
    run of ``group_size`` images sharing one op. Each call costs about 0.25-0.5 ms on the CPU however small the
    images, so per image at 32 px this runs 8-14x slower than flip + translate; groups of 8 are about 3x faster
    there (2x at 64 px, little at 224 px, where the ops' own work dominates) for less variety per batch
    (bench/results/augment.json)."""
    return apply_policy(images, name, policy_seeds(len(images), generator, group_size))


def beta_sample(alpha: float, seed: int) -> float:
    """One draw of Beta(alpha, alpha) (torch.distributions draws from the global RNG: seeded and restored)."""
    with seeded_global_rng(seed):
        return float(torch.distributions.Beta(float(alpha), float(alpha)).sample())


def cutmix_box(height: int, width: int, lam: float, centre: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm's rand_bbox: (top, bottom, left, right) of a box of sides sqrt(1 - lam) H and W around the centre
    at fractions ``centre`` of the image, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    cy, cx = int(centre[0] * height), int(centre[1] * width)
    return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)


def mix_partners(n: int, device: torch.device) -> torch.Tensor:
    """Each image's partner: its neighbour in the (shuffled) batch, 0<->1, 2<->3, ...; an odd last image is its
    own. Pairs stay inside any even-sized, even-aligned part, so data-parallel ranks mix like one process."""
    return (torch.arange(n, device=device) ^ 1).clamp_(max=n - 1)


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup in batch mode on float images (N, C, H, W) and int labels (N,): one lambda ~ Beta(alpha,
    alpha) for the batch; mixup blends each image with its partner, cutmix pastes the partner's box (lambda then
    corrected to the share of the image left unpasted); with both alphas > 0 one of the two, 50/50, per batch.
    Returns (images, soft targets (N, num_classes) float, rows summing to 1). Draws 4 numbers per batch
    whatever the image count, so every rank of a data-parallel batch draws the same."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mix_batch needs mixup_alpha or cutmix_alpha > 0")
    draws = torch.rand(3, dtype=torch.float64, generator=generator).tolist()  # mixup or cutmix, box centre
    seed = int(torch.randint(0, SEED_LIMIT, (1,), generator=generator))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or draws[0] < 0.5)
    lam = beta_sample(cutmix_alpha if use_cutmix else mixup_alpha, seed)
    partner = mix_partners(len(images), images.device)
    if use_cutmix:
        height, width = images.shape[2:]
        top, bottom, left, right = cutmix_box(height, width, lam, (draws[1], draws[2]))
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[partner, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        # In place on the partners' copy (fewer passes); plain mul and add, no fused alpha or lerp, so every
        # element rounds alike whichever batch size a rank has.
        mixed = images[partner].mul_(1.0 - lam).add_(images * lam)
    one_hot = F.one_hot(labels, num_classes).float()
    targets = one_hot * lam + one_hot[partner] * (1.0 - lam)
    return mixed.contiguous(memory_format=torch.channels_last), targets
