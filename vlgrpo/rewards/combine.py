"""Scoring a batch: every weighted reward on every completion, values checked, combined into one total.

``total_i = sum_k w_k r_ki`` over the rewards that apply to item i: ``None`` means "not applicable" (e.g.
``accuracy`` on a caption) and is left out of the sum.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from vlgrpo.rewards.calling import (Reward, RewardBindingError, RewardState, call_concurrently, item_args)
from vlgrpo.rewards.registry import RewardError, get_reward

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


def _fallback(name: str, r: Reward, args: Mapping[str, Any], columns: Mapping[str, Any], n: int,
              on_error: str, first: BaseException) -> list[float | None]:
    # The batch call failed: score item by item to name the culprit (and, for "skip", keep the rest).
    # Batch-level statistics (e.g. CIDEr's document frequencies) are then per item: a degraded fallback.
    out: list[float | None] = []
    for i in range(n):
        try:
            out += _check_values(name, r.call(item_args(args, i)), 1, {"id": [_item_id(columns, i)]})
        except (RewardError, RewardBindingError):
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


def _result(name: str, r: Reward, got: Any, args: Mapping[str, Any], columns: Mapping[str, Any], n: int,
            on_error: str) -> list[float | None]:
    """A batch result (or the exception the batch call raised) checked, or re-scored item by item."""
    if isinstance(got, (RewardError, RewardBindingError)):
        raise got
    if not isinstance(got, BaseException):
        return _check_values(name, got, n, columns)
    if not isinstance(got, Exception):
        raise got
    return _fallback(name, r, args, columns, n, on_error, got)


def bind_all(fns: Mapping[str, Any], names: Iterable[str], available: Iterable[str]) -> dict[str, Reward]:
    """Every reward of ``names`` as a bound :class:`Reward` (prebuilt ones kept; plain functions, or names
    not in ``fns`` built from the registry, bound to ``available``)."""
    available = list(available)
    out: dict[str, Reward] = {}
    for name in names:
        fn = fns[name] if name in fns else get_reward(name)
        out[name] = fn if isinstance(fn, Reward) else Reward(name, fn, available)
    return out


def compute_rewards(names_weights: Mapping[str, float], prompts: Sequence[Any], completions: Sequence[str],
                    columns: Mapping[str, Sequence[Any]], on_error: str = "raise",
                    rewards: Mapping[str, Any] | None = None, *,
                    trainer_state: RewardState | None = None) -> RewardBatch:
    """Score every completion with every weighted reward and combine them.

    Each reward is called by keyword (:mod:`~vlgrpo.rewards.calling`) with ``prompts``, ``completions``,
    ``trainer_state`` (default ``RewardState()``) and every column; ``columns``: per-completion lists (all
    of length ``len(completions)``; ``completion_ids``, the token ids of each completion, is one of them
    where the caller has them). ``rewards``: prebuilt rewards (from
    :func:`~vlgrpo.rewards.setup.setup_rewards`); names not in it are built from the registry with the
    default configuration. Async rewards run concurrently (``rewards.max_concurrency`` at a time).
    ``on_error="raise"``: a reward that raises gives :class:`RewardError` naming the reward and item;
    ``"skip"``: that item scores None and the others are still scored. A NaN/inf score or a wrong-length
    result is always a RewardError: it is a bug in the reward, not a property of one item; so is a reward
    whose parameters match no argument (RewardBindingError), whatever ``on_error`` says.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} values for {n} completions")
    args: dict[str, Any] = {**columns, "prompts": list(prompts), "completions": list(completions),
                            "trainer_state": trainer_state if trainer_state is not None else RewardState()}
    bound = bind_all(dict(rewards or {}), names_weights, args)
    got: dict[str, Any] = {}
    for name, r in bound.items():
        if not r.is_async:
            try:
                got[name] = r.call(args)
            except Exception as e:  # noqa: BLE001 - checked (and narrowed to items) by _result
                got[name] = e
    async_names = [name for name, r in bound.items() if r.is_async]
    if async_names:
        limit = min(bound[k].max_concurrency for k in async_names)
        got.update(zip(async_names, call_concurrently([bound[k] for k in async_names], args, limit)))
    per = {name: _result(name, bound[name], got[name], args, columns, n, on_error) for name in names_weights}
    return RewardBatch(per, combine(per, names_weights))
