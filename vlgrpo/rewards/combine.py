"""Scoring a batch: every weighted reward on every completion, values checked, combined into one total.

``total_i = sum_k w_k r_ki`` over the rewards that apply to item i: ``None`` means "not applicable" (e.g.
``accuracy`` on a caption) and is left out of the sum.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

from vlgrpo.rewards.registry import RewardError, RewardFn, get_reward

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
    (from :func:`~vlgrpo.rewards.setup.setup_rewards`); names not in it are built from the registry with
    the default configuration. ``on_error="raise"``: a reward that raises gives :class:`RewardError` naming
    the reward and item; ``"skip"``: that item scores None and the others are still scored. A NaN/inf
    score or a wrong-length result is always a RewardError: it is a bug in the reward, not a property of
    one item.
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
