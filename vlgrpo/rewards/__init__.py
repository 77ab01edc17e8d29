"""Reward registry (outcome reward models): name -> ``fn(prompts, completions, **columns) -> list[float|None]``.

A reward scores a batch of completions. ``columns`` are per-completion lists built from
``Item.columns()`` (``id``, ``task``, ``solution``, ``references``, ``scene``, ``images`` and the item's extra
keys) plus ``terminated`` (True when the completion ended with EOS instead of hitting the length limit).
``None`` means "not applicable to this item" (e.g. ``accuracy`` on a caption); the combined reward skips it.

    from vlgrpo.rewards import compute_rewards
    out = compute_rewards({"accuracy": 1.0, "format": 0.1}, prompts, completions, columns)
    out.total, out.per_reward["accuracy"]

Adding a reward: decorate a function with ``@register("name")`` in a Python file and list the file under
``rewards.plugins`` in params.yaml; ``load_plugins`` imports it. Parameterised rewards come from factories
(``make_fluency``, ``make_reference``, ``make_clip_score``) whose result keeps a stable ``__name__``: the
name is the metric name everywhere (logs, reports, MLflow).

Built in: ``accuracy``, ``format``, ``detail_f1``, ``reference`` (CIDEr-D), ``fluency``, ``soft_overlong``
(needs the ``completion_length`` column: completion tokens), ``iou`` (grounding: box answers); ``clip_score``
needs a local CLIP checkpoint (``rewards.clip_model``) and learned reward models (``rewards.models``) a local
sequence-classification model or a local Qwen-VL judge; both are built by :func:`resolve_rewards`.

Boxes (``iou``, and ``accuracy`` on items whose solution is a box: IoU >= 0.5): the gold box is the item's
solution, ``[x1, y1, x2, y2]`` in pixels of the original image, as JSON (``[..]``, ``{"bbox_2d": [..]}`` or a
list of those; the first box counts). Answers are parsed the same way, or as the first four numbers of the
text; they are in the model's convention (``rewards.iou_box_format``): Qwen2.5-VL answers in absolute pixels
of the image it sees (the original resized by ``smart_resize`` into the pixel budget), Qwen3-VL in 0-1000
relative coordinates.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from vlgrpo.data.answers import WORD_TO_DIGIT, normalize_answer

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}
VERIFIABLE_TASKS = ("count", "color", "shape", "exists")
MAX_SHORT_ANSWER_WORDS = 3


class RewardError(RuntimeError):
    """A reward failed or returned a bad value; the message names the reward and the item id."""


class PluginError(ImportError):
    """A reward plugin file could not be imported; the message names the file."""


# ------------------------------------------------------------------------------------------- registry


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as reward ``name``.

    Registering the same function again (same module and qualified name, e.g. a plugin loaded twice)
    replaces it; a *different* function under a taken name is an error, so two plugins cannot silently
    shadow each other.
    """
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"reward name {name!r}: use letters, digits, '_', '-' or '.'")

    def deco(fn: RewardFn) -> RewardFn:
        old = REWARDS.get(name)
        # A plugin may replace a reward an earlier plugin file registered (another project's run in the same
        # process, e.g. a test session or a long-lived worker); it may never shadow a built-in.
        from_plugins = old is not None and all(_origin(f)[0].startswith(_PLUGIN_PREFIX) for f in (old, fn))
        if old is not None and (_origin(old) != _origin(fn)) and not from_plugins:
            raise ValueError(f"reward {name!r} is already registered by {_origin(old)[0]}.{_origin(old)[1]}")
        REWARDS[name] = fn
        return fn

    return deco


def _origin(fn: Any) -> tuple[str, str]:
    return getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn))


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}"
                       + ("; clip_score is built by resolve_rewards from rewards.clip_model"
                          if name == "clip_score" else "")) from None


_PLUGIN_PREFIX = "vlgrpo_plugin_"


