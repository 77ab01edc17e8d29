"""Text form: ``fluency`` (distinct n-grams in a word window) and ``soft_overlong`` (DAPO's soft overlong
punishment over the ``completion_length`` column: completion tokens)."""
from __future__ import annotations

from typing import Any, Sequence

from vlgrpo.rewards.columns import terminated
from vlgrpo.rewards.registry import RewardContext, RewardFn, register_factory


def make_fluency(min_words: int = 1, max_words: int = 30, ngram: int = 2,
                 unterminated_factor: float = 0.5) -> RewardFn:
    """Fluency in [0, 1] = distinct-n ratio x length factor x (1 or ``unterminated_factor``).

    distinct-n: unique n-grams / n-grams (texts shorter than n use unigrams), so "red red red" scores 1/3;
    length factor: 1 inside [min_words, max_words], else words/min_words or max_words/words.
    """
    if not 0 <= min_words <= max_words:
        raise ValueError(f"fluency: need 0 <= min_words <= max_words, got {min_words}, {max_words}")

    def fluency(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        term = terminated(columns, len(completions))
        return [fluency_score(c, done, min_words, max_words, ngram, unterminated_factor)
                for c, done in zip(completions, term)]

    fluency.__name__ = fluency.__qualname__ = "fluency"
    return fluency


def fluency_score(text: str, terminated: bool, min_words: int, max_words: int, ngram: int = 2,
                  unterminated_factor: float = 0.5) -> float:
    words = [w.strip(".,!?;:").lower() for w in text.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0 if min_words > 0 else (1.0 if terminated else unterminated_factor)
    k = ngram if len(words) >= ngram else 1
    grams = [tuple(words[i:i + k]) for i in range(len(words) - k + 1)]
    distinct = len(set(grams)) / len(grams)
    n = len(words)
    length = 1.0 if min_words <= n <= max_words else (n / min_words if n < min_words else max_words / n)
    return distinct * length * (1.0 if terminated else unterminated_factor)


@register_factory("fluency")
def fluency_factory(ctx: RewardContext) -> RewardFn:
    """``fluency`` in the word window ``rewards.fluency_min_words`` .. ``fluency_max_words``."""
    return make_fluency(ctx.rewards.fluency_min_words, ctx.rewards.fluency_max_words)


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


@register_factory("soft_overlong")
def soft_overlong_factory(ctx: RewardContext) -> RewardFn:
    """``soft_overlong`` with ``rewards.overlong_buffer`` up to ``rewards.overlong_max_length``, else up to the
    context's ``max_completion_length`` (train.max_completion_length)."""
    max_len = ctx.rewards.overlong_max_length or ctx.max_completion_length
    if max_len is None:
        raise KeyError("reward 'soft_overlong' needs rewards.overlong_max_length or train.max_completion_length")
    return make_soft_overlong(max_len, ctx.rewards.overlong_buffer)
