"""Duplicate and leak audit (imgcls.audit.duplicates) on small image sets the tests make, decoded by the
project's real image-folder decoder."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from conftest import near_copy
from PIL import Image, ImageDraw, ImageEnhance

from imgcls.arrays import NpyReader, save_array
from imgcls.audit.duplicates import (
    DuplicatePair,
    cross_split_test_rows,
    find_duplicates,
    hash_images,
    plot_pairs,
    summarize,
    write_pairs_csv,
)
from imgcls.preprocess.imagefolder import decode_image_folder

MAX_DISTANCE = 10  # the default the module docstring calibrates
CLASSES = ("circles", "squares", "stripes")


def distinct_picture(rng: np.random.Generator, label: int, size: int = 48) -> Image.Image:
    """A smooth random colour field (6 x 6 noise, upsampled) with a random shape of the class on top."""
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    x, y = rng.integers(4, size // 2, 2)
    w, h = rng.integers(size // 4, size // 2, 2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if label == 0:
        draw.ellipse((x, y, x + w, y + h), fill=colour)
    elif label == 1:
        draw.rectangle((x, y, x + w, y + h), fill=colour)
    else:
        for k in range(0, size, 8):
            draw.line((0, k + x % 8, size, k + y % 8), fill=colour, width=2)
    return field


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An image folder of 180 distinct train and 60 distinct test pictures plus 5 exact copies (byte copies)
    and 5 near copies of train pictures planted in test/, decoded at 32 x 32 by the pipeline's decoder."""
    root = tmp_path_factory.mktemp("duplicates") / "images"
    rng = np.random.default_rng(7)
    sources = []
    for split, per_class in (("train", 60), ("test", 20)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                path = root / split / name / f"{i:03d}.png"
                distinct_picture(rng, label).save(path)
                if split == "train":
                    sources.append((name, path))
    exact, near = [], []
    for k in range(5):
        name, path = sources[k * 17]
        shutil.copyfile(path, root / "test" / name / f"exact{k}.png")
        exact.append((f"{name}/{path.name}", f"{name}/exact{k}.png"))
        name, path = sources[k * 17 + 5]
        near_copy(Image.open(path).convert("RGB"), k).save(root / "test" / name / f"near{k}.jpg", quality=90)
        near.append((f"{name}/{path.name}", f"{name}/near{k}.jpg"))
    decoded = decode_image_folder(
        root,
        image_size=32,
        channels=3,
        on_bad_image="error",
        max_pixels=10**7,
        workdir=root.parent / "work",
        log=lambda message: None,
        workers=1,
    )
    # The decoder's row order: classes in order, files by name within a class.
    names = {
        split: [f"{c}/{p.name}" for c in CLASSES for p in sorted((root / split / c).iterdir())]
        for split in ("train", "test")
    }
    images = {split: decoded.splits[split][0] for split in ("train", "test")}
    for split in images:
        assert len(images[split]) == len(names[split])
        assert decoded.splits[split][1].tolist() == [CLASSES.index(n.split("/")[0]) for n in names[split]]
    hashes = {split: hash_images(images[split]) for split in ("train", "test")}
    return {"images": images, "names": names, "hashes": hashes, "exact": exact, "near": near}


def named(pairs: list[DuplicatePair], names: dict[str, list[str]], kind: str | None = None) -> set:
    return {
        (p.split_a, names[p.split_a][p.index_a], p.split_b, names[p.split_b][p.index_b])
        for p in pairs
        if kind is None or p.kind == kind
    }


def test_planted_copies_are_found_and_nothing_else(planted):
    names = planted["names"]
    pairs = find_duplicates(planted["hashes"], max_distance=MAX_DISTANCE)
    exact = {("train", a, "test", b) for a, b in planted["exact"]}
    near = {("train", a, "test", b) for a, b in planted["near"]}
    assert named(pairs, names, "exact") == exact
    found_near = named(pairs, names, "near") & near
    assert len(found_near) >= 4, f"near copies missed: {sorted(near - found_near)}"
    false = named(pairs, names) - exact - near
    assert not false, f"pairs of distinct images reported: {sorted(false)}"
    assert all(p.distance == 0 for p in pairs if p.kind == "exact")
    assert [p.kind for p in pairs] == sorted(p.kind for p in pairs)  # exact first
    near_distances = [p.distance for p in pairs if p.kind == "near"]
    assert near_distances == sorted(near_distances)

    leaked = cross_split_test_rows(pairs)
    expected = sorted(names["test"].index(b) for _, _, _, b in exact | found_near)
    assert leaked.tolist() == expected
    summary = summarize(pairs, ["train", "test"])
    assert summary["exact_across"] == {"train-test": 5}
    assert summary["exact_within"] == {"train": 0, "test": 0}
    assert summary["near_across"] == {"train-test": len(found_near)}
    assert summary["leaked_test_images"] == 5 + len(found_near)


def test_exact_only_when_near_search_is_off(planted):
    pairs = find_duplicates(planted["hashes"], max_distance=None)
    assert len(pairs) == 5 and {p.kind for p in pairs} == {"exact"}


def test_pairs_within_a_split_are_found(planted):
    images = planted["images"]["train"][:40]
    copies = np.concatenate([images, images[3:4], images[10:11] // 2 + 100])  # an exact and a faded copy
    pairs = find_duplicates({"train": hash_images(copies)}, max_distance=MAX_DISTANCE)
    assert [(p.kind, p.split_a, p.index_a, p.split_b, p.index_b) for p in pairs] == [
        ("exact", "train", 3, "train", 40),
        ("near", "train", 10, "train", 41),
    ]


def test_identical_groups_are_linked_as_stars():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    train[[2, 5, 7]] = train[1]
    test[[0, 3]] = train[1]
    pairs = find_duplicates({"train": hash_images(train), "test": hash_images(test)}, max_distance=MAX_DISTANCE)
    linked = {(p.split_a, p.index_a, p.split_b, p.index_b) for p in pairs}
    # every later train copy to the first, the second test copy to the first, each image to the other
    # split's first copy: 3 + 1 + (2 + 4 - 1) = 9 pairs instead of all 15
    assert linked == {
        ("train", 1, "train", 2),
        ("train", 1, "train", 5),
        ("train", 1, "train", 7),
        ("test", 0, "test", 3),
        ("train", 1, "test", 0),
        ("train", 1, "test", 3),
        ("train", 2, "test", 0),
        ("train", 5, "test", 0),
        ("train", 7, "test", 0),
    }
    assert {p.kind for p in pairs} == {"exact"}
    assert cross_split_test_rows(pairs).tolist() == [0, 3]


def test_flat_images_pair_only_when_identical():
    rng = np.random.default_rng(1)
    images = np.zeros((6, 3, 32, 32), dtype=np.uint8)
    images[1] = 0  # identical to image 0
    images[2] = 1  # near black, not identical
    images[3, :, 5, 5] = 3  # black with one dim pixel
    images[4] = 250
    images[5] = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    hashes = hash_images(images)
    assert hashes.flat.tolist() == [True, True, True, True, True, False]
    pairs = find_duplicates({"train": hashes}, max_distance=63, min_correlation=-1.0)
    assert [(p.kind, p.index_a, p.index_b) for p in pairs] == [("exact", 0, 1)]


def test_csv_has_the_columns_and_file_names(planted, tmp_path):
    pairs = find_duplicates(planted["hashes"], max_distance=MAX_DISTANCE)
    path = tmp_path / "pairs.csv"
    write_pairs_csv(path, pairs, planted["names"])
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["kind", "distance", "split_a", "file_a", "split_b", "file_b"]
    assert len(rows) == len(pairs)
    exact_rows = {(r["file_a"], r["file_b"]) for r in rows if r["kind"] == "exact"}
    assert exact_rows == set(planted["exact"])
    assert all(r["distance"] == "0" for r in rows if r["kind"] == "exact")


def test_plot_draws_pairs_and_an_empty_picture(planted, tmp_path):
    pairs = find_duplicates(planted["hashes"], max_distance=MAX_DISTANCE)
    drawn = plot_pairs(tmp_path / "pairs.png", pairs, planted["images"], planted["names"], limit=4)
    assert drawn == 4
    with Image.open(tmp_path / "pairs.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 400 and picture.size[1] > 150
        assert np.asarray(picture.convert("L")).std() > 20  # images, not a blank canvas
    assert plot_pairs(tmp_path / "none.png", [], planted["images"], planted["names"]) == 0
    with Image.open(tmp_path / "none.png") as picture:
        pixels = np.asarray(picture.convert("L"))
        assert picture.size[0] > 100 and pixels.min() < 128  # the "no pairs" message is drawn


def test_reader_and_array_hash_alike(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 3, 40, 40), dtype=np.uint8)
    save_array(tmp_path / "images.npy", images)
    from_array = hash_images(images)
    from_reader = hash_images(NpyReader(tmp_path / "images.npy"), batch_size=7)
    for field in ("exact", "perceptual", "flat", "thumbnail"):
        assert np.array_equal(getattr(from_array, field), getattr(from_reader, field)), field
    assert len(np.unique(from_array.exact)) == 50  # distinct pixels, distinct digests
    changed = images.copy()
    changed[9, 2, 39, 39] ^= 1  # one bit of one pixel
    assert (hash_images(changed).exact != from_array.exact).tolist() == [i == 9 for i in range(50)]


def test_perceptual_hash_matches_a_direct_computation():
    """The hash's shortcut (resize and DCT folded into one matrix) against PIL's resize and a plain DCT."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    n = np.arange(32)
    dct = np.sqrt(2 / 32) * np.cos(np.pi * (2 * n + 1) * n[:, None] / 64)
    dct[0] /= np.sqrt(2)
    for image, value in zip(images, hash_images(images).perceptual, strict=True):
        gray = Image.fromarray(image.transpose(1, 2, 0)).convert("L")  # PIL's own luma (rounded)
        resized = gray.convert("F").resize((32, 32), Image.BILINEAR)
        coefficients = (dct @ np.asarray(resized, np.float64) @ dct.T)[:8, :8].reshape(-1)[1:]
        bits = coefficients > np.median(coefficients)
        expected = sum(1 << i for i in range(63) if bits[i])
        # PIL rounds luma to whole gray levels; allow the bits that rounding can flip
        assert int(np.bitwise_count(np.uint64(expected) ^ value)) <= 4


def test_grayscale_images_work():
    rng = np.random.default_rng(4)
    base = Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).resize((28, 28), Image.BICUBIC)
    others = [Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).resize((28, 28)) for _ in range(6)]
    train = np.stack([np.asarray(p)[None] for p in [base, *others]])
    brighter = np.asarray(ImageEnhance.Brightness(base).enhance(1.1))[None]
    test = np.stack([brighter, train[3]])
    pairs = find_duplicates({"train": hash_images(train), "test": hash_images(test)}, max_distance=MAX_DISTANCE)
    assert [(p.kind, p.index_a, p.index_b) for p in pairs] == [("exact", 3, 1), ("near", 0, 0)]


def test_bad_input_is_refused_with_the_shape():
    with pytest.raises(ValueError, match=r"uint8 \(N, C, H, W\).*\(4, 28, 28\)"):
        hash_images(np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="max_distance"):
        find_duplicates({}, max_distance=64)
