"""The photo augmentations (src/imgcls/train/augment.py) and their place in iterate_batches: shapes and dtypes
kept, determinism from the caller's generator alone, the global RNG untouched, known images giving known
outputs, and batches with the new ops off byte-identical to those before they existed."""

from __future__ import annotations

import pytest
import torch

from imgcls.model.inference import to_float_images
from imgcls.train.augment import (
    adjust_colors,
    auto_policy,
    color_jitter,
    mix_batch,
    random_resized_crop,
    resized_crop,
    resized_crop_boxes,
)
from imgcls.train.batches import (
    Augmentation,
    ResidentImages,
    batch_flip,
    batch_translate,
    iterate_batches,
    random_offsets,
)

OPS = {
    "crop": lambda images, generator: random_resized_crop(images, scale=(0.08, 1.0), generator=generator),
    "jitter": lambda images, generator: color_jitter(images, 0.4, generator),
    "trivialaugment": lambda images, generator: auto_policy(images, "trivialaugment", generator),
    "randaugment": lambda images, generator: auto_policy(images, "randaugment", generator),
}
ALL_ON = Augmentation(
    flip=True,
    translate=2,
    crop_scale=0.35,
    color_jitter=0.4,
    policy="trivialaugment",
    mixup=0.8,
    cutmix=1.0,
    num_classes=5,
)


