"""Load a Qwen-VL policy + processor from a path, or build the tiny offline Qwen2.5-VL; encode and generate.

Everything here goes through the real transformers classes, so the tiny default and a real
``Qwen/Qwen2.5-VL-3B-Instruct`` directory share one code path:

    model, processor = build_tiny(texts, TinyModelConfig(), seed=0)   # offline default
    save_model(model, processor, "models/base")
    model, processor = load_model("models/base")                      # or a hub id / real checkpoint
    batch = encode_prompts(processor, items, manifest_dir, min_pixels, max_pixels)
    completions = generate_answers(model, processor, items, manifest_dir, Decoding(32, 8, min_px, max_px))

Prompts are built as Qwen chat messages, images go through ``qwen_vl_utils.process_vision_info`` (which
applies the per-image ``min_pixels``/``max_pixels``, the same budget is handed to the image processor) and
the processor expands each ``<|image_pad|>`` into one token per merged block of 2x2 patches: 28x28 px for
Qwen2-VL / Qwen2.5-VL (112x112 -> 16 tokens), 32x32 px for Qwen3-VL. A video (``item.videos``: its cached
frames, already in the video pixel budget) becomes a video part; its frames go to the processor at their
cached size (not through qwen-vl-utils' resize, which upscales frames under 4 merged blocks); the processor
expands its ``<|video_pad|>`` into one token per merged block per 2 frames and returns
``pixel_values_videos`` / ``video_grid_thw`` / ``second_per_grid_ts``. Padding is on the LEFT so that
generated tokens start at the same column for every row of a batch.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from vlgrpo.config import TinyModelConfig
from vlgrpo.data.images import check_cached_image
from vlgrpo.data.manifest import IMAGE_TAG, VIDEO_TAG, Item
from vlgrpo.io import atomic_dir, verify_content_hashes, write_content_hashes

# The Qwen2/2.5-VL special tokens, in the order Qwen's own vocabulary lists them. Keeping the names lets
# a prompt rendered for the tiny model read exactly like one rendered for a real checkpoint.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
IGNORE_INDEX = -100          # label value the loss skips (prompt and padding positions)
PATCH_SIZE = 14
SPATIAL_MERGE = 2
TEMPORAL_PATCH = 2

# A Qwen-style chat template written for this project: every turn is `<|im_start|>role\n...<|im_end|>\n`,
# an image item renders as `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the pad),
# and `add_generation_prompt` opens the assistant turn. No default system prompt: the tiny model's
# context is short and a constant prefix teaches it nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


class ModelLoadError(RuntimeError):
    """A checkpoint path/id that cannot be loaded; the message names the path and the reason."""


# ------------------------------------------------------------------------------------------- tiny build


def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; the Qwen special tokens come first (ids 0..13)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Split before byte-level mapping so merges never cross a word, a digit or a punctuation run; each
    # digit stands alone so "12" is never one token that the model must learn separately from "1","2".
    split = Regex(r"'(?:s|t|re|ve|m|ll|d)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _wrap_tokenizer(tok) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="left", model_max_length=4096, clean_up_tokenization_spaces=False,
        extra_special_tokens=None)
    hf.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS
                                                          if t not in ("<|endoftext|>", "<|im_end|>")]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _tiny_config(cfg: TinyModelConfig, tokenizer) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections; Qwen's ratio is
    # 16:24:24 of 64. Keep the same proportions for any head_dim.
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_num_heads,
        intermediate_size=2 * cfg.vision_hidden_size, out_hidden_size=cfg.hidden_size,
        patch_size=PATCH_SIZE, spatial_merge_size=SPATIAL_MERGE, temporal_patch_size=TEMPORAL_PATCH,
        window_size=PATCH_SIZE * SPATIAL_MERGE * 4,      # 112 px windows: one window per default image
        fullatt_block_indexes=[cfg.vision_depth - 1],   # the last block attends over the whole image
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )


def _tiny_processor(tokenizer) -> Any:
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    kw = dict(patch_size=PATCH_SIZE, merge_size=SPATIAL_MERGE, temporal_patch_size=TEMPORAL_PATCH)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw),
                               video_processor=Qwen2VLVideoProcessor(**kw),
                               tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_tiny(texts: Iterable[str], cfg: TinyModelConfig, seed: int) -> tuple[Any, Any]:
    """Build the tiny offline Qwen2.5-VL and its processor (tokenizer trained on ``texts``)."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    # The chat template's role names are in every prompt: train on them too so each is one token.
    roles = ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"] * 8
    tokenizer = _wrap_tokenizer(_train_tokenizer(itertools.chain(roles, texts), cfg.vocab_size))
    processor = _tiny_processor(tokenizer)
    config = _tiny_config(cfg, tokenizer)
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    return model, processor


