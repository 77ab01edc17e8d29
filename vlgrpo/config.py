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


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        _fail(f"{prefix}.{unknown[0]}" if prefix else unknown[0],
              f"unknown key; allowed keys in '{prefix or 'top level'}': {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs of the CLEVR-like scene generator."""
    canvas_size: int = 112
    min_objects: int = 1
    max_objects: int = 3
    min_object_size: int = 28
    max_object_size: int = 48
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
        from vlgrpo.data.synthetic import COLORS, SHAPES  # local: keeps import light
        for s in self.shapes:
            if s not in SHAPES:
                _fail(f"{k}.shapes", f"unknown shape {s!r}; allowed: {', '.join(SHAPES)}")
        for c in self.colors:
            if c not in COLORS:
                _fail(f"{k}.colors", f"unknown colour {c!r}; allowed: {', '.join(COLORS)}")
        if len(self.shapes) < 2 or len(self.colors) < 2:
            _fail(k, "needs at least two shapes and two colours so questions have more than one answer")


TASKS = ("count", "color", "shape", "exists", "caption")


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
        task_mix: relative weights of the synthetic tasks.
        min_pixels / max_pixels: pixel budget every image is resized into (Qwen-VL ``smart_resize``).
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
    task_mix: dict[str, float] = field(default_factory=lambda: {"count": 1.0, "color": 1.0, "shape": 1.0,
                                                                 "exists": 1.0, "caption": 0.0})
    min_pixels: int = 3136           # 56*56
    max_pixels: int = 12544          # 112*112
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
        if self.source != "synthetic" and not self.path:
            _fail("data.path", f"is required when data.source is {self.source!r}")
        for old, new in self.columns.items():
            if not new.strip():
                _fail(f"data.columns.{old}", "must name the column vlgrpo should read it as")
        if any(not r.strip() for r in self.image_roots):
            _fail("data.image_roots", "entries must be folder paths, not empty strings")


@dataclass(frozen=True)
class ValidateConfig:
    max_error_fraction: float = 0.0
    max_prompt_tokens: int = 512
    # Conservative text-token estimate for the offline default, whose tokenizer is trained later:
    # one token per UTF-8 byte can never under-count a byte-level BPE.
    tokenizer: str | None = None
    data_docs: bool = True

    def __post_init__(self) -> None:
        _check_range("validate.max_error_fraction", self.max_error_fraction, 0, 1)
        _check_range("validate.max_prompt_tokens", self.max_prompt_tokens, 1)


@dataclass(frozen=True)
class TinyModelConfig:
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
    model: str | None = None          # None = build the tiny offline Qwen2.5-VL
    trust_remote_code: bool = False
    out_dir: str = "models/base"
    seed: int = 0
    warmup_steps: int = 60            # supervised warm-start steps (tiny default only)
    batch_size: int = 16
    learning_rate: float = 3e-3
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        _check_range("base.warmup_steps", self.warmup_steps, 0)
        _check_range("base.batch_size", self.batch_size, 1)
        _check_range("base.learning_rate", self.learning_rate, 0, lo_open=True)


@dataclass(frozen=True)
class RewardsConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    plugins: tuple[str, ...] = ()
    on_error: Literal["raise", "skip"] = "raise"
    clip_model: str | None = None
    fluency_min_words: int = 1
    fluency_max_words: int = 30

    def __post_init__(self) -> None:
        if not self.weights:
            _fail("rewards.weights", "needs at least one reward")
        for name, w in self.weights.items():
            if w != w:  # NaN
                _fail(f"rewards.weights.{name}", "must be a number, got NaN")
        _check_range("rewards.fluency_min_words", self.fluency_min_words, 0)
        _check_range("rewards.fluency_max_words", self.fluency_max_words, self.fluency_min_words)


LM_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """``train.lora``: train low-rank adapters (peft LoRA) instead of every weight.

    With LoRA the reference policy is the same weights with the adapters switched off (no second copy), the
    frozen weights are held in the compute dtype (``train.mixed_precision``: bf16/fp16; fp32 with ``no``),
    only the adapters get gradients and optimizer state, checkpoints hold the adapters, and the final
    ``train.out_dir`` is a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` +
    processor) that names its base model. ``vlgrpo.modeling.load_model`` loads such a directory as base +
    adapter, merged.

    Fields:
        enabled: false = full fine-tuning (every weight trained).
        rank: r, the rank of each adapter (A: r x in, B: out x r).
        alpha: the adapter's output is scaled by alpha / rank.
        dropout: dropout on the adapter's input while training (0 keeps the maths deterministic).
        target_modules: leaf names of the language model's linear layers that get adapters (Qwen-VL:
            q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). lm_head and the embedding never do.
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
class TrainConfig:
    seed: int = 0
    max_steps: int = 60
    prompts_per_step: int = 8
    num_generations: int = 8
    micro_batch_size: int = 16          # completions per forward/backward; the rest is accumulated
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 8
    max_prompt_tokens: int = 512
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    save_steps: int = 20
    augment: bool = False
    subset: int | None = None           # use only the first N train items
    out_dir: str = "models/candidate"
    log_every: int = 1
    shared_work: bool = True            # encode each prompt/image once per group (false: G copies)
    # Recompute each language-model decoder layer and vision block in the backward pass instead of keeping
    # their activations (less memory, about one more forward of compute); same gradients.
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)   # see LoraConfig

    def __post_init__(self) -> None:
        k = "train"
        for n in ("max_steps", "prompts_per_step", "num_iterations", "save_steps", "log_every",
                  "max_completion_length", "max_prompt_tokens", "micro_batch_size"):
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

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches accumulated into one optimizer step."""
        return self.completions_per_step // self.micro_batch_size


@dataclass(frozen=True)
class PilotConfig:
    """The small gate run: ``overrides`` replace keys of ``train``; the gate thresholds live here."""
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


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "vlgrpo-qwen-vl"
    experiment: str = "vlgrpo"
    # For a LoRA candidate (train.lora.enabled): false logs only the adapter (megabytes; loading it needs the
    # base model it names, at the same path or hub id), true logs the base with the adapter merged into it (a
    # self-contained checkpoint the size of the base). Ignored for a fully fine-tuned candidate.
    merge_lora: bool = False

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            _fail("register.model_name", "must not be empty")


@dataclass(frozen=True)
class Config:
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

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_from_dict(raw: Mapping[str, Any] | None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("params.yaml: top level must be a mapping of sections")
    return _build(Config, raw, "")


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("params.yaml:", f"{path}:", 1)) from None
