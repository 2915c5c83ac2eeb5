"""Image inputs: paths, file:// and data: URLs, PIL images -> RGB pixels for the encoder.

Decoding is Pillow's (JPEG, PNG, WebP, GIF, ...): EXIF orientation is applied, animated images
give their first frame, transparency is composited onto white, palette / greyscale / 16-bit
images become 8-bit RGB, and Pillow's decompression-bomb guard stays on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
import urllib.parse
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An input that is not a usable image (unreadable, not an image, too large)."""


@dataclass(frozen=True)
class RGBImage:
    """8-bit RGB pixels, row-major (height, width, 3), and a content hash that identifies the
    image in the KV cache."""

    pixels: np.ndarray
    digest: str

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]


# What Pillow's decoders raise on corrupt data: OSError ("truncated", "broken data stream"), and
# from the format plugins' parsing SyntaxError, ValueError, IndexError, KeyError, EOFError and
# struct.error. Decoding is lazy (later frames, some modes), so to_rgb can meet them too.
_CORRUPT = (OSError, SyntaxError, ValueError, IndexError, KeyError, EOFError, struct.error)


def _open(source) -> tuple[Image.Image, str]:
    """The decoded image and a name for messages."""
    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "<bytes>"
    else:
        text = os.fspath(source)
        if text.startswith("data:"):
            header, _, payload = text.partition(",")
            if ";base64" not in header:
                raise ImageError("data: URLs must be base64-encoded images")
            try:
                data = base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError) as e:
                raise ImageError(f"invalid base64 in data: URL ({e})") from None
            name = "<data: URL>"
        else:
            if text.startswith("file://"):
                text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
            elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
                raise ImageError(f"only local files, file:// and data: URLs are supported (cmx works offline), not {text!r}")
            if not os.path.exists(text):
                raise FileNotFoundError(f"image not found: {text}")
            if os.path.isdir(text):
                raise ImageError(f"{text} is a directory, not an image")
            if not os.access(text, os.R_OK):
                raise ImageError(f"cannot read image {text}: permission denied")
            # Pillow opens the path itself: it identifies the format from the first bytes and
            # streams the rest, so a huge file that is not an image costs no memory
            data, name = None, text
    try:
        img = Image.open(io.BytesIO(data) if data is not None else name)
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read") from None
    except _CORRUPT as e:
        raise ImageError(f"{name}: corrupt image ({e})") from None
    return img, name


def to_rgb(img: Image.Image) -> Image.Image:
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # first frame of an animation
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = max(arr.max(), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / (65535.0 if peak > 255 else 255.0)), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_image(source) -> RGBImage:
    """A path, file:// or data: URL, raw bytes or a PIL image -> RGBImage."""
    img, name = _open(source)
    try:
        img = to_rgb(img)
    except _CORRUPT as e:
        raise ImageError(f"{name}: corrupt image ({type(e).__name__}: {e})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError("empty image")
    pixels = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    digest = hashlib.sha256(pixels.tobytes() + f"{img.width}x{img.height}".encode()).hexdigest()
    return RGBImage(pixels, digest)