def load_plugins(paths: Iterable[str | Path]) -> list[str]:
    """Import each Python file (which calls :func:`register`); return the reward names it added."""
    added: list[str] = []
    for p in paths:
        path = Path(p).resolve()
        if not path.is_file():
            raise PluginError(f"reward plugin {p}: file not found")
        before = dict(REWARDS)
        # A stable, path-derived module name: loading the same file twice re-registers, not duplicates.
        mod_name = f"{_PLUGIN_PREFIX}{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise ImportError("not a Python source file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            sys.modules.pop(mod_name, None)
            REWARDS.clear()
            REWARDS.update(before)  # a half-imported plugin must not leave half its rewards behind
            raise PluginError(f"reward plugin {p}: {type(e).__name__}: {e}") from e
        added += [n for n in REWARDS if REWARDS[n] is not before.get(n)]
    return added


# -------------------------------------------------------------------------------------- small helpers


def _words(text: str) -> list[str]:
    return text.split()


def _terminated(columns: Mapping[str, Any], n: int) -> list[bool]:
    # Without the column (e.g. scoring stored texts) every completion is taken as finished.
    return list(columns.get("terminated") or [True] * n)


def _col(columns: Mapping[str, Any], key: str, n: int) -> list[Any]:
    return list(columns.get(key) or [None] * n)


def _is_short_answer_item(task: Any, solution: Any) -> bool:
    return task in VERIFIABLE_TASKS or bool(solution)


# ---- boxes (grounding)

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
    sols = _col(columns, "solution", len(completions))
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


# -------------------------------------------------------------------------------------- built-ins