@contextlib.contextmanager
def _seeded(seed: int):
    """Run the block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG stream."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# -------------------------------------------------------------------------------------- save / load


def save_model(model, processor, out_dir: str | Path, rebuild: str | None = None) -> Path:
    """Write safetensors + config + generation config + processor + tokenizer + chat template, atomically.

    The sha256 of every file goes with them (``io.HASHES_FILE``), with ``rebuild``, the command that writes
    the folder again: :func:`load_model` checks them, so a byte flipped on disk is found before use.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_content_hashes(tmp, rebuild or "the stage that wrote it")
    return out_dir


def _is_local(path_or_id: str | Path) -> bool:
    """A path when it exists or cannot be a hub id (``owner/name``); otherwise a hub id."""
    s = str(path_or_id)
    if Path(s).expanduser().exists() or s.startswith((".", "/", "~")):
        return True
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is None


def load_model(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, quantization_config: Any = None) -> tuple[Any, Any]:
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (local dir or hub id) with the Auto classes.

    A LoRA adapter directory (``train.lora``'s output) loads as its base model with the adapter merged in.
    """
    from transformers import AutoModelForImageTextToText

    local = _is_local(path_or_id)
    src = str(Path(path_or_id).expanduser()) if local else str(path_or_id)
    if local:
        p = Path(src)
        if not p.is_dir():
            raise ModelLoadError(f"{src}: model directory not found")
        from vlgrpo.model import lora

        if lora.is_adapter_dir(p):
            return lora.load_merged(p, dtype=dtype, trust_remote_code=trust_remote_code)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{src}: no config.json - not a transformers checkpoint directory "
                                 f"(expected config.json, *.safetensors, tokenizer and processor files)")
        verify_content_hashes(p)  # a folder saved by save_model: every byte as written, or ContentMismatch
    kw = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, **kw, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src}: cannot load model/processor from {_where(local)}: {e}") from e
    model.eval()
    return model, load_processor(src, trust_remote_code=trust_remote_code)


def _where(local: bool) -> str:
    return "local directory" if local else "hub id (not a local directory; hub access may be offline)"


def load_processor(path_or_id: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The processor of a checkpoint (or adapter) directory / hub id, its tokenizer padding on the left."""
    from transformers import AutoProcessor

    local = _is_local(path_or_id)
    src = str(Path(path_or_id).expanduser()) if local else str(path_or_id)
    try:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code, local_files_only=local)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src}: cannot load model/processor from {_where(local)}: {e}") from e
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # some checkpoints ship without one; eos is the conventional stand-in
        tok.pad_token = tok.eos_token
    return processor


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------- prompts


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
    if images is not None and len(images) != len(items):
        raise ValueError(f"images: got {len(images)} lists for {len(items)} items")
    texts, flat, flat_videos = [], [], []
    for i, it in enumerate(items):
        imgs = images[i] if images is not None else _item_images(it, manifest_dir)
        text, vision, videos = _render(processor, it, imgs, min_pixels, max_pixels, manifest_dir)
        texts.append(text)
        flat.extend(vision)
        flat_videos.extend(videos)
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


# ------------------------------------------------------------------------------------------- generate


@dataclass
class Completion:
    text: str                 # decoded, special tokens stripped, whitespace stripped
    token_ids: list[int]      # generated ids up to and including the terminating token, no padding
    terminated: bool          # ended with eos / <|im_end|> (not cut at max_new_tokens)


def stop_token_ids(processor, model=None) -> list[int]:
    """Ids that end an assistant turn: <|im_end|>, the tokenizer's eos, and the generation config's."""
    tok = processor.tokenizer
    ids = set()
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
            ids.add(i)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if model is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return sorted(ids)


