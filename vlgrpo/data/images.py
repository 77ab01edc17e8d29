"""Image normalisation and the content-addressed image cache.

Every image that enters the manifest goes through :func:`normalize_image` (or :func:`fit_image` for images
made in memory): converted to 8-bit RGB, EXIF orientation applied, and resized with
:func:`smart_resize` (Qwen-VL's rule) into the pixel budget ``data.min_pixels``..``data.max_pixels`` so the
processor never has to resize it again. :func:`cache_image` then writes it once under
``cache/<first two hex digits>/<sha256 of the PNG bytes>.png``.

Problems come back in two kinds, named like the ``validate`` checks:

- :class:`ImageError` (the row is dropped): ``missing_image``, ``empty_image``, ``truncated_image``,
  ``not_an_image``, ``decompression_bomb``, ``bad_aspect_ratio``;
- :class:`Issue` warnings (the row is kept, repaired): ``converted_mode``, ``resized``, ``upscaled``.

:func:`inspect_image` is the cheap twin used by ``validate`` on an already-cached manifest: it reads the
file once, parses the header and checks the end-of-stream marker instead of decoding every pixel.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlgrpo.io import atomic_write_bytes

# Side of the pixel block one visual token covers: patch size x spatial merge. Qwen2-VL / Qwen2.5-VL (and the
# tiny default): 14 px patches merged 2x2 = 28. Qwen3-VL: 16 px patches merged 2x2 = 32. The model's own
# value comes from its processor (:func:`vision_block`); every function here takes it as ``factor``.
FACTOR = 28

# The last 12 bytes of every complete PNG: zero-length IEND chunk + its CRC.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class Issue:
    """One warning about an image; ``check`` is the validate check name."""
    check: str
    message: str


class ImageError(Exception):
    """The image cannot be used; ``check`` is the validate check name, ``message`` names the file."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`inspect_image` learns from one file without decoding it fully."""
    width: int
    height: int
    mode: str
    sha256: str                      # of the file's bytes
    target: tuple[int, int]          # (height, width) after smart_resize
    warnings: tuple[Issue, ...] = field(default_factory=tuple)
    factor: int = FACTOR             # block side the target was computed with

    @property
    def visual_tokens(self) -> int:
        """Tokens the image costs in the prompt: one per factor x factor block of the resized image."""
        return (self.target[0] // self.factor) * (self.target[1] // self.factor)


def vision_block(model_path: str | Path | None) -> int:
    """The side in pixels of one visual token for the checkpoint in ``model_path``, read from its processor.

    ``None`` (the tiny default) or a hub id (not read here: validation works offline) gives :data:`FACTOR`.
    """
    if model_path is None or not Path(model_path).is_dir():
        return FACTOR
    from transformers import AutoImageProcessor  # heavy; only for a local checkpoint

    try:
        proc = AutoImageProcessor.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"base.model: {model_path}: cannot read its image processor: {e}") from e
    return int(proc.patch_size) * int(proc.merge_size)


# Qwen-VL refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR
                 ) -> tuple[int, int]:
    """The (height, width) the model will see: sides multiples of ``factor``, area within the pixel budget.

    Qwen-VL's rule, the arithmetic of ``qwen_vl_utils.smart_resize`` (which the rollouts' processor input goes
    through), computed here because importing qwen_vl_utils imports torch (~2-3 s a process) and the data and
    validate stages need nothing else from it; tests/unit/test_images.py checks both agree over a grid of
    sizes. In order: each side rounds to the nearest multiple of ``factor`` (at least one block); over
    ``max_pixels``, both sides shrink by one scale and round down; under ``min_pixels``, both grow by one
    scale and round up. Sides more than 200:1 apart raise ValueError.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)      # divide both sides by it: area = max_pixels
        h = math.floor(height / scale / factor) * factor
        w = math.floor(width / scale / factor) * factor
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))    # multiply both sides by it: area = min_pixels
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def visual_tokens(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> int:
    h, w = smart_resize(height, width, min_pixels, max_pixels, factor)
    return (h // factor) * (w // factor)


# ------------------------------------------------------------------------------------------ opening files


def read_image_bytes(src: Path) -> bytes:
    try:
        data = Path(src).read_bytes()
    except FileNotFoundError:
        raise ImageError("missing_image", f"image file not found: {src}") from None
    except IsADirectoryError:
        raise ImageError("not_an_image", f"image path is a directory: {src}") from None
    except OSError as e:
        raise ImageError("missing_image", f"image file cannot be read: {src}: {e.strerror or e}") from None
    if not data:
        raise ImageError("empty_image", f"image file is empty (0 bytes): {src}")
    return data


def _open_header(data: bytes, src: Path) -> Image.Image:
    """Parse the header only (Pillow is lazy); bombs and non-images become ImageError."""
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both are a bomb for us.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("decompression_bomb", f"{src}: {e}") from None
        except UnidentifiedImageError:
            raise ImageError("not_an_image", f"not a readable image file: {src}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError("truncated_image", f"image header is damaged: {src}: {e}") from None
    w, h = img.size
    if w * h > Image.MAX_IMAGE_PIXELS:
        raise ImageError("decompression_bomb",
                         f"{src}: {w}x{h} = {w * h} pixels exceeds Pillow's limit of "
                         f"{Image.MAX_IMAGE_PIXELS} (possible decompression bomb)")
    if w < 1 or h < 1:
        raise ImageError("not_an_image", f"image has no pixels ({w}x{h}): {src}")
    return img


def _decode(img: Image.Image, src: Path) -> Image.Image:
    """Decode every pixel; a short file fails here and only here."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("truncated_image", f"image data is truncated or corrupt: {src}: {e}") from None
    return img


