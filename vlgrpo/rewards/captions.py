"""Captions: ``detail_f1`` (the facts a caption states, checked against the item's scene graph) and
``reference`` (CIDEr-D against the item's reference captions)."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence

from vlgrpo.data.answers import WORD_TO_DIGIT
from vlgrpo.rewards.columns import column, is_short_answer_item, present
from vlgrpo.rewards.registry import RewardContext, RewardFn, register, register_factory


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
    scenes, tasks, sols = column(columns, "scene", n), column(columns, "task", n), column(columns, "solution", n)
    return [None if not sc or is_short_answer_item(t, s) else detail_f1_score(c, sc)
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
        refs, idx = present(columns, "references", len(completions))
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


@register_factory("reference")
def reference_factory(ctx: RewardContext) -> RewardFn:
    """``reference`` with document frequencies from each batch's distinct reference lists."""
    return make_reference()
