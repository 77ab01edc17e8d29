"""MLflow pyfunc wrapper around a vlgrpo Hugging Face checkpoint ("models from code").

`register` logs this file with the checkpoint as an artifact, so
`mlflow models serve -m models:/<name>@champion --env-manager local` answers requests like

    {"dataframe_records": [{"image": "<base64 PNG/JPEG>", "question": "How many red circles are there?"}],
     "params": {"max_new_tokens": 32, "batch_size": 8}}

with one answer string per row.

Nothing in a request is trusted. ``image`` is the image file's bytes, base64-encoded (PNG, JPEG, WEBP, GIF
or BMP); the server opens no file a client names, unless ``register.serving.image_folder`` was set, and then
only files inside that folder. An image larger than ``register.serving.max_image_pixels`` is refused from
its header, before its pixels are decoded; the number of rows, ``max_new_tokens``, ``batch_size`` and the
question's length are capped by the ``register.serving`` settings logged with the model. A request beyond
any of them is answered HTTP 400 with one message naming the row and the reason, and the server goes on
answering. docs/reliability.md lists each refusal and its test.

The checkpoint is a full model, or a LoRA adapter directory (`train.lora` without `register.merge_lora`),
which loads as the base model it names (that path or hub id must be readable here) with the adapter merged.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import numbers
import re
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

log = logging.getLogger(__name__)

# The formats a request's image may be in: the common photo and web formats. Pillow opens many more (EPS
# runs Ghostscript, and every extra decoder is more code a client's bytes reach), none of which a
# vision-language request needs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# "data:image/png;base64," in front of the base64 text, as browsers write it: accepted and dropped.
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


class RequestError(ValueError):
    """A request the served model refuses; its text is the one message the client gets (HTTP 400)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the pixel budget the model was trained with and the
    ``register.serving`` caps (vlgrpo.config.ServingConfig), as logged in the model's ``model_config``."""
    min_pixels: int = 3136
    max_pixels: int = 12544
    max_records: int = 64
    max_batch_size: int = 32
    max_new_tokens: int = 256
    max_image_pixels: int = 16_777_216
    max_question_chars: int = 4096
    image_folder: str | None = None
    factor: int = 28           # side of one visual token's pixel block (the processor's)

    @classmethod
    def from_model_config(cls, cfg: dict[str, Any] | None, factor: int = 28) -> Limits:
        """The limits in ``cfg``; a key it lacks (a model logged before that key existed) keeps its default."""
        cfg = cfg or {}
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in cfg and cfg[f.name] is not None:
                kw[f.name] = cfg[f.name] if f.name == "image_folder" else int(cfg[f.name])
        return cls(**{**kw, "factor": factor})


class VLGRPOPyfunc(PythonModel):
    def load_context(self, context):  # noqa: D401 - MLflow hook
        from vlgrpo.model.loading import load_model

        self.model, self.processor = load_model(context.artifacts["checkpoint"])
        self.model.eval()
        # The pixel budget the model was trained with and the request caps (register logs both as model_config).
        ip = getattr(self.processor, "image_processor", None)
        factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
        self.limits = Limits.from_model_config(getattr(context, "model_config", None), factor)

    # The hint tells MLflow a request arrives as a DataFrame (rows as in the signature register logs).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # MLflow's scoring server answers an MlflowException with its error code's HTTP status and message
        # (INVALID_PARAMETER_VALUE: 400), and any other exception as a 400 that carries the traceback: so
        # every refusal is raised as the former, and an unexpected failure as a 500 without the traceback
        # (which goes to the server's log).
        try:
            records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else model_input
            batch_size, max_new_tokens = check_request(records, params, self.limits)
            with tempfile.TemporaryDirectory() as tmp:
                items = prepare_items(records, self.limits, Path(tmp))
                return self._answer(items, Path(tmp), batch_size, max_new_tokens)
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        except MlflowException:
            raise
        except Exception:  # noqa: BLE001 - the client gets one line; the traceback stays in the server log
            log.exception("the model failed to answer a request")
            raise MlflowException("the model failed to answer this request (the server log has the details)",
                                  error_code=INTERNAL_ERROR) from None

    def _answer(self, items, folder: Path, batch_size: int, max_new_tokens: int) -> list[str]:
        from vlgrpo.model.decoding import Decoding, generate_answers

        decoding = Decoding(batch_size, max_new_tokens, self.limits.min_pixels, self.limits.max_pixels)
        return [o.text for o in generate_answers(self.model, self.processor, items, folder, decoding)]


def _int_param(params: dict, name: str, default: int, cap: int) -> int:
    value = params.get(name, default)
    if value is None:
        return default
    # numbers.Real: MLflow's params schema may hand over numpy integers.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise RequestError(f"params.{name} must be an integer, got {str(value)[:40]!r}")
    if not 1 <= value <= cap:
        raise RequestError(f"params.{name} is {int(value)}; this model allows 1 to {cap}")
    return int(value)


def check_request(records: list, params: dict | None, limits: Limits) -> tuple[int, int]:
    """Refuse a request beyond the limits before any image is decoded; returns (batch_size, max_new_tokens)."""
    if len(records) > limits.max_records:
        raise RequestError(f"the request has {len(records)} records; this model answers at most "
                           f"{limits.max_records} per request (split it)")
    params = params or {}
    if not isinstance(params, dict):
        raise RequestError("params must be a mapping")
    from vlgrpo.config import REQUEST_BATCH_SIZE, REQUEST_MAX_NEW_TOKENS

    # The logged params schema fills these defaults in already; a model logged without one passes none.
    batch_size = _int_param(params, "batch_size", min(REQUEST_BATCH_SIZE, limits.max_batch_size),
                            limits.max_batch_size)
    max_new_tokens = _int_param(params, "max_new_tokens", min(REQUEST_MAX_NEW_TOKENS, limits.max_new_tokens),
                                limits.max_new_tokens)
    return batch_size, max_new_tokens