def _looks_complete(data: bytes, fmt: str | None) -> bool | None:
    """End-of-stream marker check: True/False for PNG and JPEG, None when the format has no cheap test."""
    if fmt == "PNG":
        return data.endswith(_PNG_END)
    if fmt == "JPEG":
        # Some encoders pad after EOI; padding is harmless.
        return data.rstrip(b"\x00")[-2:] == _JPEG_END
    return None


# ----------------------------------------------------------------------------------------- normalisation


def _budget_issues(src: object, w: int, h: int, target: tuple[int, int], min_pixels: int,
                   factor: int = FACTOR) -> list[Issue]:
    th, tw = target
    if (th, tw) == (h, w):
        return []
    if w * h < min_pixels:
        return [Issue("upscaled", f"{src}: {w}x{h} is below min_pixels={min_pixels}; upscaled to {tw}x{th}")]
    return [Issue("resized", f"{src}: {w}x{h} resized to {tw}x{th} (pixel budget, sides multiple of {factor})")]


def _target(src: object, h: int, w: int, min_pixels: int, max_pixels: int, factor: int = FACTOR
            ) -> tuple[int, int]:
    try:
        return smart_resize(h, w, min_pixels, max_pixels, factor)
    except ValueError as e:  # aspect ratio beyond what Qwen-VL accepts (200:1)
        raise ImageError("bad_aspect_ratio", f"{src}: {w}x{h}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white so a transparent logo does not turn black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)  # (H, W)
        if mode == "F":
            top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
        else:
            top = 65535.0 if arr.size and arr.max() > 255 else 255.0  # 16-bit data, or 8-bit stored wide
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
        or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def fit_image(img: Image.Image, min_pixels: int, max_pixels: int, name: object = "<image>",
              factor: int = FACTOR) -> tuple[Image.Image, list[Issue]]:
    """Convert an in-memory image to RGB and resize it into the pixel budget."""
    issues: list[Issue] = []
    if img.mode != "RGB":
        issues.append(Issue("converted_mode", f"{name}: converted from mode {img.mode} to RGB"))
        img = _to_rgb(img)
    w, h = img.size
    target = _target(name, h, w, min_pixels, max_pixels, factor)
    issues += _budget_issues(name, w, h, target, min_pixels, factor)
    if target != (h, w):
        img = img.resize((target[1], target[0]), Image.Resampling.BICUBIC)
    return img, issues


def normalize_bytes(data: bytes, src: object, min_pixels: int, max_pixels: int, factor: int = FACTOR
                    ) -> tuple[Image.Image, ImageInfo]:
    """Decode, orient, convert and resize an encoded image; the info describes the source image."""
    if not data:
        raise ImageError("empty_image", f"image file is empty (0 bytes): {src}")
    img = _decode(_open_header(data, src), src)
    mode = img.mode
    try:
        img = ImageOps.exif_transpose(img)  # (W, H) swap for 90-degree orientations
    except (OSError, ValueError, SyntaxError):
        pass  # a broken EXIF block only loses the orientation hint; the pixels are fine
    w, h = img.size
    out, issues = fit_image(img, min_pixels, max_pixels, src, factor)
    info = ImageInfo(width=w, height=h, mode=mode, sha256=hashlib.sha256(data).hexdigest(),
                     target=(out.size[1], out.size[0]), warnings=tuple(issues), factor=factor)
    return out, info


def normalize_image(src: str | Path, min_pixels: int, max_pixels: int) -> tuple[Image.Image, list[Issue]]:
    """Open, fully decode, orient, convert and resize one image file.

    Raises :class:`ImageError` for a missing, empty, truncated, non-image or bomb file.
    """
    src = Path(src)
    img, info = normalize_bytes(read_image_bytes(src), src, min_pixels, max_pixels)
    return img, list(info.warnings)


def inspect_image(src: str | Path, min_pixels: int, max_pixels: int, deep: bool = False,
                  data: bytes | None = None, factor: int = FACTOR) -> ImageInfo:
    """Header + end-marker checks and a content hash, without decoding PNG/JPEG pixels.

    Used by ``validate`` where speed matters. Formats without a cheap completeness test are decoded, and
    so is everything when ``deep`` (raw sources, checked before import: a corrupt middle is found too).
    EXIF orientation is ignored here: it swaps width and height, which changes neither the pixel count
    nor (to within rounding) the token count.
    """
    src = Path(src)
    if data is None:
        data = read_image_bytes(src)
    elif not data:
        raise ImageError("empty_image", f"image file is empty (0 bytes): {src}")
    img = _open_header(data, src)
    complete = _looks_complete(data, img.format)
    if deep or complete is not True:
        _decode(img, src)  # None: no cheap test; False: decode to name the exact problem
    w, h = img.size
    target = _target(src, h, w, min_pixels, max_pixels, factor)
    issues = []
    if img.mode != "RGB":
        issues.append(Issue("converted_mode", f"{src}: mode {img.mode} will be converted to RGB"))
    issues += _budget_issues(src, w, h, target, min_pixels, factor)
    return ImageInfo(width=w, height=h, mode=img.mode, sha256=hashlib.sha256(data).hexdigest(),
                     target=target, warnings=tuple(issues), factor=factor)


# ------------------------------------------------------------------------------------------------- cache


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no timestamps or metadata), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def cache_image(img: Image.Image, cache_dir: str | Path) -> str:
    """Write ``img`` once into the content-addressed cache; return its path relative to the cache's parent.

    ``cache_dir`` is ``<out_dir>/cache``; the returned ``cache/ab/ab12...png`` is what the manifest stores
    (paths in the manifest are relative to the manifest's folder, which is ``cache_dir``'s parent).
    """
    cache_dir = Path(cache_dir)
    data = png_bytes(img)
    digest = hashlib.sha256(data).hexdigest()
    rel = Path(cache_dir.name) / digest[:2] / f"{digest}.png"
    dest = cache_dir / digest[:2] / f"{digest}.png"
    # Same name means same bytes: an existing file with exactly these bytes was written earlier. One with
    # other bytes was damaged on disk (check_cached_image names it); it is written again here.
    try:
        same = dest.stat().st_size == len(data) and dest.read_bytes() == data
    except OSError:
        same = False
    if not same:
        atomic_write_bytes(dest, data)
    return rel.as_posix()


