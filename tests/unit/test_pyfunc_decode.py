"""The served model's image decoding: base64 text longer than a file name is base64, not an OSError."""
import base64
import io

import numpy as np
from PIL import Image


def test_long_base64_image_decodes():
    from tasks.pyfunc_model import _decode_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))   # noisy: a long PNG
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    assert len(text) > 4096                     # far past NAME_MAX / PATH_MAX: Path.is_file() raised here
    out = _decode_image(text)
    assert out.size == (64, 64) and np.array_equal(np.asarray(out.convert("RGB")), np.asarray(img))