def _text(rec: dict, key: str) -> str | None:
    value = rec.get(key)
    if value is None or (isinstance(value, float) and value != value):  # missing, None or NaN
        return None
    return value if isinstance(value, str) else str(value)


def prepare_items(records: list, limits: Limits, folder: Path) -> list:
    """Decode and check each record's image and question; writes the images, fitted into the pixel budget
    like the training data, to ``folder`` and returns the manifest items that name them."""
    from vlgrpo.data.images import png_bytes
    from vlgrpo.data.manifest import IMAGE_TAG, VIDEO_TAG, Item

    items = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RequestError(f"record {i}: must be an object with 'image' and 'question'")
        q = _text(rec, "question")
        if not q or not q.strip():
            raise RequestError(f"record {i}: question is missing or empty")
        if len(q) > limits.max_question_chars:
            raise RequestError(f"record {i}: question has {len(q)} characters; this model takes at most "
                               f"{limits.max_question_chars}")
        if q.count(IMAGE_TAG) > 1 or VIDEO_TAG in q:
            # Each tag is a place the prompt expects media: one image per record, no video.
            raise RequestError(f"record {i}: question may hold one {IMAGE_TAG} tag (one image per record) "
                               f"and no {VIDEO_TAG} tag")
        img = decode_image(rec.get("image"), limits, f"record {i}")
        name = f"img{i}.png"
        (folder / name).write_bytes(png_bytes(img))
        task = _text(rec, "task") or "vqa"
        items.append(Item(id=str(i), split="test", task=task[:64],
                          question=q if IMAGE_TAG in q else IMAGE_TAG + q, images=[name]))
    return items


def image_bytes(value: Any, limits: Limits, where: str = "image") -> bytes:
    """The encoded image a request sent: base64 text (a ``data:image/...;base64,`` prefix allowed) or raw
    bytes; a file name only when ``limits.image_folder`` is set, and only for a file inside it."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value is None or (isinstance(value, float) and value != value):
        raise RequestError(f"{where}: image is missing")
    if not isinstance(value, str):
        raise RequestError(f"{where}: image must be base64 text, got {type(value).__name__}")
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        # Line breaks (MIME-style base64) are not data; anything else outside the alphabet is refused.
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        pass
    if limits.image_folder is None:
        # The value is never looked up on disk: the answer must not tell whether such a file exists.
        raise RequestError(f"{where}: image is not base64-encoded image bytes (this server reads no file "
                           f"paths; send the file's bytes base64-encoded)")
    return _folder_file(text, Path(limits.image_folder), where)


def _folder_file(name: str, folder: Path, where: str) -> bytes:
    root = folder.resolve()
    try:
        # resolve() follows every symlink, so a link inside the folder that points outside it is outside.
        path = (root / name).resolve()
    except (OSError, RuntimeError, ValueError):
        raise RequestError(f"{where}: image is neither base64 image bytes nor a file in the image folder") \
            from None
    if not path.is_relative_to(root):
        raise RequestError(f"{where}: image path is outside the image folder this server reads")
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise RequestError(f"{where}: no such image file in the image folder: {name[:200]}") from None
    except OSError as e:
        raise RequestError(f"{where}: image file in the image folder cannot be read: {e.strerror}") from None


def open_image(data: bytes, limits: Limits, where: str = "image"):
    """The image in ``data``, decoded only after its header showed an accepted format whose width x height
    is within ``limits.max_image_pixels`` (so a small file that claims a huge size costs no decoding)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(f"{where}: image is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow's own bomb warning (above its global MAX_IMAGE_PIXELS) is superseded by the check below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)   # reads the header only
        except Image.DecompressionBombError:  # beyond twice Pillow's limit: far beyond any sane image
            raise RequestError(f"{where}: image claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels (a "
                               f"decompression bomb); this model takes at most {limits.max_image_pixels} "
                               f"(width x height); refused before decoding") from None
        except UnidentifiedImageError:
            raise RequestError(f"{where}: not an image of an accepted format "
                               f"({', '.join(IMAGE_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise RequestError(f"{where}: image header is damaged: {e}") from None
        w, h = img.size
        if w < 1 or h < 1:
            raise RequestError(f"{where}: image has no pixels ({w}x{h})")
        if w * h > limits.max_image_pixels:
            raise RequestError(f"{where}: image is {w}x{h} = {w * h} pixels; this model takes at most "
                               f"{limits.max_image_pixels} (width x height); refused before decoding")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise RequestError(f"{where}: image data is truncated or corrupt: {e}") from None
    return img


def decode_image(value: Any, limits: Limits, where: str = "image"):
    """A request's ``image`` value as the RGB image the model sees: checked, decoded, oriented and fitted
    into the pixel budget exactly as ``data`` prepares training images (vlgrpo.data.images.fit_image)."""
    from PIL import ImageOps

    from vlgrpo.data.images import ImageError, fit_image

    img = open_image(image_bytes(value, limits, where), limits, where)
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError):
        pass  # a broken EXIF block only loses the orientation hint; the pixels are fine
    try:
        out, _ = fit_image(img, limits.min_pixels, limits.max_pixels, where, limits.factor)
    except ImageError as e:  # an aspect ratio Qwen-VL refuses
        raise RequestError(e.message) from None
    return out


mlflow.models.set_model(VLGRPOPyfunc())
