"""The served model's request checks (tasks/pyfunc_model.py): image decoding and the bounds on a request.

Each hostile value is refused with a RequestError (the served model's HTTP 400) naming the record and the
reason, before any pixel of an oversized image is decoded; tests/reliability/test_serving_hostile.py sends
the same requests to a real `mlflow models serve`.
"""
import base64
import io
import os
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tasks.pyfunc_model import Limits, RequestError, check_request, decode_image, image_bytes, prepare_items


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int) -> bytes:
    """A complete, valid greyscale PNG of side x side black pixels: a few KiB that decode to side**2 bytes."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)                      # filter byte + one byte per pixel
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_long_base64_image_decodes_to_the_same_pixels():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))   # noisy: a long PNG
    text = base64.b64encode(_png(img)).decode()
    assert len(text) > 4096                     # far past NAME_MAX / PATH_MAX: never taken for a file name
    out = decode_image(text, Limits())
    assert out.size == (112, 112) and np.array_equal(np.asarray(out), np.asarray(img))
    # A browser's data URL and MIME line breaks are the same bytes.
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert np.array_equal(np.asarray(decode_image("data:image/png;base64," + wrapped, Limits())), np.asarray(img))


def test_a_large_image_is_fitted_into_the_pixel_budget_like_training_images():
    from vlgrpo.data.images import fit_image

    img = Image.new("RGBA", (640, 480), (200, 10, 10, 128))
    out = decode_image(base64.b64encode(_png(img)).decode(), Limits())
    want, _ = fit_image(img, 3136, 12544)
    assert out.mode == "RGB" and out.size == want.size and out.size[0] * out.size[1] <= 12544
    assert np.array_equal(np.asarray(out), np.asarray(want))


def test_a_server_side_path_is_never_opened(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(Image.new("RGB", (64, 64))))
    for value in (str(secret), "/etc/passwd", "../../etc/passwd", str(tmp_path / "missing.png")):
        with pytest.raises(RequestError, match=r"^record 2: image is not base64.*reads no file paths"):
            decode_image(value, Limits(), "record 2")
    # The same answer whether the file exists or not: the reply tells nothing about the server's disk.
    answers = set()
    for value in (str(secret), str(tmp_path / "missing.png")):
        with pytest.raises(RequestError) as e:
            decode_image(value, Limits())
        answers.add(str(e.value))
    assert len(answers) == 1


def test_an_allowed_folder_serves_only_its_own_files(tmp_path):
    folder, outside = tmp_path / "images", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "sub").mkdir()
    (folder / "sub" / "a.png").write_bytes(_png(Image.new("RGB", (64, 64), (0, 255, 0))))
    (outside / "b.png").write_bytes(_png(Image.new("RGB", (64, 64))))
    os.symlink(outside / "b.png", folder / "link.png")      # a link inside that points outside
    limits = Limits(image_folder=str(folder))
    assert decode_image("sub/a.png", limits).getpixel((0, 0)) == (0, 255, 0)
    for value in ("../outside/b.png", str(outside / "b.png"), "link.png", "sub/../../outside/b.png"):
        with pytest.raises(RequestError, match="outside the image folder"):
            image_bytes(value, limits)
    with pytest.raises(RequestError, match="no such image file in the image folder"):
        image_bytes("sub/nope.png", limits)


@pytest.mark.parametrize("side, reason", [(8192, r"8192x8192 = 67108864 pixels; this model takes at most "
                                                   r"16777216"),
                                          (20000, "decompression bomb")])
def test_a_decompression_bomb_is_refused_from_its_header(side, reason):
    data = bomb_png(side)
    assert len(data) < 2_000_000 and side * side > Limits().max_image_pixels
    text = base64.b64encode(data).decode()
    t = time.perf_counter()
    with pytest.raises(RequestError, match=reason):
        decode_image(text, Limits(), "record 0")
    took = time.perf_counter() - t
    print(f"{side}x{side} bomb ({len(data)} bytes) refused in {took * 1000:.1f} ms")
    # Within the limit the same kind of file decodes (the check is the size, not the compression ratio).
    assert decode_image(base64.b64encode(bomb_png(512)).decode(), Limits()).size == (112, 112)


@pytest.mark.parametrize("payload, reason", [
    (b"just some text, not an image", "not an image of an accepted format"),
    (b"", "image is empty"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image of an accepted format"),  # Ghostscript
    (_png(Image.new("RGB", (64, 64)))[:60], "truncated or corrupt|header is damaged"),
])
def test_non_images_and_damaged_images_are_refused(payload, reason):
    with pytest.raises(RequestError, match=reason):
        decode_image(base64.b64encode(payload).decode(), Limits(), "record 0")


def test_other_formats_are_accepted():
    img = Image.new("RGB", (112, 112), (10, 20, 200))
    for fmt in ("JPEG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        assert decode_image(buf.getvalue(), Limits()).size == (112, 112), fmt


def test_an_aspect_ratio_qwen_vl_refuses_is_a_request_error():
    with pytest.raises(RequestError, match="aspect"):
        decode_image(_png(Image.new("RGB", (4000, 10))), Limits(), "record 0")


@pytest.mark.parametrize("params, reason", [
    ({"max_new_tokens": 10**9}, r"params.max_new_tokens is 1000000000; this model allows 1 to 256"),
    ({"max_new_tokens": 0}, r"params.max_new_tokens is 0"),
    ({"batch_size": 10**6}, r"params.batch_size is 1000000; this model allows 1 to 32"),
    ({"batch_size": "eight"}, r"params.batch_size must be an integer"),
    ({"batch_size": 2.5}, r"params.batch_size must be an integer"),
    ({"batch_size": True}, r"params.batch_size must be an integer"),
    ({"batch_size": None, "max_new_tokens": np.int64(10**9)}, r"params.max_new_tokens is 1000000000"),
])
def test_params_beyond_the_caps_are_refused(params, reason):
    with pytest.raises(RequestError, match=reason):
        check_request([{}], params, Limits())


def test_params_within_the_caps_and_the_defaults():
    assert check_request([{}], None, Limits()) == (8, 32)
    assert check_request([{}], {"batch_size": 32, "max_new_tokens": 256}, Limits()) == (32, 256)
    assert check_request([{}], {"batch_size": np.int64(4), "max_new_tokens": 5.0}, Limits()) == (4, 5)
    # Caps below the defaults lower the defaults with them.
    assert check_request([{}], {}, Limits(max_batch_size=2, max_new_tokens=4)) == (2, 4)


def test_too_many_records_are_refused_before_anything_is_decoded():
    records = [{"image": "not even base64!", "question": "?"}] * 10_000
    with pytest.raises(RequestError, match="the request has 10000 records; this model answers at most 64"):
        check_request(records, {}, Limits())
    assert check_request(records[:64], {}, Limits()) == (8, 32)


def test_questions_are_checked(tmp_path):
    ok = base64.b64encode(_png(Image.new("RGB", (64, 64)))).decode()
    with pytest.raises(RequestError, match="record 1: question is missing or empty"):
        prepare_items([{"image": ok, "question": "What?"}, {"image": ok, "question": "  "}], Limits(), tmp_path)
    with pytest.raises(RequestError, match="record 0: question has 5000 characters; this model takes at most 4096"):
        prepare_items([{"image": ok, "question": "x" * 5000}], Limits(), tmp_path)
    for q in ("<image><image>What?", "<video>What?"):
        with pytest.raises(RequestError, match="record 0: question may hold one <image> tag"):
            prepare_items([{"image": ok, "question": q}], Limits(), tmp_path)
    items = prepare_items([{"image": ok, "question": "What colour?", "task": None}], Limits(), tmp_path)
    assert items[0].question == "<image>What colour?" and items[0].task == "vqa"
    assert Image.open(tmp_path / items[0].images[0]).size == (56, 56)      # 64 px fitted to the 28-px grid


def test_limits_come_from_the_logged_model_config():
    from tasks.registry import serving_model_config
    from vlgrpo.config import ServingConfig

    cfg = serving_model_config(__import__("pathlib").Path("/srv/project"), 3136, 50176,
                               ServingConfig(max_records=3, image_folder="data/cache"))
    limits = Limits.from_model_config(cfg, factor=32)
    assert (limits.max_records, limits.max_pixels, limits.factor) == (3, 50176, 32)
    assert limits.image_folder == "/srv/project/data/cache"
    # A model logged with only the pixel budget (before the caps existed) gets the default caps.
    assert Limits.from_model_config({"min_pixels": 3136, "max_pixels": 12544}) == Limits()
