"""Label-preserving image augmentation for GRPO prompts (``train.augment``).

Only transformations that cannot change the verifiable answer:
- crop: a random crop that still contains every object of the scene graph (a count / exists question keeps
  its answer because no object leaves the frame), resized back to the original size so the number of visual
  tokens - and so the prompt length - does not change. Without a scene graph there is no proof that a crop
  keeps the answer, so such images are never cropped.
- brightness and contrast: mild factors that move lightness, not hue.
- never a hue / colour change: colour questions are answered by hue.

    rng = np.random.default_rng(seed)
    img2 = augment_image(img, item, rng)
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

MAX_CROP_FRACTION = 0.2          # at most this fraction of each side is cut away (both edges together)
BRIGHTNESS = (0.85, 1.15)
CONTRAST = (0.85, 1.15)


def objects_bbox(scene: dict[str, Any] | None, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Union box (left, top, right, bottom) of all objects, in the pixel frame of an image of ``size``."""
    if not scene or not scene.get("objects"):
        return None
    sx = size[0] / float(scene.get("width") or size[0])
    sy = size[1] / float(scene.get("height") or size[1])
    boxes = [((o["x"] - o["size"] / 2) * sx, (o["y"] - o["size"] / 2) * sy,
              (o["x"] + o["size"] / 2) * sx, (o["y"] + o["size"] / 2) * sy) for o in scene["objects"]]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def safe_crop_box(size: tuple[int, int], keep: tuple[float, float, float, float],
                  rng: np.random.Generator, max_fraction: float = MAX_CROP_FRACTION) -> tuple[int, int, int, int]:
    """A random crop (left, top, right, bottom) of an image of ``size`` that contains the box ``keep``.

    Per axis: the cut is at most ``max_fraction`` of the side, and each edge may move inwards only up to the
    kept box (floor/ceil so rounding can never clip an object edge).
    """
    w, h = size
    out = []
    for lo_keep, hi_keep, side in ((keep[0], keep[2], w), (keep[1], keep[3], h)):
        room_lo = max(0, int(np.floor(lo_keep)))           # pixels free before the objects
        room_hi = max(0, side - int(np.ceil(hi_keep)))     # pixels free after them
        budget = int(max_fraction * side)
        cut_lo = int(rng.integers(0, min(room_lo, budget) + 1))
        cut_hi = int(rng.integers(0, min(room_hi, budget - cut_lo) + 1))
        out.append((cut_lo, side - cut_hi))
    (left, right), (top, bottom) = out
    return left, top, right, bottom


def augment_image(img: Image.Image, item: Any, rng: np.random.Generator) -> Image.Image:
    """A label-preserving variant of ``img`` for ``item`` (its scene graph bounds the crop)."""
    img = img.convert("RGB")
    keep = objects_bbox(getattr(item, "scene", None), img.size)
    if keep is not None:
        box = safe_crop_box(img.size, keep, rng)
        img = img.crop(box).resize(img.size, Image.BICUBIC)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(*BRIGHTNESS)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(*CONTRAST)))
    return img
