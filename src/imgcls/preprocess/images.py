"""One image file -> the model's uint8 input (C, H, W). The preprocess stage decodes every image through
``decode_image``; anything else that turns a picture into model input must call it (or, for pictures
decoded elsewhere such as video frames, ``prepare_image``, its second half), so training and use see the
same pixels.

What it takes care of, in order: a pixel cap checked on the header before decoding (a 20 KB PNG can
claim 13000x13000 pixels), JPEG decoding at reduced size where the target is much smaller, EXIF
orientation, 16/32-bit integer and float images scaled (not clipped) to 8 bits, transparency composited
onto white, then the channel conversion and the resize to a square (``resize``, params.yaml's data.resize):

- ``squash``: stretched to image_size x image_size (a 4:3 photo is distorted);
- ``crop``: scaled so the shorter side is image_size, then the centre square cut out (torchvision's
  ``Resize(s)`` + ``CenterCrop(s)``, same sizes and offsets);
- ``pad``: scaled so the longer side is image_size, then black (0) bars on both ends of the shorter side; when
  the padding is odd, the right (or bottom) bar is the one pixel wider.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

# What Pillow raises on a damaged or unsupported file; the caller counts these as unreadable images.
# Pillow's parsers (EXIF, TIFF tags, PNG chunks) can also fail on hostile bytes with KeyError, TypeError,
# IndexError, struct.error or ZeroDivisionError: a file that breaks the decoder is an unreadable file too.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    DataError,
    KeyError,
    TypeError,
    IndexError,
    ZeroDivisionError,
    struct.error,
    MemoryError,
    NotImplementedError,
    AttributeError,
)

HIGH_BIT_INTEGER_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
BITS_PER_SAMPLE_TAG = 258  # TIFF: 16 or 32 for integer images
TIFF_ROWS_PER_STRIP, TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 278, 322, 323  # libtiff allocates a whole strip or tile
# How a picture of any shape becomes a square (module docstring). params/data.py's data.resize lists the same
# names (tests/test_resize.py checks); a model file naming another is refused by predict.
RESIZE_MODES = ("squash", "crop", "pad")
PAD_VALUE = 0  # pad: the bars are black
# Pillow's reducing_gap: a large picture is first shrunk by a whole factor (a box filter) while it stays at
# least 3x the target, then resampled bilinearly: far faster for photos, and hard to tell from a full resample.
REDUCING_GAP = 3.0


class ImageTooLarge(DataError):
    """An image whose header asks for more pixels than data.max_image_pixels."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale images to 8 bits over their format's range. Integer
    images are shifted in place (a 7000x7000 16-bit PNG would take 1.5 GB through float64 copies)."""
    if image.mode in HIGH_BIT_INTEGER_MODES:
        values = np.asarray(image)  # uint16 for I;16*, int32 for I
        bits = 16 if image.mode.startswith("I;16") else None
        tag = image.tag_v2.get(BITS_PER_SAMPLE_TAG) if hasattr(image, "tag_v2") else None
        if bits is None and tag is not None:
            bits = int(tag[0] if isinstance(tag, tuple) else tag)
        if bits is None:  # a 32-bit "I" image without a bit depth: 16-bit data if it fits, else 32-bit
            bits = 16 if values.max(initial=0) <= 65535 else 32
        # The top 8 bits of the format's range: 16-bit data >> 8, signed 32-bit ("I") data >> 23.
        top = np.clip(values, 0, 65535 if bits <= 16 else 2**31 - 1)
        top >>= 8 if bits <= 16 else 23
        return Image.fromarray(top.astype(np.uint8), mode="L")
    if image.mode == "F":
        values = np.array(image, dtype=np.float32)
        finite = np.isfinite(values)
        # Float images conventionally hold [0, 1]; anything else is taken as 0..255 and clipped. Infinities
        # and NaN (broken pixels) do not decide the range: they become its ends and 0.
        unit = not finite.any() or (values[finite].min() >= 0 and values[finite].max() <= 1)
        np.nan_to_num(values, copy=False, nan=0.0, posinf=1.0 if unit else 255.0, neginf=0.0)
        if unit:
            values *= 255.0
        np.clip(values, 0, 255, out=values)
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    return image


def _check_pixels(opened: Image.Image, max_pixels: int) -> None:
    width, height = opened.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels, over data.max_image_pixels ({max_pixels:,}); not decoded"
        )
    if opened.format == "TIFF":  # a small image can declare one enormous tile or strip
        tags = opened.tag_v2
        tile = tags.get(TIFF_TILE_WIDTH, 0) * tags.get(TIFF_TILE_LENGTH, 0)
        strip = width * tags.get(TIFF_ROWS_PER_STRIP, 0)
        if max(tile, strip) > max_pixels:
            raise ImageTooLarge(
                f"a TIFF tile or strip of {max(tile, strip):,} pixels, over data.max_image_pixels "
                f"({max_pixels:,}); not decoded"
            )


def scaled_size(size: tuple[int, int], image_size: int, resize: str) -> tuple[int, int]:
    """(width, height) that a picture of ``size`` (width, height) is resampled to before any crop or pad."""
    if resize == "squash":
        return image_size, image_size
    width, height = size
    short, long = min(width, height), max(width, height)
    if resize == "crop":  # torchvision's Resize(s): the shorter side s, the longer truncated
        short, long = image_size, int(image_size * long / short)
    elif resize == "pad":  # the longer side s, the shorter rounded (a one-pixel line stays one pixel)
        short, long = max(1, round(image_size * short / long)), image_size
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
    return (short, long) if width <= height else (long, short)


def _square(image: Image.Image, image_size: int, resize: str) -> Image.Image:
    """``image`` (L or RGB) as image_size x image_size under ``resize`` (module docstring)."""
    target = scaled_size(image.size, image_size, resize)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    width, height = target
    if resize == "crop":  # offsets rounded as torchvision's CenterCrop rounds them (round half to even)
        left, top = int(round((width - image_size) / 2.0)), int(round((height - image_size) / 2.0))
        return image.crop((left, top, left + image_size, top + image_size))
    if resize == "pad":  # the first bar gets the smaller half: an odd extra pixel goes right or bottom
        canvas = Image.new(image.mode, (image_size, image_size), PAD_VALUE)
        canvas.paste(image, ((image_size - width) // 2, (image_size - height) // 2))
        return canvas
    return image


def prepare_image(image: Image.Image, *, image_size: int, channels: int, resize: str = "squash") -> np.ndarray:
    """A decoded picture (a file's, a video frame's) -> the model's uint8 input (channels, image_size,
    image_size): high-bit and float images scaled to 8 bits, transparency onto white, channel conversion,
    made square by ``resize`` (squash | crop | pad). Everything that turns a picture into model input goes
    through here."""
    image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # (P, L and RGB images can name a transparent colour: a tRNS chunk.)
        # Composite transparent pixels onto white instead of whatever colour the hidden pixels hold.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = _square(image.convert("L" if channels == 1 else "RGB"), image_size, resize)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, H, W)


def decode_image(
    path: str | BinaryIO, *, image_size: int, channels: int, max_pixels: int, resize: str = "squash"
) -> np.ndarray:
    """uint8 array (channels, image_size, image_size) of the image file at ``path`` (or an open binary file),
    made square by ``resize`` (squash | crop | pad)."""
    with Image.open(path) as opened:
        _check_pixels(opened, max_pixels)
        if opened.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when that still covers the size the mode resamples to in both
            # directions (crop: the shorter side stays >= image_size): far less memory and time. The size is
            # the file's, before EXIF rotation; scaled_size treats width and height alike, so it fits either way.
            opened.draft(None, scaled_size(opened.size, image_size, resize))
        image = ImageOps.exif_transpose(opened)  # a copy, rotated as the camera says (or the image itself)
        return prepare_image(image, image_size=image_size, channels=channels, resize=resize)