def make_accuracy(conv: BoxConvention = BoxConvention()) -> RewardFn:
    """1.0 when the normalised completion *equals* the normalised solution; None when there is no solution.
    A box solution (grounding) is matched by IoU >= 0.5 under ``conv`` instead."""

    def accuracy(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        sols = _col(columns, "solution", len(completions))
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


accuracy = register("accuracy")(make_accuracy())
register("iou")(make_iou())


@register("format")
def format_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 for a finished, non-empty, single answer: <= 3 words on one line for short-answer items,
    one paragraph for free text (captions); 0.0 otherwise."""
    n = len(completions)
    tasks, sols, term = _col(columns, "task", n), _col(columns, "solution", n), _terminated(columns, n)
    out = []
    for c, task, sol, done in zip(completions, tasks, sols, term):
        text = c.strip()
        if not text or not done:
            out.append(0.0)
        elif parse_box(sol, strict=True) is not None:                # grounding: one box on one line
            out.append(float("\n" not in text and parse_box(text) is not None))
        elif _is_short_answer_item(task, sol):
            out.append(float("\n" not in text and len(_words(text)) <= MAX_SHORT_ANSWER_WORDS))
        else:
            out.append(float("\n\n" not in text))
    return out


# ---- detail_f1: facts a caption states, checked against the scene graph

_GENERIC_NOUNS = {"shape", "shapes", "object", "objects", "thing", "things", "item", "items"}
_ONE = {"a": 1, "an": 1, "one": 1, "single": 1, "no": 0}


def _vocab() -> tuple[dict[str, str], set[str]]:
    from vlgrpo.data.synthetic import COLORS, PLURALS
    shapes = {s: s for s in PLURALS} | {p: s for s, p in PLURALS.items()}
    return shapes, set(COLORS)


def _number(tok: str) -> int | None:
    if tok in _ONE:
        return _ONE[tok]
    if tok.isdigit():
        return int(tok)
    return int(WORD_TO_DIGIT[tok]) if tok in WORD_TO_DIGIT else None


Fact = tuple


def caption_facts(text: str) -> set[Fact]:
    """The facts a caption states about a scene of coloured shapes.

    - ``("count", colour|None, shape|None, n)`` for "<number> [colour] <shape|shapes|objects>"
      ("two red circles", "three shapes", "a blue square", "no green triangles" -> n=0);
    - ``("color", c)`` / ``("shape", s)`` for every colour / shape word outside an n=0 phrase
      (mentioning "red" claims a red object exists).
    Repeating a fact states it once (a set), so repetition cannot raise the score.
    """
    shapes, colors = _vocab()
    toks = re.findall(r"[a-z]+|\d+", text.lower())
    facts: set[Fact] = set()
    negated: set[int] = set()  # token positions inside "no ..." phrases: they claim absence
    for i, tok in enumerate(toks):
        n = _number(tok)
        if n is None:
            continue
        j = i + 1
        color = toks[j] if j < len(toks) and toks[j] in colors else None
        j += color is not None
        if j < len(toks) and (toks[j] in shapes or toks[j] in _GENERIC_NOUNS):
            facts.add(("count", color, shapes.get(toks[j]), n))
            if n == 0:
                negated.update(range(i, j + 1))
    for i, tok in enumerate(toks):
        if i in negated:
            continue
        if tok in colors:
            facts.add(("color", tok))
        elif tok in shapes:
            facts.add(("shape", shapes[tok]))
    return facts


def _fact_true(fact: Fact, scene: Mapping[str, Any]) -> bool:
    from vlgrpo.data.synthetic import count_objects
    if fact[0] == "count":
        return count_objects(scene, fact[1], fact[2]) == fact[3]
    if fact[0] == "color":
        return count_objects(scene, color=fact[1]) > 0
    return count_objects(scene, shape=fact[1]) > 0


def scene_facts(scene: Mapping[str, Any]) -> set[Fact]:
    """What a complete caption covers: the count of every colour+shape present, every colour, every shape."""
    groups = Counter((o["color"], o["shape"]) for o in scene["objects"])
    facts: set[Fact] = {("count", c, s, n) for (c, s), n in groups.items()}
    facts |= {("color", c) for c, _ in groups} | {("shape", s) for _, s in groups}
    return facts


def detail_f1_score(text: str, scene: Mapping[str, Any]) -> float:
    """F1 of stated facts: precision = true stated / stated, recall = covered scene facts / scene facts.

    Stated true facts that are not in the canonical set (a total count, "two red shapes") raise precision
    but not recall.
    """
    stated = caption_facts(text)
    truth = scene_facts(scene)
    if not truth:
        return 1.0 if not stated else 0.0
    if not stated:
        return 0.0
    precision = sum(_fact_true(f, scene) for f in stated) / len(stated)
    recall = len(stated & truth) / len(truth)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@register("detail_f1")
def detail_f1(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
    """Caption detail F1 against the scene graph; None without a scene or for short-answer tasks."""
    n = len(completions)
    scenes, tasks, sols = _col(columns, "scene", n), _col(columns, "task", n), _col(columns, "solution", n)
    return [None if not sc or _is_short_answer_item(t, s) else detail_f1_score(c, sc)
            for c, sc, t, s in zip(completions, scenes, tasks, sols)]


# ---- reference: CIDEr-D against the item's reference captions


def _cider_tokens(text: str) -> str:
    # The COCO PTB tokenizer needs Java; lower-cased alphanumeric words are what it keeps for these texts.
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _cider_d(pairs: list[tuple[str, list[str]]], corpus: list[list[str]]) -> list[float]:
    """CIDEr-D (pycocoevalcap's scorer: tf-idf n-grams 1..4, clipping, length penalty, x10) per pair.

    Document frequencies come from ``corpus`` (one entry per image: its reference list), not from
    ``pairs``: in GRPO a batch holds G completions of the same image and counting its references G
    times would distort the idf.
    """
    import numpy as np
    from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

    df: defaultdict = defaultdict(float)
    for refs in corpus:
        for ngram in {g for ref in cook_refs([_cider_tokens(r) for r in refs]) for g in ref}:
            df[ngram] += 1
    log_n = float(np.log(float(max(len(corpus), 1))))

    class _FixedCorpus(CiderScorer):
        # compute_cider() sets ref_len = log(#pairs); keep the corpus size instead.
        ref_len = property(lambda self: log_n, lambda self, value: None)

    scorer = _FixedCorpus()
    scorer.document_frequency = df
    scorer.crefs = [cook_refs([_cider_tokens(r) for r in refs]) for _, refs in pairs]
    scorer.ctest = [cook_test(_cider_tokens(h)) for h, _ in pairs]
    return [float(s) for s in scorer.compute_cider()]


def make_reference(corpus: Sequence[Sequence[str]] | None = None) -> RewardFn:
    """CIDEr-D reward. ``corpus`` (reference lists, one per image, e.g. the train split's) fixes the
    document frequencies; without it they come from the batch's *distinct* reference lists. With one
    distinct image in a batch every n-gram has idf 0 and the score is 0: pass a corpus in that setting.
    """
    fixed = [list(r) for r in corpus] if corpus is not None else None

    def reference(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        refs = _col(columns, "references", len(completions))
        idx = [i for i, r in enumerate(refs) if r]
        out: list[float | None] = [None] * len(completions)
        if not idx:
            return out
        docs = fixed if fixed is not None else list({tuple(refs[i]): list(refs[i]) for i in idx}.values())
        scores = _cider_d([(completions[i], list(refs[i])) for i in idx], docs)
        for i, s in zip(idx, scores):
            out[i] = s
        return out

    reference.__name__ = reference.__qualname__ = "reference"
    return reference


register("reference")(make_reference())


# ---- fluency


def make_fluency(min_words: int = 1, max_words: int = 30, ngram: int = 2,
                 unterminated_factor: float = 0.5) -> RewardFn:
    """Fluency in [0, 1] = distinct-n ratio x length factor x (1 or ``unterminated_factor``).

    distinct-n: unique n-grams / n-grams (texts shorter than n use unigrams), so "red red red" scores 1/3;
    length factor: 1 inside [min_words, max_words], else words/min_words or max_words/words.
    """
    if not 0 <= min_words <= max_words:
        raise ValueError(f"fluency: need 0 <= min_words <= max_words, got {min_words}, {max_words}")

    def fluency(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        term = _terminated(columns, len(completions))
        return [fluency_score(c, done, min_words, max_words, ngram, unterminated_factor)
                for c, done in zip(completions, term)]

    fluency.__name__ = fluency.__qualname__ = "fluency"
    return fluency


def fluency_score(text: str, terminated: bool, min_words: int, max_words: int, ngram: int = 2,
                  unterminated_factor: float = 0.5) -> float:
    words = [w.strip(".,!?;:").lower() for w in _words(text)]
    words = [w for w in words if w]
    if not words:
        return 0.0 if min_words > 0 else (1.0 if terminated else unterminated_factor)
    k = ngram if len(words) >= ngram else 1
    grams = [tuple(words[i:i + k]) for i in range(len(words) - k + 1)]
    distinct = len(set(grams)) / len(grams)
    n = len(words)
    length = 1.0 if min_words <= n <= max_words else (n / min_words if n < min_words else max_words / n)
    return distinct * length * (1.0 if terminated else unterminated_factor)


register("fluency")(make_fluency())


# ---- soft_overlong


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length − buffer tokens, then linear to −1 at max_length,
    −1 beyond."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0


def make_soft_overlong(max_length: int, buffer: int) -> RewardFn:
    """``soft_overlong`` reward over the ``completion_length`` column (completion tokens, stop token included)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"soft_overlong: need 0 < buffer <= max_length, got buffer={buffer}, "
                         f"max_length={max_length}")

    def soft_overlong(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        lengths = columns.get("completion_length")
        if lengths is None:
            raise KeyError("soft_overlong needs the 'completion_length' column (completion tokens)")
        return [soft_overlong_penalty(int(n), max_length, buffer) for n in lengths]

    soft_overlong.__name__ = soft_overlong.__qualname__ = "soft_overlong"
    return soft_overlong


# ---- learned reward models


# Model types whose checkpoints are vision-language judges (generative Qwen-VL) rather than classifiers.
VL_JUDGE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# What a vision-language judge is asked; its reward is P(yes) / (P(yes) + P(no)) for the next token.
JUDGE_TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nIs the answer correct? Answer yes or no."


def _model_type(path: Path) -> str | None:
    import json

    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def make_reward_model(name: str, path: str | Path, batch_size: int = 32, device: str = "cpu", *,
                      image_root: str | Path = ".", pixels: tuple[int, int] = (3136, 12544)) -> RewardFn:
    """A learned reward from a local checkpoint: a transformers sequence-classification model scores
    ``prompt + completion`` (logit 0, like TRL's reward models); a Qwen-VL checkpoint (``VL_JUDGE_TYPES``)
    is a vision-language judge (:func:`make_vl_judge`: the item's images under ``image_root``, in the
    ``pixels`` budget). ``batch_size`` texts per forward.

    ``path``: a directory with the model (safetensors) and its tokenizer; never downloaded, no remote code.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"reward model {name!r}: rewards.models.{name} = {path} is not a local directory")
    if _model_type(path) in VL_JUDGE_TYPES:
        return make_vl_judge(name, path, batch_size, device, image_root=image_root, pixels=pixels)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=True, trust_remote_code=False, use_safetensors=True).to(device).eval()
    if tokenizer.pad_token is None:                  # batches are padded; the model must know the pad id
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                            add_special_tokens=False).to(device)
            out += model(**enc).logits[:, 0].float().tolist()
        return out

    score.__name__ = score.__qualname__ = name
    return score


def _yes_no_ids(tokenizer: Any, name: str) -> tuple[int, int]:
    """The first token of "yes" and of "no" (one token each in Qwen's vocabulary)."""
    yes, no = (tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "no"))
    if not yes or not no or yes[0] == no[0]:
        raise ValueError(f"reward model {name!r}: its tokenizer cannot tell 'yes' from 'no' by their first token")
    return yes[0], no[0]


def make_vl_judge(name: str, path: str | Path, batch_size: int = 32, device: str = "cpu", *,
                  image_root: str | Path = ".", pixels: tuple[int, int] = (3136, 12544)) -> RewardFn:
    """A vision-language judge: a local Qwen-VL checkpoint sees the item's images and ``JUDGE_TEMPLATE``
    (question, completion, "Is the answer correct? Answer yes or no.") as one user turn, and the reward is
    P(yes) / (P(yes) + P(no)) of its next token, in [0, 1]. Batches of ``batch_size`` prompts, left-padded
    (the Qwen-VL position ids follow the padding), so a batched score equals the one-at-a-time score.

    Images come from the ``images`` column (paths under ``image_root``, the manifest's folder) and are fitted
    into ``pixels`` (data.min_pixels, data.max_pixels) as the policy's are. Videos are not shown to it.
    """
    import torch

    from vlgrpo.model import modeling
    from vlgrpo.data.manifest import Item

    model, processor = modeling.load_model(path)
    model.to(device)
    yes, no = _yes_no_ids(processor.tokenizer, name)
    root = Path(image_root)

    @torch.no_grad()
    def judge(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        images = _col(columns, "images", len(completions))
        items = [Item(id=str(i), split="test", task="vqa", images=list(im or []),
                      question=JUDGE_TEMPLATE.format(prompt=p, completion=c))
                 for i, (p, c, im) in enumerate(zip(prompts, completions, images))]
        out: list[float] = []
        for s in range(0, len(items), batch_size):
            enc = modeling.encode_prompts(processor, items[s:s + batch_size], root, *pixels).to(device)
            # left padding: the last position predicts the next token; only its logits are computed
            logits = model(**enc, logits_to_keep=1).logits[:, -1, [yes, no]].float()
            out += torch.softmax(logits, dim=-1)[:, 0].tolist()
        return out

    judge.__name__ = judge.__qualname__ = name
    return judge


# ---- clip_score


def make_clip_score(path: str | Path, root: str | Path = ".", device: str = "cpu") -> RewardFn:
    """Cosine similarity in [-1, 1] between a completion and its (first) image under a local CLIP.

    ``path``: a directory with a transformers ``CLIPModel`` and ``CLIPProcessor`` (never downloaded);
    ``root``: the folder the ``images`` column is relative to (the manifest's folder).
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"clip_score: rewards.clip_model {path} is not a local directory")
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    max_len = model.config.text_config.max_position_embeddings
    root = Path(root)

    def _features(out: Any) -> "torch.Tensor":
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def clip_score(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        from PIL import Image

        images = _col(columns, "images", len(completions))
        idx = [i for i, im in enumerate(images) if im]
        out: list[float | None] = [None] * len(completions)
        if not idx:
            return out
        files = sorted({images[i][0] for i in idx})   # G completions share one image: embed it once
        pics = []
        for f in files:
            with Image.open(root / f) as im:
                pics.append(im.convert("RGB"))
        img_in = processor(images=pics, return_tensors="pt").to(device)
        img = _features(model.get_image_features(pixel_values=img_in["pixel_values"]))      # (F, D)
        txt_in = processor(text=[completions[i] for i in idx], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_len).to(device)
        txt = _features(model.get_text_features(input_ids=txt_in["input_ids"],
                                                attention_mask=txt_in["attention_mask"]))     # (N, D)
        row = {f: k for k, f in enumerate(files)}
        sims = (txt * img[[row[images[i][0]] for i in idx]]).sum(-1)                         # (N,)
        for i, s in zip(idx, sims.tolist()):
            out[i] = float(s)
        return out

    clip_score.__name__ = clip_score.__qualname__ = "clip_score"
    return clip_score


# ------------------------------------------------------------------------------------------- resolving


def resolve_rewards(names: Iterable[str], cfg: Any = None, root: str | Path = ".", *,
                    image_root: str | Path | None = None, pixels: tuple[int, int] | None = None,
                    max_completion_length: int | None = None) -> dict[str, RewardFn]:
    """Reward functions for ``names``, building the configured ones from ``cfg`` (a ``RewardsConfig``):
    ``fluency`` uses its word window, ``clip_score`` its ``clip_model`` (a local path), ``accuracy`` / ``iou``
    its box convention with ``pixels`` (data.min_pixels, data.max_pixels; images read under ``image_root``,
    the manifest's folder, default ``root``), ``soft_overlong`` its buffer and maximum (default
    ``max_completion_length``), and every name in ``rewards.models`` its learned model (under ``root``)."""
    from vlgrpo.io import under_root


    out: dict[str, RewardFn] = {}
    conv = None
    if cfg is not None:
        conv = BoxConvention(cfg.iou_box_format, *(pixels or (3136, 12544)), str(image_root or root))
    models = dict(getattr(cfg, "models", None) or {})
    for name in names:
        if name in models:
            if name in REWARDS:
                raise KeyError(f"rewards.models.{name}: {name!r} is already a registered reward; pick "
                               f"another name")
            out[name] = make_reward_model(name, under_root(root, models[name]), cfg.model_batch_size,
                                          image_root=image_root or root, pixels=pixels or (3136, 12544))
        elif name in ("accuracy", "iou") and conv is not None:
            out[name] = (make_accuracy if name == "accuracy" else make_iou)(conv)
        elif name == "soft_overlong":
            max_len = (cfg.overlong_max_length if cfg is not None else None) or max_completion_length
            if max_len is None:
                raise KeyError("reward 'soft_overlong' needs rewards.overlong_max_length or "
                               "train.max_completion_length")
            out[name] = make_soft_overlong(max_len, cfg.overlong_buffer if cfg is not None else 2)
        elif name == "clip_score" and name not in REWARDS:
            model = getattr(cfg, "clip_model", None)
            if not model:
                raise KeyError("reward 'clip_score' needs rewards.clip_model (a local CLIP directory)")
            out[name] = make_clip_score(under_root(root, model), root=image_root or root)
        elif name == "fluency" and cfg is not None:
            out[name] = make_fluency(cfg.fluency_min_words, cfg.fluency_max_words)
        else:
            out[name] = get_reward(name)
    return out


def setup_rewards(names: Iterable[str], cfg: Any, root: str | Path, manifest_dir: str | Path, *,
                  pixels: tuple[int, int] | None = None, max_completion_length: int | None = None
                  ) -> dict[str, RewardFn]:
    """The one reward set-up of training and evaluation: load ``cfg.plugins`` and build ``names``.

    Plugin files, ``clip_model`` and ``models`` are taken relative to the project ``root`` (never the current
    directory, so a stage runs the same from any folder); the ``images`` column a reward reads is relative to
    ``manifest_dir``, like the manifest's own image paths. ``pixels`` (data.min_pixels, data.max_pixels) and
    ``max_completion_length`` configure the box rewards and ``soft_overlong`` (see :func:`resolve_rewards`).
    """
    from vlgrpo.io import under_root

    load_plugins([under_root(root, p) for p in cfg.plugins])
    return resolve_rewards(names, cfg, root=root, image_root=manifest_dir, pixels=pixels,
                           max_completion_length=max_completion_length)


# ------------------------------------------------------------------------------------------ combining


class RewardBatch(NamedTuple):
    per_reward: dict[str, list[float | None]]
    total: list[float]


def combine(rewards_by_name: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float]:
    """``total_i = sum_k w_k r_ki`` over the rewards that apply to item i (None skipped; none apply -> 0)."""
    missing = [k for k in weights if k not in rewards_by_name]
    if missing:
        raise KeyError(f"combine: no scores for weighted reward(s) {', '.join(missing)}")
    lengths = {len(v) for v in rewards_by_name.values()}
    if len(lengths) > 1:
        raise ValueError(f"combine: rewards have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    return [sum(w * rewards_by_name[k][i] for k, w in weights.items() if rewards_by_name[k][i] is not None)
            for i in range(n)]


def _item_id(columns: Mapping[str, Any], i: int) -> str:
    ids = columns.get("id")
    return str(ids[i]) if ids is not None and i < len(ids) else f"#{i}"


def _check_values(name: str, values: Any, n: int, columns: Mapping[str, Any]) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward {name!r} returned {got} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise RewardError(f"reward {name!r} returned {v!r} for item {_item_id(columns, i)}: not a number")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r} returned {f} for item {_item_id(columns, i)}")
        out.append(f)
    return out


def _run_one(name: str, fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
             columns: Mapping[str, Any], on_error: str) -> list[float | None]:
    n = len(completions)
    try:
        return _check_values(name, fn(list(prompts), list(completions), **columns), n, columns)
    except RewardError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - narrowed to the failing item(s) below
        first = batch_error
    # The batch call failed: score item by item to name the culprit (and, for "skip", keep the rest).
    # Batch-level statistics (e.g. CIDEr's document frequencies) are then per item: a degraded fallback.
    out: list[float | None] = []
    for i in range(n):
        cols_i = {k: [v[i]] for k, v in columns.items()}
        try:
            got = fn([prompts[i]], [completions[i]], **cols_i)
            out += _check_values(name, got, 1, {"id": [_item_id(columns, i)]})
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001
            if on_error == "raise":
                raise RewardError(f"reward {name!r} failed on item {_item_id(columns, i)}: "
                                  f"{type(e).__name__}: {e}") from e
            out.append(None)
    if on_error == "raise":  # every item alone succeeds: the failure is in the batch handling itself
        raise RewardError(f"reward {name!r} failed on the batch of items {_item_id(columns, 0)}.."
                          f"{_item_id(columns, n - 1)} (each item alone succeeds): "
                          f"{type(first).__name__}: {first}") from first
    return out


def compute_rewards(names_weights: Mapping[str, float], prompts: Sequence[str], completions: Sequence[str],
                    columns: Mapping[str, Sequence[Any]], on_error: str = "raise",
                    rewards: Mapping[str, RewardFn] | None = None) -> RewardBatch:
    """Score every completion with every weighted reward and combine them.

    ``columns``: per-completion lists (all of length ``len(completions)``). ``rewards``: prebuilt functions
    (from :func:`resolve_rewards`); names not in it come from the registry. ``on_error="raise"``: a reward
    that raises gives :class:`RewardError` naming the reward and item; ``"skip"``: that item scores None and
    the others are still scored. A NaN/inf score or a wrong-length result is always a RewardError: it is a
    bug in the reward, not a property of one item.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} values for {n} completions")
    fns = dict(rewards or {})
    per = {name: _run_one(name, fns[name] if name in fns else get_reward(name), prompts, completions,
                          columns, on_error)
           for name in names_weights}
    return RewardBatch(per, combine(per, names_weights))