def random_images(n: int = 16, channels: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_is_deterministic_from_its_generator_alone(op, channels):
    images = random_images(channels=channels)
    global_state = torch.get_rng_state()
    first = OPS[op](images, torch.Generator().manual_seed(1))
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, OPS[op](images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, OPS[op](images, torch.Generator().manual_seed(2)))
    assert not torch.equal(first, images)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_a_crop_of_the_whole_image_at_its_own_aspect_returns_the_image():
    images = random_images(size=20)
    same = random_resized_crop(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    assert torch.equal(same, images)


def test_a_crop_magnifies_its_box_bilinearly():
    # A ramp 8 x along the columns of a 32 x 32 image; the box of columns 8..23 (16 wide) magnified 2x samples
    # column 8 + (x + 0.5) / 2 - 0.5 for output column x: values 62 + 4 x (a ramp stays a ramp under bilinear),
    # held at the box's own edge values (64 and 184), never reaching past it.
    ramp = (torch.arange(32) * 8).to(torch.uint8).expand(1, 1, 32, 32)
    out = resized_crop(ramp, torch.tensor([[8, 8, 16, 16]]))
    expected = (62 + 4 * torch.arange(32)).clamp(64, 184).to(torch.uint8)
    assert torch.equal(out[0, 0], expected.expand(32, 32))


def test_crops_match_torchvisions_crop_then_resize():
    from torchvision.transforms.v2 import functional as TF

    images = random_images(n=32, size=19)[:, :, :, :15]  # (32, 3, 19, 15): not square
    boxes = resized_crop_boxes(32, 19, 15, scale=(0.08, 1.0), generator=torch.Generator().manual_seed(4))
    assert (boxes[:, 2] <= 19).all() and (boxes[:, 3] <= 15).all() and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 19).all() and (boxes[:, 1] + boxes[:, 3] <= 15).all()
    ours = resized_crop(images, boxes)
    for image, box, out in zip(images, boxes.tolist(), ours, strict=True):
        reference = TF.resized_crop(image.float(), *box, size=[19, 15], antialias=False)
        assert (out.float() - reference).abs().max() <= 0.5 + 1e-3  # ours is theirs, rounded


def test_small_crops_of_a_two_colour_image_are_mostly_one_colour():
    two_colour = torch.zeros((64, 3, 64, 64), dtype=torch.uint8)
    two_colour[:, :, :, 32:] = 255  # left half black, right half white
    crops = random_resized_crop(two_colour, scale=(0.02, 0.05), generator=torch.Generator().manual_seed(0))
    white_share = (crops == 255).float().mean(dim=(1, 2, 3))
    black_share = (crops == 0).float().mean(dim=(1, 2, 3))
    majority = torch.maximum(white_share, black_share)
    assert majority.mean() > 0.85 and (majority == 1).sum() >= 32  # most boxes lie on one side of the edge
    assert 0 < white_share.mean() < 1  # both sides get picked
    straddling = majority < 1
    # A box across the edge shows it magnified (at least 4x here): a blend several columns wide, not one.
    blended_columns = ((crops[straddling, 0, 0] > 0) & (crops[straddling, 0, 0] < 255)).sum(dim=1)
    assert straddling.any() and (blended_columns >= 3).all()


def test_colour_jitter_of_strength_zero_is_the_identity():
    for channels in (1, 3):
        images = random_images(channels=channels)
        assert torch.equal(color_jitter(images, 0.0, torch.Generator().manual_seed(3)), images)


def test_colour_factors_act_as_torchvision_defines_them():
    images = random_images(n=3, channels=3)
    darker, flat, gray = adjust_colors(images, torch.tensor([[0.5, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
    assert torch.equal(darker, (images[0].float() * 0.5).round().to(torch.uint8))
    assert flat.unique().numel() == 1  # contrast 0: every pixel is the image's mean luma
    luma = (0.2989 * images[2, 0].float() + 0.587 * images[2, 1].float() + 0.114 * images[2, 2].float()).round()
    assert torch.equal(gray, luma.to(torch.uint8).expand(3, -1, -1))  # saturation 0: the luma in every channel
    bright_gray = adjust_colors(random_images(n=1, channels=1), torch.tensor([[2.0, 1.0, 0.0]]))
    assert torch.equal(bright_gray, (random_images(n=1, channels=1).float() * 2).clamp(max=255).to(torch.uint8))


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_jitter_matches_torchvisions_adjustments(channels):
    from torchvision.transforms.v2 import functional as TF

    images = random_images(n=8, channels=channels)
    factors = torch.empty((8, 3)).uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(5))
    ours = adjust_colors(images, factors)
    for image, (brightness, contrast, saturation), out in zip(images, factors.tolist(), ours, strict=True):
        reference = TF.adjust_contrast(TF.adjust_brightness(image.float() / 255, brightness), contrast)
        if channels == 3:
            reference = TF.adjust_saturation(reference, saturation)
        assert (out.float() - reference * 255).abs().max() <= 0.5 + 1e-3  # theirs in float, rounded once


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment"])
def test_a_policy_gives_the_images_of_a_batch_different_ops(name):
    same_image = random_images(n=1).expand(16, -1, -1, -1).contiguous()
    out = auto_policy(same_image, name, torch.Generator().manual_seed(0))
    assert len({image.numpy().tobytes() for image in out}) >= 8
    # Groups of 4 share one op and magnitude: the same image comes out the same within a group.
    grouped = auto_policy(same_image, name, torch.Generator().manual_seed(0), group_size=4)
    assert all(torch.equal(grouped[i], grouped[i - i % 4]) for i in range(16))
    assert len({image.numpy().tobytes() for image in grouped}) >= 2


def constant_images(values: list[float], size: int = 10) -> torch.Tensor:
    """float images (N, 3, size, size), image i filled with values[i]."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()


def test_mixup_blends_neighbours_and_its_targets_say_how_much():
    images, labels = constant_images([0.0, 1.0, 0.25, 0.75]), torch.tensor([0, 1, 2, 3])
    global_state = torch.get_rng_state()
    mixed, targets = mix_batch(images, labels, 4, mixup_alpha=1.0, cutmix_alpha=0.0, generator=torch.Generator())
    assert torch.equal(torch.get_rng_state(), global_state)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    lam = targets[0, 0]  # image 0 (all 0) mixed with image 1 (all 1): its pixels are 1 - lambda
    assert 0 < lam < 1 and torch.allclose(mixed[0], torch.full_like(mixed[0], 1 - lam))
    assert torch.allclose(targets[1, [1, 0]], torch.stack([lam, 1 - lam]))
    assert torch.allclose(mixed[2], torch.full_like(mixed[2], 0.25 * lam + 0.75 * (1 - lam)))


def test_cutmix_lambda_is_the_share_of_the_image_not_pasted_over():
    images, labels = constant_images([0.0, 1.0, 0.0, 1.0, 0.5], size=32), torch.tensor([0, 1, 2, 1, 4])
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        mixed, targets = mix_batch(images, labels, 5, mixup_alpha=0.0, cutmix_alpha=1.0, generator=generator)
        assert torch.allclose(targets.sum(1), torch.ones(5))
        pasted = (mixed[0] == 1).float().mean()  # image 0's pixels that came from image 1
        assert torch.isclose(targets[0, 1], pasted) and torch.isclose(targets[0, 0], 1 - pasted)
        assert torch.equal(mixed[4], images[4]) and targets[4, 4] == 1  # an odd last image is its own partner


def reference_iterate_batches(images, labels, batch_size, *, generator, augmentation, epoch, flip_halves, shard):
    """iterate_batches as it was before the photo augmentations (a copy, for the byte-identity check)."""
    images = ResidentImages(images)
    rank, world = shard
    order = torch.randperm(len(images), generator=generator)
    end = len(images) - (len(images) % batch_size if len(images) >= batch_size else 0)
    translate = augmentation.translate if augmentation is not None else 0
    batches = [order[start : start + batch_size] for start in range(0, end, batch_size)]
    mine = [slice(rank * len(b) // world, (rank + 1) * len(b) // world) for b in batches]
    for whole, part in zip(batches, mine, strict=True):
        index = whole[part]
        batch = images.take(index)
        if augmentation is not None and augmentation.flip:
            if augmentation.alternate_flip and flip_halves is not None:
                mask = flip_halves[index] ^ bool(epoch % 2)
            else:
                mask = (torch.rand(len(whole), generator=generator) < 0.5)[part]
            batch = batch_flip(batch, mask=mask)
        if translate:
            dy, dx = random_offsets(len(whole), translate, generator)
            batch = batch_translate(batch, translate, offsets=(dy[part], dx[part]))
        yield to_float_images(batch), labels[index]


@pytest.mark.parametrize(
    ("augmentation", "shard", "channels"),
    [
        (None, (0, 1), 3),
        (Augmentation(flip=True, translate=2), (0, 1), 3),
        (Augmentation(flip=True, translate=1, alternate_flip=True), (0, 1), 3),
        (Augmentation(flip=True, translate=2), (1, 2), 1),
        (Augmentation(flip=False, translate=3, crop_scale=1.0, color_jitter=0.0, policy="none"), (0, 1), 3),
    ],
)
def test_with_the_new_ops_off_batches_are_byte_identical_to_before(augmentation, shard, channels):
    images, labels = random_images(n=50, channels=channels, size=12), torch.arange(50) % 5
    flip_halves = torch.rand(50, generator=torch.Generator().manual_seed(9)) < 0.5
    generators = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for epoch in range(2):
        common = dict(augmentation=augmentation, epoch=epoch, flip_halves=flip_halves, shard=shard)
        new = list(iterate_batches(images, labels, 16, generator=generators[0], **common))
        old = list(reference_iterate_batches(images, labels, 16, generator=generators[1], **common))
        assert len(new) == len(old) == 3
        for (new_x, new_y), (old_x, old_y) in zip(new, old, strict=True):
            assert new_x.dtype == old_x.dtype and new_x.stride() == old_x.stride()
            assert new_x.numpy().tobytes() == old_x.numpy().tobytes() and torch.equal(new_y, old_y)
    assert torch.equal(generators[0].get_state(), generators[1].get_state())  # the same draws, no more


def all_on_batches(seed: int, shard: tuple[int, int] = (0, 1), augmentation: Augmentation = ALL_ON) -> list:
    images, labels = random_images(n=40, size=16), torch.arange(40) % 5
    generator = torch.Generator().manual_seed(seed)
    return list(iterate_batches(images, labels, 16, generator=generator, augmentation=augmentation, shard=shard))


def test_all_new_ops_on_give_soft_targets_the_same_for_the_same_seed():
    global_state = torch.get_rng_state()
    batches = all_on_batches(0)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert len(batches) == 2
    for images, targets in batches:
        assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1
        assert targets.shape == (16, 5) and torch.allclose(targets.sum(1), torch.ones(16))
    again, other = all_on_batches(0), all_on_batches(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(batches[0][0], other[0][0])


@pytest.mark.parametrize("group_size", [1, 4])
def test_all_new_ops_on_shard_halves_make_up_the_single_process_batch(group_size):
    augmentation = Augmentation(**{**ALL_ON.__dict__, "policy_group_size": group_size})
    whole = all_on_batches(3, augmentation=augmentation)
    halves = [all_on_batches(3, (rank, 2), augmentation) for rank in range(2)]
    for position, (images, targets) in enumerate(whole):
        assert torch.equal(images, torch.cat([halves[0][position][0], halves[1][position][0]]))
        assert torch.equal(targets, torch.cat([halves[0][position][1], halves[1][position][1]]))


def test_mixing_needs_a_class_count_and_a_known_policy():
    with pytest.raises(ValueError, match="num_classes"):
        Augmentation(flip=True, translate=0, mixup=0.2)
    with pytest.raises(ValueError, match="trivialaugment"):
        Augmentation(flip=True, translate=0, policy="autoaugment")
