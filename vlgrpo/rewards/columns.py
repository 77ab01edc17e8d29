"""Reading the per-completion ``columns`` a reward gets (shared by the built-ins)."""
from __future__ import annotations

from typing import Any, Mapping

VERIFIABLE_TASKS = ("count", "color", "shape", "exists")
MAX_SHORT_ANSWER_WORDS = 3


def column(columns: Mapping[str, Any], key: str, n: int) -> list[Any]:
    """Column ``key`` as a list of ``n`` values; all None when the batch has no such column."""
    return list(columns.get(key) or [None] * n)


def present(columns: Mapping[str, Any], key: str, n: int) -> tuple[list[Any], list[int]]:
    """Column ``key`` (as :func:`column`) and the indices of the completions whose value is set: a reward
    that needs the column scores those and leaves the others None."""
    values = column(columns, key, n)
    return values, [i for i, v in enumerate(values) if v]


def terminated(columns: Mapping[str, Any], n: int) -> list[bool]:
    """The ``terminated`` column (finished with EOS, not cut at the length limit)."""
    # Without the column (e.g. scoring stored texts) every completion is taken as finished.
    return list(columns.get("terminated") or [True] * n)


def words(text: str) -> list[str]:
    return text.split()


def is_short_answer_item(task: Any, solution: Any) -> bool:
    """An item answered in a few words (a verifiable task, or any item with a solution), not free text."""
    return task in VERIFIABLE_TASKS or bool(solution)
