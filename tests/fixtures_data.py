"""Writers for small test fixtures in each real on-disk format the data stage reads.

- ms-swift GRPO JSONL: ``{"messages": [...], "images": [...], "solution": ..., <extra columns>}`` a line;
- COCO captions: ``<root>/annotations/captions_<split>.json`` (``images`` + ``annotations``) and
  ``<root>/<split>/<file_name>``;
- a video file: an H.264 ``.mp4`` written with PyAV (``write_video``);
- Karpathy Flickr30k: ``<root>/dataset_flickr30k.json`` (``images[].filename``, ``sentences[].raw``,
  ``split``) and ``<root>/flickr30k-images/<filename>``.

Images default to 56x56 RGB PNG (exactly ``min_pixels`` of the default budget and a multiple of 28), so a
"good" image raises no warning; ``seed`` changes the colour so different images have different content.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

SIDE = 56


def color(seed: int) -> tuple[int, int, int]:
    return ((seed * 67) % 256, (seed * 131 + 40) % 256, (seed * 29 + 90) % 256)


def save_image(path: str | Path, seed: int = 0, size: tuple[int, int] = (SIDE, SIDE), mode: str = "RGB",
               fmt: str | None = None, **save_kw: Any) -> Path:
    """A solid image of ``size`` (W, H) in ``mode``; format from the suffix unless ``fmt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color(seed))
    img.putpixel((0, 0), (seed % 256, 0, 0))  # a tiny mark so equal colours from two seeds still differ
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt, **save_kw)
    return path


def swift_row(image: str | None = "images/a.png", question: str = "<image>How many circles are there?",
              solution: str | None = "2", **extra: Any) -> dict[str, Any]:
    """One ms-swift GRPO row; ``image=None`` leaves out the images column."""
    row: dict[str, Any] = {"messages": [{"role": "system", "content": "Answer briefly."},
                                        {"role": "user", "content": question}]}
    if image is not None:
        row["images"] = [image]
    if solution is not None:
        row["solution"] = solution
    row.update(extra)
    return row


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    """Rows as JSON objects, or as raw text lines (to write broken JSON on purpose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_coco(root: str | Path, entries: list[tuple[int, str, list[str]]], split: str = "val2017",
              write_images: bool = True) -> Path:
    """COCO captions fixture; ``entries`` are (image id, file name, captions). Returns the annotation file."""
    root = Path(root)
    images, anns = [], []
    for i, (image_id, name, caps) in enumerate(entries):
        images.append({"id": image_id, "file_name": name, "width": SIDE, "height": SIDE,
                       "coco_url": f"http://images.cocodataset.org/{split}/{name}"})
        for c in caps:
            anns.append({"id": 1000 + len(anns), "image_id": image_id, "caption": c})
        if write_images:
            save_image(root / split / name, seed=i + 1)
    ann = root / "annotations" / f"captions_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"info": {"description": "fixture"}, "licenses": [], "images": images,
                               "annotations": anns}), encoding="utf-8")
    return ann


def make_flickr(root: str | Path, entries: list[tuple[int, str, str, list[str]]],
                write_images: bool = True) -> Path:
    """Karpathy Flickr30k fixture; ``entries`` are (imgid, filename, split, sentences). Returns the json."""
    root = Path(root)
    images = []
    for i, (imgid, name, split, sents) in enumerate(entries):
        images.append({"imgid": imgid, "filename": name, "split": split,
                       "sentids": list(range(5 * imgid, 5 * imgid + len(sents))),
                       "sentences": [{"raw": s, "tokens": s.lower().rstrip(".").split(), "imgid": imgid,
                                      "sentid": 5 * imgid + k} for k, s in enumerate(sents)]})
        if write_images:
            save_image(root / "flickr30k-images" / name, seed=100 + i)
    path = root / "dataset_flickr30k.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}), encoding="utf-8")
    return path


def write_video(path: str | Path, frames: list[Any], fps: int = 4) -> Path:
    """Write RGB frames (PIL images or HxWx3 uint8 arrays, even sides) as an H.264 ``.mp4`` with PyAV (the
    tests' real videos)."""
    import av
    import numpy as np

    path = Path(path)
    arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, dtype=np.uint8) for f in frames]
    h, w = arrays[0].shape[:2]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10"}
        for a in arrays:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())          # flush the encoder
    return path
