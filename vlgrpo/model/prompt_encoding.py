"""Encode items as Qwen chat prompts: messages with image and video parts, the processor's expansion of each
``<|image_pad|>`` / ``<|video_pad|>``, left padding, and supervised batches for the warm start.

Images go through ``qwen_vl_utils.process_vision_info`` (which applies the per-image ``min_pixels`` /
``max_pixels``; the same budget is handed to the image processor) and the processor expands each
``<|image_pad|>`` into one token per merged block of 2x2 patches: 28x28 px for Qwen2-VL / Qwen2.5-VL
(112x112 -> 16 tokens), 32x32 px for Qwen3-VL. A video (``item.videos``: its cached frames, already in the
video pixel budget) becomes a video part; its frames go to the processor at their cached size (not through
qwen-vl-utils' resize, which upscales frames under 4 merged blocks); the processor expands its
``<|video_pad|>`` into one token per merged block per 2 frames. Padding is on the LEFT so that generated
tokens start at the same column for every row of a batch::

    batch = encode_prompts(processor, items, manifest_dir, min_pixels, max_pixels)
"""
from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vlgrpo.data.images import check_cached_image
from vlgrpo.data.manifest import IMAGE_TAG, VIDEO_TAG, Item

# Qwen2/2.5-VL's vision geometry: the fallback when a processor does not say its own
PATCH_SIZE = 14
SPATIAL_MERGE = 2
TEMPORAL_PATCH = 2
IGNORE_INDEX = -100          # label value the loss skips (prompt and padding positions)


def _video_part(frames: Sequence[Path | str | Image.Image], min_pixels: int, max_pixels: int) -> dict:
    """A video part; decoded frames (cached in the video budget) keep their size, paths get the budget."""
    frames = [f if isinstance(f, Image.Image) else str(f) for f in frames]
    part = {"type": "video", "video": frames, "min_pixels": min_pixels, "max_pixels": max_pixels}
    if isinstance(frames[0], Image.Image):
        part["resized_width"], part["resized_height"] = frames[0].size
    return part


def build_messages(item: Item, image_paths: Sequence[Path | str | Image.Image], min_pixels: int,
                   max_pixels: int, videos: Sequence[Sequence[Path | str | Image.Image]] = ()) -> list[dict]:
    """Qwen chat messages for one item: each ``<image>`` (``<video>``) tag in the prompt turns becomes an
    image (video) part; ``videos`` holds each video's frames.

    Multi-turn items (``item.turns``) render every earlier turn; tags are numbered across turns in order.
    Images without a tag go first in the first turn (the common "image then question" layout).
    """
    turns = item.prompt_turns
    n_tags = sum(t["content"].count(IMAGE_TAG) for t in turns)
    if n_tags > len(image_paths):
        raise ValueError(f"item {item.id}: question has {n_tags} {IMAGE_TAG} tags "
                         f"but only {len(image_paths)} images")
    n_video_tags = sum(t["content"].count(VIDEO_TAG) for t in turns)
    if n_video_tags != len(videos):
        raise ValueError(f"item {item.id}: question has {n_video_tags} {VIDEO_TAG} tags but {len(videos)} videos")

    def image_part(img) -> dict:
        ref = img if isinstance(img, Image.Image) else str(img)
        return {"type": "image", "image": ref, "min_pixels": min_pixels, "max_pixels": max_pixels}

    untagged = len(image_paths) - n_tags
    queue, video_queue = list(image_paths[untagged:]), list(videos)
    messages = []
    if item.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": item.system}]})
    for n, turn in enumerate(turns):
        content: list[dict] = [image_part(img) for img in image_paths[:untagged]] if n == 0 else []
        for piece in re.split(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})", turn["content"]):
            if piece == IMAGE_TAG:
                content.append(image_part(queue.pop(0)))
            elif piece == VIDEO_TAG:
                content.append(_video_part(video_queue.pop(0), min_pixels, max_pixels))
            elif piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": turn["role"], "content": content})
    return messages