class CorruptCacheFile(ValueError):
    """A file of the content-addressed image cache whose bytes no longer hash to its name."""


_CACHE_NAME = re.compile(r"[0-9a-f]{64}")


def check_cached_image(path: str | Path, data: bytes) -> None:
    """Raise :class:`CorruptCacheFile` when ``path`` is a cache file (named by the sha256 of its bytes) and
    ``data`` (its bytes) no longer hash to that name: a byte flipped on disk is found before the image is
    used. Other paths are not checked."""
    path = Path(path)
    if path.suffix != ".png" or not _CACHE_NAME.fullmatch(path.stem) or path.parent.name != path.stem[:2]:
        return
    got = hashlib.sha256(data).hexdigest()
    if got != path.stem:
        raise CorruptCacheFile(f"{path}: content does not match its name (sha256 {got[:12]}...): the cached "
                               f"image is corrupt - rebuild the image cache with `vlgrpo data` "
                               f"(or `dvc repro data`)")


__all__ = ["FACTOR", "vision_block", "Issue", "ImageError", "ImageInfo", "smart_resize", "visual_tokens",
           "fit_image", "normalize_image", "normalize_bytes", "read_image_bytes", "inspect_image", "png_bytes",
           "cache_image", "CorruptCacheFile", "check_cached_image"]
