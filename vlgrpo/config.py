"""Typed, frozen configuration loaded from ``params.yaml``.

``params.yaml`` is the single source of truth: one section per stage (``data``, ``validate``, ``base``,
``rewards``, ``pilot``, ``train``, ``evaluate``, ``register``). Every section is a frozen dataclass whose
``__post_init__`` enforces the rules; an unknown key, a wrong type or an impossible value raises
:class:`ConfigError` naming the dotted key and what is allowed.

Loading has no side effects (no directories created, no tracking URIs set).

    from vlgrpo.config import load_config
    cfg = load_config("params.yaml")
    cfg.train.learning_rate
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A params.yaml problem; the message names the dotted key and what is allowed."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"params.yaml: {key}: {msg}")


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(key, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(key, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples for lists, dataclasses built)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
                if typing.get_origin(a) is Literal and isinstance(value, str):
                    raise  # a misspelt choice: say which choices there are
        _fail(key, f"wrong type {type(value).__name__} ({value!r}); expected {_type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _fail(key, f"must be a list, got {type(value).__name__} ({value!r})")
        inner = args[0] if args else Any
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            _fail(key, f"must be a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# Keys that params.yaml files written for an earlier version may still hold.
_RETIRED = {
    "validate.max_prompt_tokens": "moved: the one prompt-length limit is train.max_prompt_tokens",
    "train.log_every": "removed: every step is logged",
}


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    for key in unknown:
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in _RETIRED:
            _fail(dotted, _RETIRED[dotted])
    if unknown:
        _fail(f"{prefix}.{unknown[0]}" if prefix else unknown[0],
              f"unknown key; allowed keys in '{prefix or 'top level'}': {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- sections


# The synthetic generator's vocabulary, by name. The config checks knobs against it; vlgrpo.data.synthetic
# draws exactly these (it imports them from here, so the two cannot disagree).
SYNTHETIC_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SYNTHETIC_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")


@dataclass(frozen=True)
class SyntheticConfig:
    """``data.synthetic``: difficulty knobs of the CLEVR-like scene generator (``data.source: synthetic``).

    Attributes:
        canvas_size: side of the square image, in pixels (28-4096).
        min_objects / max_objects: objects drawn per scene (at least 1; max >= min).
        min_object_size / max_object_size: bounding-box side of an object, in pixels (>= 4; max <= canvas).
        shapes: shapes to draw from (circle, square, triangle); at least two, so answers vary.
        colors: colours to draw from (red, green, blue, yellow, ...); at least two.
        background: background colour name.
    """
    canvas_size: int = 112
    min_objects: int = 1
    max_objects: int = 1
    min_object_size: int = 36
    max_object_size: int = 56
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    background: str = "gray"

    def __post_init__(self) -> None:
        k = "data.synthetic"
        _check_range(f"{k}.canvas_size", self.canvas_size, 28, 4096)
        _check_range(f"{k}.min_objects", self.min_objects, 1)
        _check_range(f"{k}.max_objects", self.max_objects, self.min_objects)
        _check_range(f"{k}.min_object_size", self.min_object_size, 4)
        _check_range(f"{k}.max_object_size", self.max_object_size, self.min_object_size, self.canvas_size)
        for s in self.shapes:
            if s not in SYNTHETIC_SHAPES:
                _fail(f"{k}.shapes", f"unknown shape {s!r}; allowed: {', '.join(SYNTHETIC_SHAPES)}")
        for c in self.colors:
            if c not in SYNTHETIC_COLORS:
                _fail(f"{k}.colors", f"unknown colour {c!r}; allowed: {', '.join(SYNTHETIC_COLORS)}")
        if len(self.shapes) < 2 or len(self.colors) < 2:
            _fail(k, "needs at least two shapes and two colours so questions have more than one answer")


TASKS = ("count", "color", "shape", "exists", "caption", "ground", "motion")


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` stage: where items come from and how images are fitted. Dataset layouts: docs/datasets.md.

    Fields:
        source: ``synthetic`` (generated scenes), ``jsonl`` (ms-swift-style rows: a ``.jsonl`` file or a
            ``.json`` array; ``json`` is the same reader), ``hf`` (a Hugging Face ``datasets.save_to_disk``
            folder, a ``.parquet`` file or a folder of them), ``coco`` or ``flickr30k``.
        path: the file or folder of an imported source, relative to the project root; unused for synthetic.
        format: the row layout of ``jsonl`` / ``hf`` rows; ``auto`` detects it from the first row. One of
            ``messages``, ``llava``, ``sharegpt``, ``alpaca``, ``query_response``, ``problem_solution``.
        columns: renames applied to every row before the layout is read, ``{column in the data: name vlgrpo
            reads}`` (ms-swift's ``--columns``), e.g. ``{question_text: problem, img: image}``.
        image_base: folder that relative image paths are looked up in first (before the dataset's folder);
            relative to the project root. It is also an allowed image folder.
        image_roots: more folders images may live in (absolute paths and ``../`` paths into them are
            allowed; relative paths are also looked up there, after the dataset's folder). Anything outside
            the dataset's folder, ``image_base`` and these is a ``path_escape`` error.
        split: COCO annotation split (``captions_<split>.json``).
        seed: seed of the synthetic generator.
        out_dir: where ``manifest.jsonl`` and the image cache are written.
        num_train / num_val / num_test: synthetic items per split.
        val_fraction / test_fraction: share of imported rows without their own split that go to val / test
            (by a hash of the first image's content, so one image never lands in two splits).
        task_mix: relative weights of the synthetic tasks (count, color, shape, exists, caption, and ground:
            "Where is the red square?", answered with its box ``[x1, y1, x2, y2]`` in pixels, scored by
            ``iou`` and by accuracy at IoU >= 0.5, and motion: a 4-frame video, "Which way does the shape
            move?", answered left / right / up / down; off by default).
        min_pixels / max_pixels: pixel budget every image is resized into (Qwen-VL ``smart_resize``).
        video_max_frames: most frames a video keeps (an even number, Qwen-VL's temporal patch is 2 frames);
            longer frame folders / lists are sampled uniformly down to it (a ``sampled_frames`` warning).
        video_max_pixels: pixel budget of each video frame (``data.min_pixels`` .. this); frames are
            resized into it and cached like images. A video of F frames costs F/2 x (h/28)(w/28) tokens.
        allow_remote: let ``http(s)://`` image URLs through (downloaded by the data stage).
        synthetic: knobs of the synthetic scene generator.
    """
    source: Literal["synthetic", "jsonl", "json", "hf", "coco", "flickr30k"] = "synthetic"
    path: str | None = None          # jsonl/json file, hf folder or parquet, coco / flickr30k root
    format: Literal["auto", "messages", "llava", "sharegpt", "alpaca", "query_response",
                    "problem_solution"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    image_base: str | None = None
    image_roots: tuple[str, ...] = ()
    split: str = "train2017"         # coco annotation split (captions_<split>.json)
    seed: int = 0
    out_dir: str = "data"
    num_train: int = 800
    num_val: int = 100
    num_test: int = 200
    val_fraction: float = 0.1        # imported sources without their own split
    test_fraction: float = 0.1
    task_mix: dict[str, float] = field(default_factory=lambda: {"count": 0.0, "color": 1.0, "shape": 0.0,
                                                                 "exists": 0.0, "caption": 0.0})
    min_pixels: int = 3136           # 56*56
    max_pixels: int = 12544          # 112*112
    video_max_frames: int = 8
    video_max_pixels: int = 3136     # 56*56 per frame: 4 tokens per 2 frames
    allow_remote: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        for n in ("num_train", "num_val", "num_test"):
            _check_range(f"data.{n}", getattr(self, n), 0)
        if self.num_train == 0:
            _fail("data.num_train", "must be > 0")
        _check_range("data.val_fraction", self.val_fraction, 0, 0.5)
        _check_range("data.test_fraction", self.test_fraction, 0, 0.5)
        if not self.task_mix:
            _fail("data.task_mix", f"needs at least one task; allowed: {', '.join(TASKS)}")
        for t, w in self.task_mix.items():
            if t not in TASKS:
                _fail(f"data.task_mix.{t}", f"unknown task; allowed: {', '.join(TASKS)}")
            _check_range(f"data.task_mix.{t}", w, 0)
        if sum(self.task_mix.values()) <= 0:
            _fail("data.task_mix", "weights must not all be 0")
        _check_range("data.min_pixels", self.min_pixels, 28 * 28)
        _check_range("data.max_pixels", self.max_pixels, self.min_pixels)
        _check_range("data.video_max_pixels", self.video_max_pixels, self.min_pixels)
        if self.video_max_frames < 2 or self.video_max_frames % 2:
            _fail("data.video_max_frames", f"must be an even number >= 2, got {self.video_max_frames}")
        if self.source != "synthetic" and not self.path:
            _fail("data.path", f"is required when data.source is {self.source!r}")
        for old, new in self.columns.items():
            if not new.strip():
                _fail(f"data.columns.{old}", "must name the column vlgrpo should read it as")
        if any(not r.strip() for r in self.image_roots):
            _fail("data.image_roots", "entries must be folder paths, not empty strings")


@dataclass(frozen=True)
class ValidateConfig:
    """``validate``: the data quality gate (Great Expectations suite + per-row checks).

    The prompt-length limit it checks is ``train.max_prompt_tokens`` (the one limit: what training accepts).

    Attributes:
        max_error_fraction: share of rows that may fail a row check before the stage fails (0-1).
        tokenizer: tokenizer (path or hub id) to count text tokens with; None: ``base.model`` when it is a
            local folder, else a conservative one-token-per-UTF-8-byte estimate (the offline default's
            tokenizer is trained later, and a byte-level BPE never needs more tokens than bytes).
        data_docs: also build the Great Expectations data docs (HTML) under ``reports/data_docs``.
    """
    max_error_fraction: float = 0.0
    tokenizer: str | None = None
    data_docs: bool = True

    def __post_init__(self) -> None:
        _check_range("validate.max_error_fraction", self.max_error_fraction, 0, 1)


@dataclass(frozen=True)
class TinyModelConfig:
    """``base.tiny``: shape of the tiny offline Qwen2.5-VL built when ``base.model`` is null.

    Attributes:
        hidden_size / num_hidden_layers / num_attention_heads / num_key_value_heads / intermediate_size:
            the language model (hidden_size divisible by the heads; kv heads divide the heads).
        vision_depth / vision_hidden_size / vision_num_heads: the vision tower.
        vocab_size: size of the byte-level BPE trained on the dataset's text.
    """
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_num_heads: int = 2
    vocab_size: int = 512

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_range(f"base.tiny.{f.name}", getattr(self, f.name), 1)
        if self.hidden_size % self.num_attention_heads:
            _fail("base.tiny.hidden_size", "must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("base.tiny.num_key_value_heads", "must divide num_attention_heads")


@dataclass(frozen=True)
class BaseConfig:
    """``base``: the model GRPO starts from (the ``base`` stage writes it to ``out_dir``).

    Attributes:
        model: a local folder or hub id of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint; null builds the tiny
            offline Qwen2.5-VL (``tiny``) and warm-starts it on the train split.
        trust_remote_code: passed to transformers when loading ``model``.
        out_dir: where the base model is saved, under the project root.
        seed: seed of the tiny model's initialisation and warm start.
        warmup_steps: supervised warm-start steps of the tiny model (0: none; unused for a given ``model``).
        batch_size / learning_rate: of the supervised warm start.
        tiny: shape of the tiny model (:class:`TinyModelConfig`).
    """
    model: str | None = None          # None = build the tiny offline Qwen2.5-VL
    trust_remote_code: bool = False
    out_dir: str = "models/base"
    seed: int = 0
    warmup_steps: int = 14            # supervised warm-start steps (tiny default only)
    batch_size: int = 16
    learning_rate: float = 1e-3
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        _check_range("base.warmup_steps", self.warmup_steps, 0)
        _check_range("base.batch_size", self.batch_size, 1)
        _check_range("base.learning_rate", self.learning_rate, 0, lo_open=True)


@dataclass(frozen=True)
class RewardsConfig:
    """``rewards``: what GRPO optimises and evaluation reports (one set-up for both: ``rewards.setup_rewards``).

    Attributes:
        weights: reward name -> weight; the total reward is the weighted sum of the rewards that apply to an
            item (built-ins: accuracy, format, detail_f1, reference, fluency, clip_score; or a plugin's).
        plugins: Python files (relative to the project root) that register more rewards with
            ``@vlgrpo.rewards.register("name")`` (or ``register_factory``), ms-swift ORM plugin files
            (``orms["name"] = ORM subclass``) or TRL reward functions (by function name); docs/rewards.md.
        on_error: ``raise`` stops on a reward that fails; ``skip`` scores that item None (left out of the sum).
        clip_model: local CLIP folder for ``clip_score`` (relative to the project root); never downloaded.
        fluency_min_words / fluency_max_words: the word window ``fluency`` rewards.
        overlong_buffer / overlong_max_length: the ``soft_overlong`` reward (DAPO's soft overlong
            punishment, TRL's ``get_soft_overlong_punishment``): 0 up to L_max - overlong_buffer completion
            tokens, then linear down to -1 at L_max, -1 beyond; L_max = overlong_max_length, or
            ``train.max_completion_length`` when null.
        iou_box_format: the box convention of the model's answers, for ``iou`` and the accuracy of box items:
            ``qwen2.5`` absolute pixels of the image the model sees (after the data.min_pixels /
            max_pixels resize), ``qwen3`` 0-1000 relative coordinates. The gold box (the item's solution) is
            always in pixels of the original image.
        models: learned reward models, reward name -> local folder (relative to the project root) of a
            transformers sequence-classification model and its tokenizer (safetensors, no remote code); each
            scores prompt + completion (logit 0). A folder with a Qwen-VL checkpoint is a vision-language
            judge instead: it sees the item's images, question and completion and scores P(yes) / (P(yes) +
            P(no)) for "Is the answer correct?" (``vlgrpo.rewards.learned.make_vl_judge``). A name here is used like
            any reward in ``weights``.
        model_batch_size: texts (judge: prompts with their images) per reward-model forward.
        completion_format: ``text`` or ``conversational``: how plugin reward functions get ``prompts`` /
            ``completions`` (strings, or TRL's message lists ``[{"role": "assistant", "content": ...}]``).
        max_concurrency: async rewards of one batch (and requests of a remote reward) running at once.
        remote: remote rewards, name -> URL of an HTTP scoring endpoint (POST JSON of the call's arguments,
            answers ``{"rewards": [...]}``).
        judges: OpenAI-compatible judges, name -> base URL of a server speaking the chat API (``.../v1``); the
            reward is 1.0 when it answers yes to ``JUDGE_TEMPLATE``, else 0.0.
        judge_model: the model name sent to the judges (null: the server's first in ``/v1/models``).
        remote_timeout / remote_retries: seconds per request, and retries after a failed one.
    """
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    plugins: tuple[str, ...] = ()
    on_error: Literal["raise", "skip"] = "raise"
    clip_model: str | None = None
    fluency_min_words: int = 1
    fluency_max_words: int = 30
    overlong_buffer: int = 2
    overlong_max_length: int | None = None
    iou_box_format: Literal["qwen2.5", "qwen3"] = "qwen2.5"
    models: dict[str, str] = field(default_factory=dict)
    model_batch_size: int = 32
    completion_format: Literal["text", "conversational"] = "text"
    max_concurrency: int = 8
    remote: dict[str, str] = field(default_factory=dict)
    judges: dict[str, str] = field(default_factory=dict)
    judge_model: str | None = None
    remote_timeout: float = 30.0
    remote_retries: int = 2

    def __post_init__(self) -> None:
        if not self.weights:
            _fail("rewards.weights", "needs at least one reward")
        for name, w in self.weights.items():
            if w != w:  # NaN
                _fail(f"rewards.weights.{name}", "must be a number, got NaN")
        _check_range("rewards.fluency_min_words", self.fluency_min_words, 0)
        _check_range("rewards.fluency_max_words", self.fluency_max_words, self.fluency_min_words)
        _check_range("rewards.overlong_buffer", self.overlong_buffer, 1)
        if self.overlong_max_length is not None:
            _check_range("rewards.overlong_max_length", self.overlong_max_length, self.overlong_buffer)
        _check_range("rewards.model_batch_size", self.model_batch_size, 1)
        _check_range("rewards.max_concurrency", self.max_concurrency, 1)
        _check_range("rewards.remote_timeout", self.remote_timeout, 0, lo_open=True)
        _check_range("rewards.remote_retries", self.remote_retries, 0)
        for section in ("remote", "judges"):
            for name, url in getattr(self, section).items():
                if not str(url).startswith(("http://", "https://")):
                    _fail(f"rewards.{section}.{name}", f"must be an http(s) URL, got {url!r}")
        for name, path in self.models.items():
            if not path:
                _fail(f"rewards.models.{name}", "must be a local model directory")


# Every family's LoRA targets (vlgrpo.model.families.all_lora_targets, which a test keeps equal): attention
# and MLP projections, plus Qwen3.5's Gated DeltaNet projections; a name a model lacks simply matches nothing.
LM_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "in_proj_qkv", "in_proj_z", "out_proj")


@dataclass(frozen=True)
class LoraConfig:
    """``train.lora``: train low-rank adapters (peft LoRA) instead of every weight.

    With LoRA the reference policy is the same weights with the adapters switched off (no second copy), the
    frozen weights are held in the compute dtype (``train.mixed_precision``: bf16/fp16; fp32 with ``no``),
    only the adapters get gradients and optimizer state, checkpoints hold the adapters, and the final
    ``train.out_dir`` is a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` +
    processor) that names its base model. ``vlgrpo.model.loading.load_model`` loads such a directory as base +
    adapter, merged.

    Fields:
        enabled: false = full fine-tuning (every weight trained).
        rank: r, the rank of each adapter (A: r x in, B: out x r).
        alpha: the adapter's output is scaled by alpha / rank.
        dropout: dropout on the adapter's input while training (0 keeps the maths deterministic).
        target_modules: leaf names of the language model's linear layers that get adapters (default: the
            attention and MLP projections q/k/v/o_proj, gate/up/down_proj, and Qwen3.5's linear-attention
            projections in_proj_qkv, in_proj_z, out_proj; per family in vlgrpo.model.families). A name the
            model lacks matches nothing; lm_head and the embedding never get adapters.
        vision: also put adapters on every linear layer of the vision tower's blocks.
        merger: also put adapters on the vision-to-language merger's linear layers (frozen otherwise).
        quantize_4bit: QLoRA - the frozen base in 4-bit NF4 (bitsandbytes); needs a CUDA GPU and
            ``pip install '.[qlora]'``.
    """
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LM_LINEAR_MODULES
    vision: bool = False
    merger: bool = False
    quantize_4bit: bool = False

    def __post_init__(self) -> None:
        k = "train.lora"
        _check_range(f"{k}.rank", self.rank, 1)
        _check_range(f"{k}.alpha", self.alpha, 0, lo_open=True)
        _check_range(f"{k}.dropout", self.dropout, 0, 1, hi_open=True)
        if self.enabled and not (self.target_modules or self.vision or self.merger):
            _fail(f"{k}.target_modules", "is empty and vision/merger are false: no layer would get an adapter")
        if self.quantize_4bit and not self.enabled:
            _fail(f"{k}.quantize_4bit", "needs train.lora.enabled: true (a 4-bit base cannot be fine-tuned "
                                         "in full)")


@dataclass(frozen=True)
class VllmConfig:
    """``train.rollout.vllm``: the vLLM engine that generates the rollouts when ``train.rollout.engine`` is
    ``vllm`` (``vlgrpo.train.engine``).

    The engine runs as its own process, in its own environment (vLLM pins its own torch and transformers;
    ``make vllm-env`` builds ``.venv-vllm``): the trainer starts ``vlgrpo/train/vllm_server.py`` with
    ``python`` and stops it when the run ends, or talks to a server already running at ``url``.

    Fields:
        python: the engine environment's interpreter (relative paths are under the project root).
        url: ``http://host:port`` of a server already running (started by hand with the same script); null:
            the trainer starts one on a free local port.
        dtype: the engine's weights and compute: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16``
            or ``float16``.
        max_model_len: prompt + completion tokens the engine reserves per sequence.
        kv_cache_gib: CPU engine: GiB of KV cache (``VLLM_CPU_KVCACHE_SPACE``).
        gpu_memory_utilization: GPU engine: share of the GPU's memory vLLM may take (weights + KV cache); the
            trainer shares the GPU when both run on one.
        tensor_parallel_size: GPUs the engine shards the model over.
        sync_steps: push the policy's weights to the engine every this many GRPO steps (1: before every
            rollout, so rollouts are sampled by the policy of the last optimizer update). The engine's
            log-probs of older weights are corrected by the importance sampling below.
        startup_timeout_s: seconds the engine may take to load before the run fails.
        request_timeout_s: seconds one generate or weight push may take before the run fails.
        importance_sampling: truncated importance sampling of the trainer/engine mismatch (TRL's
            ``vllm_importance_sampling_correction``): each policy-loss token is weighted by
            pi_trainer / pi_engine of its completion.
        is_mode: ``token_truncate`` (per-token ratio clipped to [is_min, is_cap]), ``token_mask`` (ratios outside
            it weigh 0), ``sequence_truncate`` / ``sequence_mask`` (one ratio per completion, the exp of its
            summed log-ratios) - TRL's ``vllm_importance_sampling_mode``.
        is_cap: the upper bound C_max (TRL's ``vllm_importance_sampling_clip_max``).
        is_min: the lower bound C_min (null: none; TRL's ``vllm_importance_sampling_clip_min``).
    """
    python: str = ".venv-vllm/bin/python"
    url: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    sync_steps: int = 1
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    importance_sampling: bool = True
    is_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "token_truncate"
    is_cap: float = 3.0
    is_min: float | None = None

    def __post_init__(self) -> None:
        k = "train.rollout.vllm"
        for n in ("max_model_len", "tensor_parallel_size", "sync_steps"):
            _check_range(f"{k}.{n}", getattr(self, n), 1)
        for n in ("kv_cache_gib", "startup_timeout_s", "request_timeout_s", "is_cap"):
            _check_range(f"{k}.{n}", getattr(self, n), 0, lo_open=True)
        _check_range(f"{k}.gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, lo_open=True)
        if self.is_min is not None:
            _check_range(f"{k}.is_min", self.is_min, 0, self.is_cap)
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            _fail(f"{k}.url", f"{self.url!r} is not an http(s):// URL")


@dataclass(frozen=True)
class RolloutConfig:
    """``train.rollout``: what generates the rollouts.

    Fields:
        engine: ``hf`` (the policy itself, in the trainer's process: ``vlgrpo.train.generation``) or ``vllm``
            (a vLLM engine in its own process, weights pushed from the policy: ``VllmConfig``).
        vllm: the vLLM engine's settings (read only with ``engine: vllm``).
    """
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass(frozen=True)
class LaunchConfig:
    """``train.launch``: how many processes (and machines) the train and pilot stages start.

    1 process (the default) trains inside the stage's own process. More processes are started by the stage
    through accelerate's launcher (torchrun underneath): ``python -m accelerate.commands.launch ... -m
    vlgrpo.train``, in a process group of their own that the stage stops when it fails or is stopped; the main
    process's metrics stream feeds MLflow and the progress display as in a 1-process run.

    Fields:
        num_processes: processes over all machines: 1 (in-process), N, or ``auto`` (one per visible GPU, 1
            on a machine without GPUs).
        config: an accelerate config file (e.g. ``configs/accelerate/fsdp2.yaml``), relative to the project
            root; its own process and machine counts are replaced by the ones here. null: plain DDP
            (``--multi_gpu``; over gloo on CPU processes).
        num_machines: machines the run spans; each machine runs the stage with its own ``machine_rank``.
        machine_rank: this machine's rank (0 = the main machine, the one whose stage writes the model,
            metrics and reports).
        main_process_ip: address of machine 0 (several machines; one machine uses 127.0.0.1).
        main_process_port: port of the process group's rendezvous on machine 0 (null: a free port, one
            machine only).
    """
    num_processes: int | Literal["auto"] = 1
    config: str | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def __post_init__(self) -> None:
        k = "train.launch"
        if self.num_processes != "auto":
            _check_range(f"{k}.num_processes", self.num_processes, 1)
        _check_range(f"{k}.num_machines", self.num_machines, 1)
        _check_range(f"{k}.machine_rank", self.machine_rank, 0, self.num_machines - 1)
        if self.main_process_port is not None:
            _check_range(f"{k}.main_process_port", self.main_process_port, 1, 65535)
        if self.num_machines > 1:
            if self.num_processes == "auto" or self.num_processes % self.num_machines:
                _fail(f"{k}.num_processes", f"with num_machines {self.num_machines} must be a number divisible "
                                            f"by it (the processes over all machines), got {self.num_processes!r}")
            if not self.main_process_ip or self.main_process_port is None:
                _fail(f"{k}.main_process_ip", "several machines need main_process_ip and main_process_port "
                                              "(machine 0's address and a port open on it)")


@dataclass(frozen=True)
class WatchConfig:
    """``train.watch``: what the full run keeps checking after the pilot's gate (``vlgrpo.eval.gates.watch``).

    A 10-step pilot cannot see a KL that climbs after step 90, or a reward that saturates so that every group
    ties; these are checked on every step of the run. A flag goes into ``reports/train.json`` (``watch``), the
    MLflow train run (tag ``vlgrpo.train_flags``, metric ``watch.flagged``) and the evaluation report.

    Attributes:
        max_kl: flag when the KL to the reference stays above this for ``patience`` steps in a row (null: off).
        collapse_frac: flag when ``frac_reward_zero_std`` (the share of groups whose G rewards all tie: no
            learning signal, e.g. a saturated reward) stays at or above this for ``patience`` steps in a row
            (null: off).
        patience: how many steps in a row a condition must hold to be flagged (one spike is not).
        stop_on: the flags that also stop the run at once: ``kl``, ``reward_collapse``. The final model is
            then the ``keep_best`` one (with ``train.keep_best``), else the newest checkpoint saved before
            the flagged stretch began, else the policy at the stop (``reports/train.json``: ``watch``).
    """
    max_kl: float | None = 1.0
    collapse_frac: float | None = 1.0
    patience: int = 10
    stop_on: tuple[Literal["kl", "reward_collapse"], ...] = ()

    def __post_init__(self) -> None:
        k = "train.watch"
        if self.max_kl is not None:
            _check_range(f"{k}.max_kl", self.max_kl, 0, lo_open=True)
        if self.collapse_frac is not None:
            _check_range(f"{k}.collapse_frac", self.collapse_frac, 0, 1, lo_open=True)
        _check_range(f"{k}.patience", self.patience, 1)
        for kind, limit in (("kl", "max_kl"), ("reward_collapse", "collapse_frac")):
            if kind in self.stop_on and getattr(self, limit) is None:
                _fail(f"{k}.stop_on", f"{kind!r} needs train.watch.{limit} (it is null: that check is off)")


@dataclass(frozen=True)
class TrainConfig:
    """``train``: the GRPO run (the ``pilot`` stage runs it with ``pilot.overrides`` applied).

    Attributes:
        seed: seeds the data order and every sampling stream (per step and prompt slot: exact resume).
        max_steps: GRPO steps (one step = one rollout + ``num_iterations`` optimizer updates).
        prompts_per_step: prompts per step over all processes (divisible by the number of processes).
        num_generations: completions sampled per prompt (G >= 2; the group of the advantages).
        micro_batch_size: completions per forward/backward; the step's batch is accumulated over
            prompts_per_step * num_generations / micro_batch_size micro-batches (a multiple or a divisor of G).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the updates with a linear warm-up, then cosine decay to 0.
        max_grad_norm: gradients are clipped to this global norm.
        temperature / top_p: sampling of the rollouts; log-probs are taken at the same temperature.
        max_completion_length: tokens a completion may have (C).
        max_prompt_tokens: prompts with more tokens (image tokens included) are dropped, never truncated
            (that could cut image tokens); the ``validate`` stage checks the data against the same limit.
        beta: weight of the k3 KL penalty to the base model (0: no reference model is loaded at all).
        epsilon_low / epsilon_high: PPO clip range [1 - epsilon_low, 1 + epsilon_high] of the ratio.
        loss_type: how per-token losses are aggregated: ``grpo`` (mean over completions of their token mean),
            ``bnpo`` (token mean of each process's step), ``dr_grpo`` (sum / (completions x
            max_completion_length)), ``dapo`` (token mean over the whole step, all processes); or another
            per-token objective: ``cispo`` (MiniMax-M1: the importance weight clipped to [1 - epsilon_low,
            1 + epsilon_high] and detached, times A log pi; aggregated as dapo) or ``sapo`` (a soft sigmoid
            gate instead of the clip; aggregated as grpo). Both equal the clipped surrogate's gradient when
            the policy has not moved since sampling (num_iterations 1).
        scale_rewards: advantages divide by the ``group``'s reward std, the ``batch``'s, or not at all
            (``none``); ``gdpo``: each reward normalised in its group before the weighted sum, the sum then
            normalised over the batch (GDPO; TRL's multi_objective_aggregation normalize_then_sum).
        advantage_estimator: ``grpo`` (the group-normalised reward, per scale_rewards), ``rloo`` (reward
            minus the mean of the group's other rewards, unscaled) or ``reinforce_pp`` (REINFORCE++ with the
            group baseline: centred in the group, normalised over the batch); ``reinforce_plus_plus`` is read
            as ``reinforce_pp``. rloo is never scaled and reinforce_pp always by the batch std (ms-swift's
            defaults for them): scale_rewards is then ``group`` (the default, read as theirs) or that value.
        sapo_temperature_pos / sapo_temperature_neg: SAPO's gate temperatures for tokens with positive /
            non-positive advantage (TRL's names and defaults, verl's tau_pos / tau_neg).
        entropy_coef: weight of an entropy bonus: the loss minus entropy_coef x the mean token entropy of each
            micro-batch (averaged over the micro-batches; only the high-entropy tokens with
            top_entropy_quantile < 1), as TRL's entropy_coef. 0: off.
        num_iterations: optimizer updates per rollout (> 1 uses the old policy's log-probs and clipping).
        mixed_precision: ``auto`` (default: bf16 on a GPU that has it, else fp16 on a GPU; on a CPU bf16
            only where it has native bf16 instructions - AVX512-BF16 or AMX - and the model has 10M+
            parameters, else fp32; the choice is logged), ``bf16``, ``fp16`` (GPU only) or ``no`` (fp32; ``fp32`` and ``false`` mean the same).
        save_steps: checkpoint every this many steps (and at the last one).
        save_total_limit: keep only the newest N complete checkpoints, deleting older ones after each save
            (null: keep all). The newest always stays, so a killed run still resumes.
        keep_best_checkpoint: also keep the checkpoint of the step with the highest mean reward (recorded
            in each checkpoint's state), beyond ``save_total_limit`` (the training-batch reward; the
            val-reward best of ``keep_best`` lives apart in ``checkpoints/best`` and is never rotated away).
        augment: label-preserving image augmentation of each step's prompts.
        subset: train on only the first N train items (null: all).
        out_dir: where the trained policy (and its checkpoints) go, under the project root.
        shared_work: encode each prompt and image once per group and expand its KV cache to the G
            completions (false: G full copies, like generic trainers; same maths).
        importance_sampling_level: where the PPO ratio is taken: ``token`` (GRPO), ``sequence`` (GSPO, TRL's
            option of that name: one ratio per completion, exp of the mean token log-ratio, clipped as a
            whole) or ``sequence_token`` (GSPO-token, ms-swift's: the sequence ratio's value with a per-token
            gradient). Only matters when the policy moved since sampling (num_iterations > 1).
        mask_truncated_completions: completions that hit max_completion_length without a stop token are
            left out of the loss (mask zeroed, tokens not counted), as TRL's option (DAPO).
        top_entropy_quantile: rho of "Beyond the 80/20 rule" (TRL's option): the policy term keeps only the
            completion tokens whose entropy is in the top rho quantile of the micro-batch (over all
            processes); 1.0 keeps all, 0.0 only the highest-entropy token, 0.2 is the paper's value. The KL
            term still covers every token.
        sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps: TR-DPO (TRL's options): after every
            ref_model_sync_steps-th optimizer update, pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref.
            Needs beta > 0. The reference weights go into the checkpoints (exact resume).
        dynamic_sampling / max_resample_rounds: DAPO's dynamic sampling: groups whose G rewards all tie
            (no signal) are replaced by groups of fresh prompts, drawn at random per (seed, step, round), for
            up to max_resample_rounds extra rounds; when they run out, tied groups fill the step (the batch
            size never changes). Logged: dynamic/resample_rounds, dynamic/groups_sampled,
            dynamic/frac_dropped (``vlgrpo.train.dynamic``).
        resample_temperature: with dynamic_sampling, the extra rounds sample at this temperature (null: at
            ``temperature``, as DAPO does). A hotter extra round finds right answers where every completion at
            ``temperature`` ties wrong, which is where a run stalls; log-probs and the loss stay at
            ``temperature`` (the completions are scored as if the policy had sampled them: a bias, traded
            for exploration). Round 0 always samples at ``temperature``. Measured: docs/features.md.
        eval_steps: every this many steps (and after the last), greedy ``eval/accuracy`` and ``eval/reward``
            on the val split go into the metrics stream (and MLflow); null: no evaluation.
        keep_best: with eval_steps, the final model in out_dir is the policy of the evaluation with the highest
            val reward, not the last one (``reports/train.json``: ``best``).
        logprob_chunk: completion tokens scored at once: the language-model head and the log-softmax run
            on this many tokens at a time and the backward pass recomputes one chunk at a time
            (``vlgrpo.algo.logprobs``), so at most logprob_chunk x vocabulary fp32 logits exist (512 x 151,936 x
            4 B = 0.31 GB for Qwen-VL). Memory and speed only: the result is the same to float rounding, and
            a run may resume with another value.
        gradient_checkpointing: recompute each decoder layer and vision block in the backward pass instead
            of keeping their activations (less memory, about one more forward; same gradients; the
            shared-work KV cache is kept: ``vlgrpo.model.grad_checkpointing``).
        lora: peft LoRA / QLoRA instead of full fine-tuning (``LoraConfig``).
        rollout: what generates the rollouts: the policy itself or a vLLM engine (``RolloutConfig``).

        launch: processes and machines of the run (``LaunchConfig``); the result does not depend on it beyond
            float rounding (checked on 2 CPU processes).
        watch: sustained KL and collapsed reward variance, flagged and optionally stopped on (``WatchConfig``).
    """
    seed: int = 0
    max_steps: int = 150
    prompts_per_step: int = 8
    num_generations: int = 8
    micro_batch_size: int = 32          # completions per forward/backward; the rest is accumulated
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    temperature: float = 0.7
    top_p: float = 1.0
    max_completion_length: int = 8
    max_prompt_tokens: int = 512
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none", "gdpo"] = "group"
    # reinforce_plus_plus (verl's, ms-swift's spelling) is normalised to reinforce_pp in __post_init__
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp", "reinforce_plus_plus"] = "grpo"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    entropy_coef: float = 0.0
    num_iterations: int = 1
    # "auto" picks for the hardware at set-up; False is what YAML reads `no` as (normalised to "no").
    mixed_precision: Literal["auto", "bf16", "fp16", "no", "fp32"] | bool = "auto"
    save_steps: int = 50
    save_total_limit: int | None = 2
    keep_best_checkpoint: bool = False
    augment: bool = False
    subset: int | None = None           # use only the first N train items
    out_dir: str = "models/candidate"
    shared_work: bool = True            # encode each prompt/image once per group (false: G copies)
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token"
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    resample_temperature: float | None = None
    eval_steps: int | None = None
    keep_best: bool = False
    logprob_chunk: int = 512            # completion tokens whose vocabulary-wide logits exist at once
    # Recompute each language-model decoder layer and vision block in the backward pass instead of keeping
    # their activations (less memory, about one more forward of compute); same gradients.
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)   # see LoraConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)   # see RolloutConfig

    launch: LaunchConfig = field(default_factory=LaunchConfig)   # see LaunchConfig
    watch: WatchConfig = field(default_factory=WatchConfig)      # see WatchConfig

    def __post_init__(self) -> None:
        k = "train"
        if self.mixed_precision is True:
            _fail(f"{k}.mixed_precision", "true is ambiguous; write auto, bf16, fp16 or no (fp32)")
        if self.mixed_precision in (False, "fp32"):   # one spelling for "no mixed precision" downstream
            object.__setattr__(self, "mixed_precision", "no")
        for n in ("max_steps", "prompts_per_step", "num_iterations", "save_steps",
                  "max_completion_length", "max_prompt_tokens", "micro_batch_size", "logprob_chunk"):
            _check_range(f"{k}.{n}", getattr(self, n), 1)
        _check_range(f"{k}.num_generations", self.num_generations, 2)
        _check_range(f"{k}.learning_rate", self.learning_rate, 0, lo_open=True)
        _check_range(f"{k}.warmup_ratio", self.warmup_ratio, 0, 1)
        _check_range(f"{k}.max_grad_norm", self.max_grad_norm, 0, lo_open=True)
        _check_range(f"{k}.temperature", self.temperature, 0, lo_open=True)
        _check_range(f"{k}.top_p", self.top_p, 0, 1, lo_open=True)
        _check_range(f"{k}.beta", self.beta, 0)
        _check_range(f"{k}.epsilon_low", self.epsilon_low, 0, 1)
        _check_range(f"{k}.epsilon_high", self.epsilon_high, 0)
        _check_range(f"{k}.weight_decay", self.weight_decay, 0)
        total = self.prompts_per_step * self.num_generations
        if total % self.micro_batch_size:
            _fail(f"{k}.micro_batch_size",
                  f"prompts_per_step*num_generations = {total} must be divisible by micro_batch_size "
                  f"({self.micro_batch_size}); pick a divisor of {total}")
        if self.micro_batch_size % self.num_generations and self.num_generations % self.micro_batch_size:
            _fail(f"{k}.micro_batch_size", "must be a multiple or a divisor of num_generations")
        if self.subset is not None:
            _check_range(f"{k}.subset", self.subset, 1)
        _check_range(f"{k}.top_entropy_quantile", self.top_entropy_quantile, 0, 1)
        if self.advantage_estimator == "reinforce_plus_plus":     # verl's / ms-swift's spelling
            object.__setattr__(self, "advantage_estimator", "reinforce_pp")
        own = {"rloo": "none", "reinforce_pp": "batch"}.get(self.advantage_estimator)   # grpo.OWN_SCALING
        if own is not None and self.scale_rewards not in ("group", own):
            _fail(f"{k}.scale_rewards", f"{self.scale_rewards!r} does not apply to advantage_estimator "
                                        f"{self.advantage_estimator}, which scales {own!r} (leave scale_rewards "
                                        f"at group or set {own})")
        _check_range(f"{k}.sapo_temperature_pos", self.sapo_temperature_pos, 0, lo_open=True)
        _check_range(f"{k}.sapo_temperature_neg", self.sapo_temperature_neg, 0, lo_open=True)
        _check_range(f"{k}.entropy_coef", self.entropy_coef, 0)
        _check_range(f"{k}.ref_model_mixup_alpha", self.ref_model_mixup_alpha, 0, 1)
        _check_range(f"{k}.ref_model_sync_steps", self.ref_model_sync_steps, 1)
        _check_range(f"{k}.max_resample_rounds", self.max_resample_rounds, 0)
        if self.resample_temperature is not None:
            _check_range(f"{k}.resample_temperature", self.resample_temperature, 0, lo_open=True)
        if self.sync_ref_model and self.beta == 0:
            _fail(f"{k}.sync_ref_model", "needs train.beta > 0 (with beta 0 there is no reference model)")
        if self.sync_ref_model and self.lora.enabled:
            _fail(f"{k}.sync_ref_model", "cannot be used with train.lora: the LoRA reference is the base with the "
                                        "adapters off, there are no reference weights to mix into")
        if self.eval_steps is not None:
            _check_range(f"{k}.eval_steps", self.eval_steps, 1)
        if self.keep_best and self.eval_steps is None:
            _fail(f"{k}.keep_best", "needs train.eval_steps (the best checkpoint is chosen by val reward)")
        if self.save_total_limit is not None:
            _check_range(f"{k}.save_total_limit", self.save_total_limit, 1)
        if self.rollout.engine == "vllm":
            self._check_vllm()

    def _check_vllm(self) -> None:
        k = "train.rollout.engine"
        if self.dynamic_sampling:
            _fail(k, "vllm does not support train.dynamic_sampling yet; use engine: hf for dynamic sampling")
        if self.resample_temperature is not None:
            _fail(k, "vllm does not support train.resample_temperature (it belongs to dynamic sampling)")
        if self.lora.quantize_4bit:
            _fail(k, "vllm cannot take the weights of a 4-bit (QLoRA) policy; use engine: hf")

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches accumulated into one optimizer step."""
        return self.completions_per_step // self.micro_batch_size


@dataclass(frozen=True)
class PilotConfig:
    """``pilot``: the small GRPO run that gates the full one (``vlgrpo.eval.gates.pilot_passed``).

    Attributes:
        overrides: train keys replaced for the pilot run (e.g. fewer steps, a subset of the data).
        max_kl: the gate fails when the KL to the base model exceeds this.
        min_reward_slope: the gate fails when the reward trend per step is significantly below this.
        max_grad_norm_spike: a grad norm above this many times the median (or a loss this many median absolute
            deviations out) is diagnosed "unstable" (remedy: learning rate x0.5).
        overfit_gap: train reward above the held-out val reward by more than this is diagnosed "overfitting"
            (remedy: augmentation on).
        alignment_low: alignment rewards below this while the surface rewards are above 1 - this is diagnosed
            "modality misalignment" (remedy: alignment reward weights x2).
        auto_adjust: the train stage applies the pilot's remedies to the values params.yaml gives then
            (relative remedies; recorded in reports/train.json and as the MLflow tag auto_adjust_changes).
    """
    overrides: dict[str, Any] = field(default_factory=lambda: {"max_steps": 10, "subset": 64})
    max_kl: float = 1.0
    min_reward_slope: float = 0.0
    max_grad_norm_spike: float = 10.0   # max grad norm / median grad norm
    overfit_gap: float = 0.25
    alignment_low: float = 0.3
    auto_adjust: bool = False

    def __post_init__(self) -> None:
        allowed = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in self.overrides:
            if key not in allowed:
                _fail(f"pilot.overrides.{key}", f"not a train key; allowed: {', '.join(sorted(allowed))}")
        _check_range("pilot.max_kl", self.max_kl, 0, lo_open=True)
        _check_range("pilot.max_grad_norm_spike", self.max_grad_norm_spike, 1)

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """The train config with this pilot's overrides applied (re-checked)."""
        raw = dataclasses.asdict(train)        # nested sections (train.lora) as mappings, re-checked below
        raw.update(self.overrides)
        try:
            return _build(TrainConfig, raw, "pilot.overrides")
        except ConfigError as e:  # TrainConfig's own checks say "train.<key>"; the culprit is the override
            raise ConfigError(str(e).replace("params.yaml: train.", "params.yaml: pilot.overrides.", 1)
                              + " (pilot.overrides applied over train)") from None


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate``: base vs candidate vs champion on the held-out test split, and the promotion rule.

    Attributes:
        primary_metric: the metric the candidate must improve (a reward name, ``reward``, or pass@k).
        min_improvement: candidate minus reference on the primary metric must reach this (and exceed 0, unless
            negative: then a non-improvement is accepted on purpose).
        guard_metrics: metric -> largest drop allowed against the reference; a bigger drop blocks promotion.
        batch_size: prompts per generation batch.
        samples_k: also sample k answers per item and report pass@k (0: greedy only).
        bootstrap: bootstrap resamples of the 95% intervals (>= 100).
        max_items: evaluate only the first N test items (null: all).
        seed: seed of the sampled answers and of the bootstrap.
        max_new_tokens: answer length; null: ``train.max_completion_length`` (what the policy was tuned at).
        report_samples: items shown (thumbnail, question, answers) in reports/evaluate.md.
    """
    primary_metric: str = "accuracy"
    min_improvement: float = 0.0
    guard_metrics: dict[str, float] = field(default_factory=lambda: {"format": 0.05})
    batch_size: int = 32
    samples_k: int = 0
    bootstrap: int = 1000
    max_items: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None   # None = train.max_completion_length (what the policy was tuned at)
    report_samples: int = 12            # items shown (thumbnail, question, answers) in reports/evaluate.md

    def __post_init__(self) -> None:
        _check_range("evaluate.batch_size", self.batch_size, 1)
        if self.max_items is not None:
            _check_range("evaluate.max_items", self.max_items, 1)
        if self.max_new_tokens is not None:
            _check_range("evaluate.max_new_tokens", self.max_new_tokens, 1)
        _check_range("evaluate.report_samples", self.report_samples, 0)
        _check_range("evaluate.samples_k", self.samples_k, 0)
        _check_range("evaluate.bootstrap", self.bootstrap, 100)
        for name, v in self.guard_metrics.items():
            _check_range(f"evaluate.guard_metrics.{name}", v, 0)


# What a request to the served model gets when it passes no ``batch_size`` / ``max_new_tokens`` (at most the caps).
REQUEST_BATCH_SIZE, REQUEST_MAX_NEW_TOKENS = 8, 32


@dataclass(frozen=True)
class ServingConfig:
    """``register.serving``: what a request to the served model may ask for (logged with the model; the served
    model refuses, with a 400 answer, a request beyond any of these).

    Attributes:
        max_records: rows (questions) per request.
        max_batch_size: largest ``batch_size`` a request may pass (prompts generated together).
        max_new_tokens: largest ``max_new_tokens`` a request may pass (answer length in tokens).
        max_question_chars: longest question (characters) a request may send.
        max_image_pixels: largest image (width x height) a request may send, checked from the image header
            before it is decoded; images above ``data.max_pixels`` are then downscaled to it. At least
            ``data.max_pixels``.
        image_folder: folder on the serving machine whose files a request may name instead of sending the
            bytes (relative: to the project root at registration); null: only image bytes (base64) are
            accepted and the served model opens no file a client names.
    """
    max_records: int = 64
    max_batch_size: int = 32
    max_new_tokens: int = 256
    max_question_chars: int = 4096
    # 4096 x 4096: a decoded RGB image of at most 48 MiB.
    max_image_pixels: int = 16_777_216
    image_folder: str | None = None

    def __post_init__(self) -> None:
        for key in ("max_records", "max_batch_size", "max_new_tokens", "max_question_chars", "max_image_pixels"):
            _check_range(f"register.serving.{key}", getattr(self, key), 1)
        if self.image_folder is not None and not self.image_folder.strip():
            _fail("register.serving.image_folder", "must not be empty (null: no folder)")


@dataclass(frozen=True)
class RegisterConfig:
    """``register``: the MLflow model registry and experiment.

    Attributes:
        model_name: registered model name; aliases ``candidate`` and ``champion`` point at its versions.
        experiment: MLflow experiment of the pipeline's runs.
        merge_lora: for a LoRA candidate, log the base with the adapter merged in (self-contained) instead
            of the adapter alone (small; needs the base it names where it is loaded).
        serving: the bounds of a request to the served model (:class:`ServingConfig`).
    """
    model_name: str = "vlgrpo-qwen-vl"
    experiment: str = "vlgrpo"
    # For a LoRA candidate (train.lora.enabled): false logs only the adapter (megabytes; loading it needs the
    # base model it names, at the same path or hub id), true logs the base with the adapter merged into it (a
    # self-contained checkpoint the size of the base). Ignored for a fully fine-tuned candidate.
    merge_lora: bool = False
    serving: ServingConfig = field(default_factory=ServingConfig)

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            _fail("register.model_name", "must not be empty")


@dataclass(frozen=True)
class Config:
    """The whole ``params.yaml``: one section per stage (see each section's class for its keys)."""
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def __post_init__(self) -> None:
        self.pilot.train_config(self.train)  # the pilot's merged config must be valid too
        if self.register.serving.max_image_pixels < self.data.max_pixels:
            _fail("register.serving.max_image_pixels", f"must be >= data.max_pixels ({self.data.max_pixels}), "
                  f"got {self.register.serving.max_image_pixels}: images of the model's own size would be refused")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _section_problems(cls: type, raw: Mapping[str, Any], prefix: str) -> list[str]:
    """Every unknown key and wrong type in ``raw`` (one message each), then, when there are none, the
    section's own value checks (the first one that fails)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = []
    for key in sorted(set(raw) - names, key=str):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        out.append(f"params.yaml: {dotted}: " + (_RETIRED.get(dotted) or f"unknown key; {hint}allowed keys in "
                                                 f"'{prefix or 'top level'}': {', '.join(sorted(names))}"))
    for key in [k for k in raw if k in names]:
        dotted = f"{prefix}.{key}" if prefix else key
        tp, value = hints[key], raw[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            out += _section_problems(tp, value, dotted)
            continue
        try:
            _coerce(dotted, value, tp)
        except ConfigError as e:
            out.append(str(e))
    if not out and prefix:
        try:
            _build(cls, raw, prefix)
        except ConfigError as e:
            out.append(str(e))
    return out


def config_problems(raw: Any) -> list[str]:
    """Every problem of a parsed params.yaml at once (``load_config`` stops at the first): unknown keys and
    wrong types everywhere, each section's value checks, then the checks across sections. [] when valid."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return ["params.yaml: top level must be a mapping of sections"]
    out = _section_problems(Config, raw, "")
    if not out:
        try:
            config_from_dict(raw)
        except ConfigError as e:
            out.append(str(e))
    return out


def read_params(path: str | Path) -> Any:
    """The parsed YAML of a params file; ConfigError naming the file when it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def config_from_dict(raw: Mapping[str, Any] | None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("params.yaml: top level must be a mapping of sections")
    return _build(Config, raw, "")


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    raw = read_params(path)
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("params.yaml:", f"{path}:", 1)) from None