class _ImageCache:
    """Decoded RGB images by path (LRU). The trainer re-encodes the same images every step."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._d: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Image.Image:
        key = str(path)
        with self._lock:
            img = self._d.get(key)
            if img is not None:
                self._d.move_to_end(key)
                return img
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read image: {e}") from e
        check_cached_image(path, data)
        try:
            with Image.open(io.BytesIO(data)) as f:
                img = f.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read image: {e}") from e
        with self._lock:
            self._d[key] = img
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
        return img

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


IMAGE_CACHE = _ImageCache()


def _item_images(item: Item, manifest_dir: Path) -> list[Image.Image]:
    return [IMAGE_CACHE.get(Path(manifest_dir) / rel) for rel in item.images]


def _item_videos(item: Item, manifest_dir: Path) -> list[list[Image.Image]]:
    return [[IMAGE_CACHE.get(Path(manifest_dir) / rel) for rel in frames] for frames in item.videos]


def _render(processor, item: Item, images: Sequence[Image.Image], min_pixels: int, max_pixels: int,
            manifest_dir: Path):
    """(prompt text, resized images, videos as frame tensors) for one item: images through process_vision_info,
    video frames as cached, the text through the chat template."""
    from qwen_vl_utils import process_vision_info

    frames = _item_videos(item, manifest_dir)
    messages = build_messages(item, list(images), min_pixels, max_pixels, frames)
    patch = getattr(processor.image_processor, "patch_size", PATCH_SIZE)
    # Videos are not handed to qwen-vl-utils: its frame resize has a floor of 4 merged blocks a frame (3136 px
    # at 28 px) and would upscale a non-square frame the cache fitted below it (84x112 -> 28x56 in a 3136 px
    # budget -> 56x84), past data.video_max_pixels and the tokens validate counted. The cached frames are
    # already in the budget with sides multiples of the block, so they go in as they are. Frames cached for
    # another block size (a hub-id Qwen3-VL: the data stage assumed 28 px, the model needs 32) still go
    # through qwen-vl-utils, which fits them to the model's block.
    block = patch * getattr(processor.image_processor, "merge_size", SPATIAL_MERGE)
    if all(f.width % block == 0 and f.height % block == 0 for v in frames for f in v):
        images_only = [{**m, "content": [c for c in m["content"] if c.get("type") != "video"]}
                       if isinstance(m["content"], list) else m for m in messages]
        vision, _ = process_vision_info(images_only, image_patch_size=patch)
        videos = [frames_tensor(v) for v in frames]
    else:
        vision, videos = process_vision_info(messages, image_patch_size=patch)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, vision or [], videos or []


def frames_tensor(frames: Sequence[Image.Image]) -> torch.Tensor:
    """A video's frames (one size) as the (T, C, H, W) float tensor (0-255) qwen-vl-utils would give: an odd
    count is padded with the last frame (Qwen-VL's temporal patch is 2 frames), as qwen-vl-utils does."""
    frames = list(frames) + ([frames[-1]] if len(frames) % 2 else [])
    return torch.stack([torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1) for f in frames]).float()


def _encode(processor, texts: list[str], images: list[Image.Image], videos: list[torch.Tensor], min_pixels: int,
            max_pixels: int):
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    # The pixel budget goes to the image processor too: it resizes again with its own ``size`` otherwise,
    # and a checkpoint's own (Qwen3-VL: shortest_edge 65536) would upscale every small image (112 px ->
    # 256 px, 64 tokens instead of 9). With the same budget its resize of an already-fitted image is a no-op.
    kw: dict[str, Any] = {"images": images, "images_kwargs": {"size": {"shortest_edge": min_pixels,
                                                                        "longest_edge": max_pixels}}} if images else {}
    if videos:  # frames arrive at their cached size (the cache's video budget): never resized again here
        kw.update(videos=videos, videos_kwargs={"do_resize": False, "cap_pixels_per_frame": True})
    try:
        return processor(text=texts, padding=True, return_tensors="pt", **kw)
    finally:
        tok.padding_side = old


