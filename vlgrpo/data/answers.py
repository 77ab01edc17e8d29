"""Strict answer normalisation, shared by the rewards and the evaluation.

Strict on purpose: loose matching (substring, "contains the answer") is what a policy learns to game, e.g.
answering "red blue green yellow" to every colour question. Two answers match only when their normalised
forms are *equal*:

    normalize_answer("  The Red. ") == "red"
    normalize_answer("Two")         == "2"
    normalize_answer("red circle")  == "red circle"    # != "red": no substring matching
    normalize_answer("2 or 3")      == "2 or 3"        # != "2"
"""
from __future__ import annotations

import re

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty")
WORD_TO_DIGIT = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}

# Only whole-answer variants of yes/no; "yes it is" stays as it is (it is not a one-word answer).
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_ARTICLES = ("the ", "a ", "an ")
_TRAILING = ".,!?;:'\"`)]} \t\n"
_LEADING = "'\"`([{ \t\n"


def number_word(n: int) -> str:
    """``2 -> "two"``; numbers above twenty stay digits."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def normalize_answer(text: str | None) -> str:
    """Lowercase, trim, drop trailing punctuation and one leading article, map number words and yes/no.

    Whitespace inside the answer is collapsed to single spaces; nothing else is removed, so a longer
    answer never normalises to a shorter correct one.
    """
    if text is None:
        return ""
    s = re.sub(r"\s+", " ", str(text).lower()).strip()
    s = s.strip(_TRAILING).lstrip(_LEADING)
    for art in _ARTICLES:
        if s.startswith(art):
            s = s[len(art):].lstrip()
            break
    s = s.strip(_TRAILING)
    if s in WORD_TO_DIGIT:
        return WORD_TO_DIGIT[s]
    if re.fullmatch(r"[+]?0*\d+", s):  # "02" and "+2" are 2
        return str(int(s.lstrip("+")))
    if s in _YES:
        return "yes"
    if s in _NO:
        return "no"
    return s


def answers_match(prediction: str | None, solution: str | None) -> bool:
    """Exact equality after :func:`normalize_answer`; an empty solution never matches."""
    gold = normalize_answer(solution)
    return bool(gold) and normalize_answer(prediction) == gold
