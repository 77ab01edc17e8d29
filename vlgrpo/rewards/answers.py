"""Short answers: ``accuracy`` (exact match, or IoU >= 0.5 for box answers), ``format`` and ``iou``; box
parsing and IoU.

Boxes (``iou``, and ``accuracy`` on items whose solution is a box): the gold box is the item's solution,
``[x1, y1, x2, y2]`` in pixels of the original image, as JSON (``[..]``, ``{"bbox_2d": [..]}`` or a list of
those; the first box counts). Answers are parsed the same way, or as the first four numbers of the text; they
are in the model's convention (``rewards.iou_box_format``): Qwen2.5-VL answers in absolute pixels of the
image it sees (the original resized by ``smart_resize`` into the pixel budget), Qwen3-VL in 0-1000 relative
coordinates.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from vlgrpo.data.answers import normalize_answer
from vlgrpo.rewards.columns import MAX_SHORT_ANSWER_WORDS, column, is_short_answer_item, terminated, words
from vlgrpo.rewards.registry import RewardContext, RewardFn, register, register_factory

Box = tuple[float, float, float, float]
_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _box_from_json(value: Any) -> Box | None:
    """The first box in a parsed JSON value: a 4-number list, {"bbox_2d"|"bbox"|"box": ..} or a list of them."""
    if isinstance(value, Mapping):
        for key in ("bbox_2d", "bbox", "box"):
            if key in value:
                return _box_from_json(value[key])
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            box = tuple(float(v) for v in value)
            return box if all(math.isfinite(v) for v in box) else None
        return _box_from_json(value[0]) if value else None
    return None


def parse_box(text: Any, strict: bool = False) -> Box | None:
    """A box from a model answer or a solution; None when there is none.

    Tries the whole text as JSON, then its first ``[...]`` / ``{...}`` span; unless ``strict``, falls back to
    the first four numbers of the text (``(10,20),(50,60)``, ``x1=10 y1=20 ...``).
    """
    import json

    if isinstance(text, (list, tuple, Mapping)):
        return _box_from_json(text)
    if not isinstance(text, str) or not text.strip():
        return None
    candidates = [text.strip()] + re.findall(r"\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]|\{[^{}]*\}", text)
    for c in candidates:
        try:
            box = _box_from_json(json.loads(c))
        except (ValueError, RecursionError):
            continue
        if box is not None:
            return box
    if strict:
        return None
    nums = re.findall(_NUMBER, text)
    return tuple(float(v) for v in nums[:4]) if len(nums) >= 4 else None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes; a box with x2 <= x1 or y2 <= y1 is empty (0)."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class BoxConvention(NamedTuple):
    """How a model's box answers map to original-image pixels (``rewards.iou_box_format`` + pixel budget)."""
    box_format: str = "qwen2.5"
    min_pixels: int = 3136
    max_pixels: int = 12544
    root: str = "."

    def to_pixels(self, box: Box, size: tuple[int, int]) -> Box:
        """``box`` in the model's convention → pixels of an original image of ``size`` (width, height)."""
        w, h = size
        if self.box_format == "qwen3":                               # 0-1000 relative
            sx, sy = w / 1000.0, h / 1000.0
        elif self.box_format == "qwen2.5":                           # pixels of the resized image it sees
            from vlgrpo.data.images import smart_resize
            rh, rw = smart_resize(h, w, self.min_pixels, self.max_pixels)
            sx, sy = w / rw, h / rh
        else:
            raise ValueError(f"iou_box_format must be 'qwen2.5' or 'qwen3', got {self.box_format!r}")
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _image_size(columns: Mapping[str, Any], i: int, root: str) -> tuple[int, int] | None:
    """(width, height) of item i's original image: ``image_size`` column, the scene, or the file's header."""
    size = (columns.get("image_size") or [None] * (i + 1))[i]
    if size:
        return int(size[0]), int(size[1])
    scene = (columns.get("scene") or [None] * (i + 1))[i]
    if scene and "width" in scene:
        return int(scene["width"]), int(scene["height"])
    images = (columns.get("images") or [None] * (i + 1))[i]
    if images:
        from PIL import Image
        with Image.open(Path(root) / images[0]) as im:               # reads the header only
            return im.size
    return None


def box_scores(completions: Sequence[str], columns: Mapping[str, Any], conv: BoxConvention
               ) -> list[float | None]:
    """IoU of each answer's box with the gold box; None when the solution is not a box (not a grounding item),
    0.0 when the answer holds no box."""
    sols = column(columns, "solution", len(completions))
    out: list[float | None] = []
    for i, (c, s) in enumerate(zip(completions, sols)):
        gold = parse_box(s, strict=True)
        if gold is None:
            out.append(None)
            continue
        pred = parse_box(c)
        size = _image_size(columns, i, conv.root) if pred is not None else None
        if pred is None or size is None:
            out.append(0.0)
            continue
        out.append(box_iou(conv.to_pixels(pred, size), gold))
    return out


def make_iou(conv: BoxConvention = BoxConvention()) -> RewardFn:
    """Grounding reward: IoU in [0, 1] of the answer's box with the gold box (see the module docstring)."""

    def iou(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        return box_scores(completions, columns, conv)

    iou.__name__ = iou.__qualname__ = "iou"
    return iou


IOU_MATCH = 0.5      # a box answer counts as correct (accuracy 1) at IoU >= 0.5, the usual grounding bar


def box_convention(ctx: RewardContext) -> BoxConvention:
    """The box convention of ``ctx``: ``rewards.iou_box_format``, its pixel budget and image folder."""
    return BoxConvention(ctx.rewards.iou_box_format, *ctx.pixels, str(ctx.image_dir))


def make_accuracy(conv: BoxConvention = BoxConvention()) -> RewardFn:
    """1.0 when the normalised completion *equals* the normalised solution; None when there is no solution.
    A box solution (grounding) is matched by IoU >= 0.5 under ``conv`` instead."""

    def accuracy(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        sols = column(columns, "solution", len(completions))
        ious = box_scores(completions, columns, conv)
        out: list[float | None] = []
        for c, s, iou_ in zip(completions, sols, ious):
            gold = normalize_answer(s)
            if iou_ is not None:
                out.append(float(iou_ >= IOU_MATCH))
            else:
                out.append(None if not gold else float(normalize_answer(c) == gold))
        return out

    accuracy.__name__ = accuracy.__qualname__ = "accuracy"
    return accuracy


accuracy = make_accuracy()         # the default convention: what a caller without a config scores with


@register_factory("accuracy")
def accuracy_factory(ctx: RewardContext) -> RewardFn:
    return make_accuracy(box_convention(ctx))


@register_factory("iou")
def iou_factory(ctx: RewardContext) -> RewardFn:
    return make_iou(box_convention(ctx))


@register("format")
def format_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 for a finished, non-empty, single answer: <= 3 words on one line for short-answer items,
    one paragraph for free text (captions); 0.0 otherwise."""
    n = len(completions)
    tasks, sols, term = column(columns, "task", n), column(columns, "solution", n), terminated(columns, n)
    out = []
    for c, task, sol, done in zip(completions, tasks, sols, term):
        text = c.strip()
        if not text or not done:
            out.append(0.0)
        elif parse_box(sol, strict=True) is not None:                # grounding: one box on one line
            out.append(float("\n" not in text and parse_box(text) is not None))
        elif is_short_answer_item(task, sol):
            out.append(float("\n" not in text and len(words(text)) <= MAX_SHORT_ANSWER_WORDS))
        else:
            out.append(float("\n\n" not in text))
    return out