def vision_token_ids(processor, model=None) -> list[int]:
    """Ids of the vision placeholder and delimiter tokens, which no sampled completion may contain: the next
    forward pass would count one as an image slot ("Image features and image tokens do not match").

    The one list both training and evaluation suppress: the tokenizer's ``<|vision_start|>``,
    ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>`` and, when ``model`` is given,
    the ids its config names (``image_token_id``, ``video_token_id``, ``vision_start_token_id``,
    ``vision_end_token_id``), which a checkpoint may map differently from its tokenizer.
    """
    tok = processor.tokenizer
    names = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    ids = {tok.convert_tokens_to_ids(n) for n in names}
    if model is not None:
        c = model.module.config if hasattr(model, "module") else model.config
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        ids |= {getattr(c, k) for k in keys if getattr(c, k, None) is not None}
    return sorted(int(i) for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


def split_completions(processor, sequences: torch.Tensor, stop_ids: Sequence[int]) -> list[Completion]:
    """Cut each row of generated ids (B, L) at its first stop token; decode the rest."""
    tok = processor.tokenizer
    stops = set(stop_ids)
    out = []
    for row in sequences.tolist():
        ids, terminated = [], False
        for t in row:
            ids.append(t)
            if t in stops:
                terminated = True
                break
        text = tok.decode(ids, skip_special_tokens=True).strip()
        out.append(Completion(text=text, token_ids=ids, terminated=terminated))
    return out


# Decoding settings a checkpoint's generation_config.json may carry (Qwen2.5-VL ships repetition_penalty 1.05,
# others no_repeat_ngram_size, min_length, beams, ...). ``generate`` applies whatever the checkpoint sets unless
# the call sets it, so each is pinned here to the value that leaves the model's distribution untouched:
# evaluation's greedy answers are then the argmax of the model's logits and its samples come from
# softmax(logits / T) restricted only by top_p, the same distribution the trainer samples from.
NEUTRAL_DECODING: dict[str, Any] = dict(
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0, num_beams=1, num_beam_groups=1, diversity_penalty=0.0, penalty_alpha=None,
    length_penalty=1.0, min_length=0, min_new_tokens=None, bad_words_ids=None, force_words_ids=None,
    constraints=None, sequence_bias=None, forced_bos_token_id=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, begin_suppress_tokens=None, typical_p=1.0, min_p=None, top_h=None,
    epsilon_cutoff=0.0, eta_cutoff=0.0, renormalize_logits=False, guidance_scale=None, watermarking_config=None,
    dola_layers=None, stop_strings=None, prompt_lookup_num_tokens=None, low_memory=None, token_healing=False,
    max_time=None,
)


def _neutral_decoding() -> dict[str, Any]:
    """:data:`NEUTRAL_DECODING`, limited to the fields this transformers version's GenerationConfig has (an
    unknown key would be passed on to the model's forward)."""
    from transformers import GenerationConfig

    known = vars(GenerationConfig())
    return {k: v for k, v in NEUTRAL_DECODING.items() if k in known}


@dataclass(frozen=True)
class Decoding:
    """How ``generate_answers`` decodes: ``batch_size`` prompts at a time, at most ``max_new_tokens``, images
    resized into [``min_pixels``, ``max_pixels``]; greedy, or sampled (``do_sample``) at ``temperature`` /
    ``top_p`` with ``num_return_sequences`` answers per item."""
    batch_size: int
    max_new_tokens: int
    min_pixels: int
    max_pixels: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1


def generate_answers(model, processor, items: Sequence[Item], manifest_dir: Path, decoding: Decoding,
                     progress: str | None = None) -> list[Completion]:
    """Answers for ``items`` in order (``num_return_sequences`` consecutive completions per item);
    ``progress``: the label of a progress bar (None: no bar)."""
    from tqdm.auto import tqdm

    d = decoding
    stops = stop_token_ids(processor, model)
    pad = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[Completion] = []
    gen_kw: dict[str, Any] = dict(_neutral_decoding(), max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                                  num_return_sequences=d.num_return_sequences, eos_token_id=stops,
                                  pad_token_id=pad, suppress_tokens=vision_token_ids(processor, model))
    if d.do_sample:
        gen_kw.update(temperature=d.temperature, top_p=d.top_p, top_k=0)
    else:
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    bar = tqdm(total=len(items), desc=progress or "generate", disable=progress is None, leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, len(items), d.batch_size):
                chunk = items[start:start + d.batch_size]
                batch = encode_prompts(processor, chunk, manifest_dir, d.min_pixels, d.max_pixels).to(device)
                out = model.generate(**batch, **gen_kw)       # (B*n, T + new)
                new = out[:, batch["input_ids"].shape[1]:]
                results.extend(split_completions(processor, new, stops))
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return results