def encode_prompts(processor, items: Sequence[Item], manifest_dir: Path, min_pixels: int, max_pixels: int,
                   images: Sequence[Sequence[Image.Image]] | None = None):
    """Left-padded prompts ending in the assistant header -> BatchFeature.

    Keys: ``input_ids`` / ``attention_mask`` (B, T); ``pixel_values`` (sum of patches, C*2*14*14);
    ``image_grid_thw`` (n_images, 3), rows in item order; for items with videos also ``pixel_values_videos``,
    ``video_grid_thw`` (n_videos, 3) and ``second_per_grid_ts`` (n_videos,). ``images`` overrides the item's files (e.g.
    augmented copies), one list per item.
    """
    rendered = render_prompts(processor, items, manifest_dir, min_pixels, max_pixels, images)
    return encode_rendered(processor, rendered, min_pixels, max_pixels)


def render_prompts(processor, items: Sequence[Item], manifest_dir: Path, min_pixels: int, max_pixels: int,
                   images: Sequence[Sequence[Image.Image]] | None = None) -> list[tuple[str, list, list]]:
    """Each item's (chat-templated prompt text with one placeholder per image, its images fitted to the pixel
    budget, its videos as frame tensors): what ``encode_rendered`` tokenizes, and what a rollout engine is
    sent so that it runs the very prompt the trainer scores."""
    if images is not None and len(images) != len(items):
        raise ValueError(f"images: got {len(images)} lists for {len(items)} items")
    out = []
    for i, it in enumerate(items):
        imgs = images[i] if images is not None else _item_images(it, manifest_dir)
        text, vision, videos = _render(processor, it, imgs, min_pixels, max_pixels, manifest_dir)
        out.append((text, list(vision), list(videos)))
    return out


def encode_rendered(processor, rendered: Sequence[tuple[str, list, list]], min_pixels: int, max_pixels: int):
    """``render_prompts``' output → the left-padded BatchFeature of ``encode_prompts``."""
    texts = [r[0] for r in rendered]
    flat = [im for r in rendered for im in r[1]]
    flat_videos = [v for r in rendered for v in r[2]]
    return _encode(processor, texts, flat, flat_videos, min_pixels, max_pixels)


def supervised_batch(processor, items: Sequence[Item], manifest_dir: Path, min_pixels: int, max_pixels: int,
                     answers: Sequence[str] | None = None,
                     images: Sequence[Sequence[Image.Image]] | None = None):
    """Prompt + answer + ``<|im_end|>``; ``labels`` are IGNORE_INDEX on the prompt and the padding.

    ``answers`` defaults to each item's solution (or its first reference for captions).
    """
    tok = processor.tokenizer
    if answers is None:
        answers = [it.solution or (it.references[0] if it.references else "") for it in items]
    if len(answers) != len(items):
        raise ValueError(f"answers: got {len(answers)} for {len(items)} items")
    texts, flat, flat_videos, n_answer = [], [], [], []
    for i, (it, ans) in enumerate(zip(items, answers)):
        if not ans:
            raise ValueError(f"item {it.id}: no solution or reference to supervise on")
        imgs = images[i] if images is not None else _item_images(it, manifest_dir)
        prompt, vision, videos = _render(processor, it, imgs, min_pixels, max_pixels, manifest_dir)
        full = prompt + ans + "<|im_end|>"
        # Count answer tokens as they are tokenised in context (a merge could cross the boundary):
        # the prompt's ids must be a prefix of the full ids, else the labels would be misaligned.
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        if f_ids[:len(p_ids)] != p_ids:
            raise ValueError(f"item {it.id}: answer {ans!r} merges with the prompt's last token")
        texts.append(full)
        flat.extend(vision)
        flat_videos.extend(videos)
        n_answer.append(len(f_ids) - len(p_ids))   # answer tokens + <|im_end|>
    batch = _encode(processor, texts, flat, flat_videos, min_pixels, max_pixels)
    ids = batch["input_ids"]                       # (B, T), left-padded, so answers end at column T-1
    labels = torch.full_like(ids, IGNORE_INDEX)
    T = ids.shape[1]
    for r, n in enumerate(n_answer):
        labels[r, T - n:] = ids[r, T - n:]
    batch["labels"] = labels
    return batch
