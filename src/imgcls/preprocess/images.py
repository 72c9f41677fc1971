"""One image file -> the model's uint8 input (C, H, W). The preprocess stage decodes every image through
``decode_image``; anything else that turns a picture into model input must call it too, so training and
use see the same pixels.

What it takes care of, in order: a pixel cap checked on the header before decoding (a 20 KB PNG can
claim 13000x13000 pixels), JPEG decoding at reduced size where the target is much smaller, EXIF
orientation, 16/32-bit integer and float images scaled (not clipped) to 8 bits, transparency composited
onto white, then the channel conversion and the resize.
"""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

# What Pillow raises on a damaged or unsupported file; the caller counts these as unreadable images.
# Pillow's parsers (EXIF, TIFF tags, PNG chunks) can also fail on hostile bytes with KeyError, TypeError,
# IndexError, struct.error or ZeroDivisionError: a file that breaks the decoder is an unreadable file too.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, DataError,
                 KeyError, TypeError, IndexError, ZeroDivisionError, struct.error, MemoryError)

HIGH_BIT_INTEGER_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
BITS_PER_SAMPLE_TAG = 258  # TIFF: 16 or 32 for integer images


class ImageTooLarge(DataError):
    """An image whose header asks for more pixels than data.max_image_pixels."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale images to 8 bits over their format's range."""
    if image.mode in HIGH_BIT_INTEGER_MODES:
        values = np.asarray(image).astype(np.float64)
        bits = 16 if image.mode.startswith("I;16") else None
        tag = getattr(image, "tag_v2", {}).get(BITS_PER_SAMPLE_TAG) if hasattr(image, "tag_v2") else None
        if bits is None and tag is not None:
            bits = int(tag[0] if isinstance(tag, tuple) else tag)
        if bits is None:  # a 32-bit "I" image without a bit depth: 16-bit data if it fits, else 32-bit
            bits = 16 if values.max(initial=0) <= 65535 else 32
        full_scale = 65535.0 if bits <= 16 else 2.0**31 - 1  # Pillow's "I" is signed 32-bit
        scaled = np.clip(values, 0, full_scale) * (255.0 / full_scale)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        # Float images conventionally hold [0, 1]; anything else is taken as 0..255 and clipped.
        if values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
            values = values * 255.0
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8), mode="L")
    return image


def decode_image(path: str, *, image_size: int, channels: int, max_pixels: int) -> np.ndarray:
    """uint8 array (channels, image_size, image_size) of the image file at ``path``."""
    with Image.open(path) as opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} = {width * height:,} pixels, over data.max_image_pixels "
                                f"({max_pixels:,}); not decoded")
        if opened.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target: far less memory and time.
            opened.draft(None, (image_size, image_size))
        image = ImageOps.exif_transpose(opened)  # a copy, rotated as the camera says (or the image itself)
        image = _to_8bit(image)
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparent pixels onto white instead of whatever colour the hidden pixels hold.
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, H, W)
