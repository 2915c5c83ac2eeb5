"""What token pruning kept, drawn on the user's image (`cmx-chat --show-kept`, `cmx.draw_kept`).

A LLaVA-1.5-style encoder sees the image resized to a square of `image_size` pixels with the
aspect ratio kept and the rest padded (mtmd's fixed-size preprocessing: scale = min(S/w, S/h), the
scaled side rounded up, centred with integer offsets), cut into a g x g grid of patches, one image
token each, row by row. This module maps each token back to the rectangle of the original image
it covers, then dims the pruned ones and outlines the kept ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def patch_boxes(width: int, height: int, n_tokens: int, image_size: int) -> np.ndarray:
    """(n_tokens, 4) float boxes (x0, y0, x1, y1) in the original image's pixels, token order.
    Boxes of tokens that fall on the padding are clipped to the image (they may be empty)."""
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens or grid == 0:
        raise ValueError(f"{n_tokens} image tokens are not a square grid: cannot map them to the image")
    if width <= 0 or height <= 0 or image_size <= 0:
        raise ValueError("image and encoder sizes must be positive")
    scale = min(image_size / width, image_size / height)
    new_w = min(math.ceil(width * scale), image_size)
    new_h = min(math.ceil(height * scale), image_size)
    off_x, off_y = (image_size - new_w) // 2, (image_size - new_h) // 2
    step = image_size / grid  # square pixels per patch
    rows, cols = np.divmod(np.arange(n_tokens), grid)
    # square coordinates -> original pixels (per-axis scale of the resized content)
    sx, sy = width / new_w, height / new_h
    x0 = (cols * step - off_x) * sx
    x1 = ((cols + 1) * step - off_x) * sx
    y0 = (rows * step - off_y) * sy
    y1 = ((rows + 1) * step - off_y) * sy
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def draw_kept(image, kept: Sequence[int], n_tokens: int, image_size: int,
              dim: float = 0.3, outline=(255, 40, 40)) -> Image.Image:
    """A copy of `image` (a PIL image, a cmx image, or a path / URL / bytes as chat accepts) with the
    pruned patches darkened to `dim` of their brightness and each kept patch outlined.
    `kept`: indices into the image's tokens (`last_stats["kept_image_tokens"][i]`), `n_tokens` the
    image's token count (`last_stats["image_tokens"][i]`), `image_size` the encoder's input side
    (`Model.vision.meta["image_size"]`)."""
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    keep = np.zeros(n_tokens, bool)
    idx = np.asarray(list(kept), np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_tokens):
        raise ValueError(f"kept token indices must lie in [0, {n_tokens})")
    keep[idx] = True
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        from .images import load_image

        pixels = image.pixels if hasattr(image, "pixels") else load_image(image).pixels
        img = Image.fromarray(np.asarray(pixels, np.uint8), "RGB")
    boxes = patch_boxes(img.width, img.height, n_tokens, image_size)
    mask = np.zeros((img.height, img.width), bool)  # True where a kept patch lies
    for i in np.flatnonzero(keep):
        x0, y0, x1, y1 = boxes[i]
        mask[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = True
    px = np.asarray(img, np.float32)
    px[~mask] *= dim
    out = Image.fromarray(px.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(img.width, img.height) / 300))
    for i in np.flatnonzero(keep):
        x0, y0, x1, y1 = boxes[i]
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=outline, width=width)
    return out
