"""Image normalisation, the fast header inspector and the content-addressed cache."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tests.fixtures_data import save_image  # noqa: E402
from vlgrpo.data.images import (ImageError, cache_image, fit_image, inspect_image, normalize_image,  # noqa: E402
                                png_bytes, smart_resize)

MIN, MAX = 3136, 12544  # the default budget: 56x56 .. 112x112


def checks(issues):
    return [i.check for i in issues]


def test_rgb_in_budget_is_untouched(tmp_path):
    src = save_image(tmp_path / "a.png", seed=3)
    img, issues = normalize_image(src, MIN, MAX)
    assert img.mode == "RGB" and img.size == (56, 56) and issues == []
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(src).convert("RGB")))


def test_greyscale_converted(tmp_path):
    src = tmp_path / "g.png"
    Image.new("L", (56, 56), 77).save(src)
    img, issues = normalize_image(src, MIN, MAX)
    assert checks(issues) == ["converted_mode"] and "mode L" in issues[0].message and str(src) in issues[0].message
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (77, 77, 77)


def test_rgba_composited_on_white(tmp_path):
    src = tmp_path / "t.png"
    im = Image.new("RGBA", (56, 56), (255, 0, 0, 0))       # fully transparent red
    im.putpixel((1, 1), (0, 0, 255, 255))                  # one opaque blue pixel
    im.save(src)
    img, issues = normalize_image(src, MIN, MAX)
    assert checks(issues) == ["converted_mode"]
    assert img.getpixel((10, 10)) == (255, 255, 255)       # transparency shows white, not black or red
    assert img.getpixel((1, 1)) == (0, 0, 255)


def test_palette_with_transparency_and_cmyk(tmp_path):
    pal = tmp_path / "p.png"
    im = Image.new("P", (56, 56), 0)
    im.putpalette([10, 200, 30, 0, 0, 0] + [0] * 762)
    im.putpixel((3, 3), 1)
    im.save(pal, transparency=1)                            # palette index 1 is transparent
    img, issues = normalize_image(pal, MIN, MAX)
    assert checks(issues) == ["converted_mode"] and "mode P" in issues[0].message
    assert img.getpixel((0, 0)) == (10, 200, 30) and img.getpixel((3, 3)) == (255, 255, 255)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (56, 56), (0, 255, 255, 0)).save(cmyk, quality=100)  # CMYK red
    img, issues = normalize_image(cmyk, MIN, MAX)
    assert checks(issues) == ["converted_mode"] and "CMYK" in issues[0].message
    r, g, b = img.getpixel((20, 20))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_scaled_to_eight(tmp_path):
    src = tmp_path / "deep.png"
    arr = np.full((56, 56), 65535, dtype=np.uint16)
    arr[:, :28] = 257 * 100                                 # 16-bit 25700 == 8-bit 100
    Image.fromarray(arr).save(src)
    assert Image.open(src).mode.startswith("I")
    img, issues = normalize_image(src, MIN, MAX)
    assert checks(issues) == ["converted_mode"]
    assert img.getpixel((0, 0)) == (100, 100, 100) and img.getpixel((50, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    src = tmp_path / "rot.jpg"
    im = Image.new("RGB", (84, 56), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6                                        # "rotate 90 CW to display"
    im.save(src, exif=exif)
    img, _ = normalize_image(src, MIN, MAX)
    assert img.size == (56, 84)                             # (W, H) swapped: what a person sees


def test_large_image_resized_into_budget(tmp_path):
    src = save_image(tmp_path / "big.jpg", size=(600, 400))
    img, issues = normalize_image(src, MIN, MAX)
    h, w = smart_resize(400, 600, MIN, MAX)
    assert img.size == (w, h) == (112, 84)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= MAX
    assert checks(issues) == ["resized"] and "600x400 resized to 112x84" in issues[0].message


def test_smart_resize_agrees_with_qwen_vl_utils():
    # vlgrpo computes Qwen-VL's resize rule itself (qwen_vl_utils imports torch); the cache it builds must be
    # what qwen_vl_utils would give at train time, for every size, budget and block side, errors included.
    from qwen_vl_utils import smart_resize as reference

    sides = sorted({1, 2, 13, 14, 27, 28, 29, 41, 42, 55, 56, 57, 83, 84, 100, 111, 112, 113, 199, 200, 333,
                    448, 640, 1000, 1023, 1920, 4000, 5599, 5600, 5601, 12000})
    budgets = [(MIN, MAX), (3136, 200704), (256 * 28 * 28, 1280 * 28 * 28), (12544, 12544), (1024, 16384)]
    compared = 0
    for factor in (28, 32):
        for lo, hi in budgets:
            for h in sides:
                for w in sides:
                    try:
                        want = reference(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                    except ValueError as e:
                        with pytest.raises(ValueError) as got:
                            smart_resize(h, w, lo, hi, factor)
                        assert str(got.value) == str(e)
                        continue
                    assert smart_resize(h, w, lo, hi, factor) == want, (h, w, lo, hi, factor)
                    compared += 1
    assert compared > 5000  # the grid really exercised the three branches, not only the ratio errors


def test_data_and_validate_do_not_import_torch():
    # The data and validate stages run in processes of their own; torch costs them seconds of start-up.
    import subprocess

    code = ("import sys, vlgrpo.data.build, vlgrpo.data.validation, vlgrpo.data.images as im; "
            "im.smart_resize(400, 600, 3136, 12544); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out == "False"


def test_very_large_image_is_resized_not_rejected():
    img, issues = fit_image(Image.new("RGB", (6000, 4000)), MIN, MAX, "huge.jpg")
    assert img.size == (112, 84) and checks(issues) == ["resized"]


def test_small_image_upscaled(tmp_path):
    src = save_image(tmp_path / "s.png", size=(20, 30))
    img, issues = normalize_image(src, MIN, MAX)
    assert checks(issues) == ["upscaled"] and "below min_pixels=3136" in issues[0].message
    assert img.size[0] * img.size[1] >= MIN and img.size == (56, 84)


@pytest.mark.parametrize("make,check", [
    (lambda p: None, "missing_image"),
    (lambda p: p.write_bytes(b""), "empty_image"),
    (lambda p: p.write_text("hello, not a picture"), "not_an_image"),
])
def test_unusable_files(tmp_path, make, check):
    p = tmp_path / "x.png"
    make(p)
    with pytest.raises(ImageError) as e:
        normalize_image(p, MIN, MAX)
    assert e.value.check == check and str(p) in e.value.message
    with pytest.raises(ImageError) as e:
        inspect_image(p, MIN, MAX)
    assert e.value.check == check


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_found_by_decode_and_by_fast_inspect(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    for fn in (normalize_image, inspect_image):
        with pytest.raises(ImageError) as e:
            fn(bad, MIN, MAX)
        assert e.value.check == "truncated_image", fn.__name__
    assert inspect_image(good, MIN, MAX).warnings == ()


def test_decompression_bomb_is_an_error(tmp_path):
    # A real bomb by Pillow's own limit: 9500x9500 1-bit pixels (90.25M > MAX_IMAGE_PIXELS) in a ~20 kB PNG.
    src = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(src)
    assert src.stat().st_size < 100_000 and 9500 * 9500 > Image.MAX_IMAGE_PIXELS
    for fn in (normalize_image, inspect_image):
        with pytest.raises(ImageError) as e:
            fn(src, MIN, MAX)
        assert e.value.check == "decompression_bomb" and "bomb.png" in e.value.message


def test_extreme_aspect_ratio_is_an_error():
    # Qwen-VL's smart_resize refuses sides more than 200:1 apart; such a strip cannot become tokens.
    with pytest.raises(ImageError) as e:
        fit_image(Image.new("RGB", (5800, 28)), MIN, MAX, "strip.png")
    assert e.value.check == "bad_aspect_ratio" and "strip.png: 5800x28" in e.value.message


def test_inspect_reports_what_normalise_repairs(tmp_path):
    src = tmp_path / "g.png"
    Image.new("LA", (300, 200)).save(src)
    info = inspect_image(src, MIN, MAX)
    assert (info.width, info.height, info.mode) == (300, 200, "LA")
    assert [w.check for w in info.warnings] == ["converted_mode", "resized"]
    assert info.target == smart_resize(200, 300, MIN, MAX) == (84, 112)
    assert info.visual_tokens == 3 * 4


def test_cache_is_content_addressed_and_written_once(tmp_path):
    cache = tmp_path / "data" / "cache"
    img = Image.new("RGB", (56, 56), (1, 2, 3))
    rel = cache_image(img, cache)
    import hashlib
    digest = hashlib.sha256(png_bytes(img)).hexdigest()
    assert rel == f"cache/{digest[:2]}/{digest}.png"
    path = tmp_path / "data" / rel
    mtime = path.stat().st_mtime_ns
    assert cache_image(Image.new("RGB", (56, 56), (1, 2, 3)), cache) == rel   # same pixels, same file
    assert path.stat().st_mtime_ns == mtime                                    # not rewritten
    assert cache_image(Image.new("RGB", (56, 56), (1, 2, 4)), cache) != rel
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))
    assert [p.name for p in cache.rglob("*.tmp")] == []
