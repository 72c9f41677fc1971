"""Image files as people have them: 16/32-bit and float images, EXIF-rotated photos, macOS and Jupyter
litter, pixel bombs. Each is written here with Pillow's real encoders and decoded through the one function
the preprocess stage uses."""

from __future__ import annotations

import resource

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from imgcls.errors import DataError
from imgcls.preprocess.imagefolder import decode_image_folder
from imgcls.preprocess.images import ImageTooLarge, decode_image

MAX_PIXELS = 50_000_000  # params.yaml's data.max_image_pixels


def decode(path, size=16, channels=1, max_pixels=MAX_PIXELS):
    return decode_image(str(path), image_size=size, channels=channels, max_pixels=max_pixels)


def gradient(width=256, height=16) -> np.ndarray:
    return np.tile(np.linspace(0, 1, width), (height, 1))  # 0 on the left .. 1 on the right


def assert_full_range_gradient(array: np.ndarray) -> None:
    row = array[0, array.shape[1] // 2].astype(int)  # (C, H, W) -> a middle row
    assert row[0] <= 10 and row[-1] >= 245, row  # dark on the left, bright on the right
    assert (np.diff(row) >= 0).all()  # rising, not clipped into a step
    assert (array == 255).mean() < 0.1 and 100 < array.mean() < 155


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray((gradient() * 65535).astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert_full_range_gradient(decode(path))


def test_32_bit_integer_tiff_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g32.tif"
    Image.fromarray((gradient() * (2**31 - 1)).astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert_full_range_gradient(decode(path))


def test_16_bit_tiff_uses_its_bit_depth(tmp_path):
    path = tmp_path / "g16.tif"
    Image.fromarray((gradient() * 65535).astype(np.uint16)).save(path)
    assert_full_range_gradient(decode(path, channels=3))


def test_float_tiff_in_unit_range_is_scaled_to_255(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(gradient().astype(np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert_full_range_gradient(decode(path))


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape: left half red, right half blue. Orientation 6 = "rotate 90 degrees clockwise to
    # show": the viewer sees red on top, blue below.
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40, 0] = 255
    stored[:, 40:, 2] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    array = decode(path, size=16, channels=3).astype(int)  # (3, 16, 16)
    top, bottom = array[:, :6], array[:, -6:]
    assert top[0].mean() > 200 and top[2].mean() < 60, "red should be on top after rotation"
    assert bottom[2].mean() > 200 and bottom[0].mean() < 60, "blue should be at the bottom after rotation"


def test_pixel_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(path)  # 20 KB on disk, 169 million pixels
    assert path.stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLarge, match=r"13000x13000 = 169,000,000 pixels, over data.max_image_pixels"):
        decode(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 50  # decoding it would take 169 MB (mode 1) to 500 MB (RGB)


def test_large_jpeg_decodes_at_reduced_size_with_the_right_content(tmp_path):
    path = tmp_path / "photo.jpg"
    array = np.zeros((1600, 2400, 3), np.uint8)
    array[:800] = (250, 20, 20)
    array[800:] = (20, 20, 250)
    Image.fromarray(array).save(path, quality=90)
    decoded = decode(path, size=32, channels=3).astype(int)
    assert decoded.shape == (3, 32, 32)
    assert decoded[0, :12].mean() > 220 and decoded[2, -12:].mean() > 220


def test_hidden_files_and_folders_are_ignored_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "f")
    ants = root / "train" / "ants"
    (ants / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork, not a JPEG")
    (ants / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (20, 20), (40, 40, 200)).save(ants / ".ipynb_checkpoints" / "0-checkpoint.png")  # a bee!
    (root / "train" / "__MACOSX").mkdir()
    (root / "train" / "__MACOSX" / "._ants").write_bytes(b"junk")
    (root / "train" / ".DS_Store").write_bytes(b"junk")
    messages = []
    decoded = decode_image_folder(
        root,
        workdir=tmp_path / "decoded",
        image_size=8,
        channels=3,
        on_bad_image="error",
        max_pixels=MAX_PIXELS,
        log=messages.append,
    )
    assert decoded.class_names == ["ants", "bees"]  # __MACOSX is not a class
    assert len(decoded.splits["train"][1]) == 12  # the 6 + 6 real images only
    assert any("ignored 3 hidden file(s)" in m for m in messages), messages


def test_an_oversized_image_in_a_folder_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "f")
    Image.new("1", (13000, 13000)).save(root / "train" / "bees" / "bomb.png")
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\) in train/, first .*bomb.png \(ImageTooLarge"):
        decode_image_folder(
            root,
            workdir=tmp_path / "decoded",
            image_size=8,
            channels=3,
            on_bad_image="error",
            max_pixels=MAX_PIXELS,
            log=print,
        )
    messages = []
    decoded = decode_image_folder(
        root,
        workdir=tmp_path / "decoded",
        image_size=8,
        channels=3,
        on_bad_image="skip",
        max_pixels=MAX_PIXELS,
        log=messages.append,
    )
    assert len(decoded.splits["train"][1]) == 12
    assert any("bomb.png" in m and "over data.max_image_pixels" in m for m in messages)


def tiled_tiff(path, width=64, height=64, tile=40960) -> None:
    """A small TIFF declaring one deflate tile of tile x tile pixels: libtiff would allocate the whole tile."""
    import struct
    import zlib

    data = zlib.compress(bytes(16))
    entries = [
        (256, 3, width),
        (257, 3, height),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 1),
        (277, 3, 1),
        (322, 4, tile),
        (323, 4, tile),
        (324, 4, 8),
        (325, 4, len(data)),
    ]
    ifd_offset = 8 + len(data)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHI", tag, kind, 1) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + data + ifd + b"\x00\x00\x00\x00")


def test_a_tiff_tile_bomb_is_refused_from_its_tags(tmp_path):
    path = tmp_path / "tile.tif"
    tiled_tiff(path)
    assert path.stat().st_size < 300 and Image.open(path).size == (64, 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLarge, match=r"a TIFF tile or strip of 1,677,721,600 pixels"):
        decode(path)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 50


def test_colour_key_transparency_goes_onto_white_and_broken_float_pixels_do_not_darken(tmp_path):
    keyed = tmp_path / "keyed.png"
    array = np.zeros((8, 8), np.uint8)
    array[:, 4:] = 120
    Image.fromarray(array).save(keyed, transparency=0)  # a tRNS chunk: grey value 0 is transparent
    decoded = decode(keyed, size=8)
    assert (decoded[0, :, :4] == 255).all() and (decoded[0, :, 4:] == 120).all()
    floats = tmp_path / "inf.tif"
    values = np.full((8, 8), 0.5, np.float32)
    values[0, 0] = np.inf
    Image.fromarray(values).save(floats)
    assert abs(int(decode(floats, size=8)[0, 4, 4]) - 128) <= 1
