"""MLflow pyfunc wrapper around a vlgrpo Hugging Face checkpoint ("models from code").

`register` logs this file with the checkpoint as an artifact, so
`mlflow models serve -m models:/<name>@champion --env-manager local` answers requests like

    {"dataframe_records": [{"image": "<base64 PNG/JPEG>", "question": "How many red circles are there?"}]}

with one answer string per row. `image` may also be a local file path.

The checkpoint is a full model, or a LoRA adapter directory (`train.lora` without `register.merge_lora`),
which loads as the base model it names (that path or hub id must be readable here) with the adapter merged.
"""
from __future__ import annotations

import base64
import binascii
import io
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class VLGRPOPyfunc(PythonModel):
    def load_context(self, context):  # noqa: D401 - MLflow hook
        from vlgrpo.model.loading import load_model

        self.model, self.processor = load_model(context.artifacts["checkpoint"])
        self.model.eval()
        # The pixel budget the model was trained with (register passes params.yaml data.* as model_config).
        cfg = getattr(context, "model_config", None) or {}
        self.min_pixels = int(cfg.get("min_pixels", 3136))
        self.max_pixels = int(cfg.get("max_pixels", 12544))

    # The hint tells MLflow a request arrives as a DataFrame (rows as in the signature register logs).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:

        from vlgrpo.data.manifest import IMAGE_TAG, Item
        from vlgrpo.model.decoding import Decoding, generate_answers

        params = params or {}
        records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else model_input
        with tempfile.TemporaryDirectory() as tmp:
            items = []
            for i, rec in enumerate(records):
                img = _decode_image(rec["image"])
                name = f"img{i}.png"
                img.convert("RGB").save(Path(tmp) / name)
                q = str(rec["question"])
                items.append(Item(id=str(i), split="test", task=str(rec.get("task", "vqa")),
                                  question=q if IMAGE_TAG in q else IMAGE_TAG + q, images=[name]))
            decoding = Decoding(int(params.get("batch_size", 8)), int(params.get("max_new_tokens", 32)),
                                self.min_pixels, self.max_pixels)
            outs = generate_answers(self.model, self.processor, items, Path(tmp), decoding)
        return [o.text for o in outs]


def _decode_image(value):
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    text = str(value)
    try:
        is_file = Path(text).is_file()
    except OSError:  # base64 text longer than a file name can be ("File name too long"): not a path
        is_file = False
    if is_file:
        return Image.open(text)
    try:
        return Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    except (binascii.Error, ValueError) as e:
        raise ValueError("image must be base64-encoded image bytes or a readable file path") from e


mlflow.models.set_model(VLGRPOPyfunc())
