"""Remote rewards: an HTTP scoring endpoint (``rewards.remote``) and an OpenAI-compatible judge
(``rewards.judges``: any server speaking the chat completions API, e.g. ``vllm serve``).

Both are ``async`` rewards: the requests of a batch run concurrently, at most ``rewards.max_concurrency`` at a
time; each request has ``rewards.remote_timeout`` seconds and is retried ``rewards.remote_retries`` times;
a request that still fails raises an error naming the reward, the URL and the reason (``rewards.on_error:
skip`` then scores the batch's items one by one and those that still fail None).

Scoring endpoint protocol: ``POST <url>`` with JSON ``{"prompts": [...], "completions": [...], <every
JSON-serialisable column>}``, answered with ``{"rewards": [float | null, ...]}`` (one per completion).
"""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any, Sequence

from vlgrpo.rewards.learned import JUDGE_TEMPLATE
from vlgrpo.rewards.registry import RewardContext, RewardError, RewardFn


class RemoteRewardError(RuntimeError):
    """A remote reward's request failed after its retries (``rewards.on_error`` applies, like any failure of a
    reward on its items)."""


def _post(url: str, payload: Any | None, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if data is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


async def request(name: str, url: str, payload: Any | None, timeout: float, retries: int) -> Any:
    """The JSON answer of ``url`` (POST ``payload``; GET when None), retried; RemoteRewardError when it fails."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return await asyncio.to_thread(_post, url, payload, timeout)
        except (OSError, ValueError) as e:        # connection, timeout, HTTP status, bad JSON
            last = e
            if attempt < retries:
                await asyncio.sleep(min(0.1 * 2 ** attempt, 2.0))
    detail = f"HTTP {last.code}" if isinstance(last, urllib.error.HTTPError) else f"{type(last).__name__}: {last}"
    raise RemoteRewardError(f"reward {name!r}: {url} failed after {retries + 1} tries: {detail}")


def _jsonable(columns: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in columns.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue                               # e.g. trainer_state: not sent
        out[k] = v
    return out


def make_remote_reward(name: str, url: str, timeout: float = 30.0, retries: int = 2) -> RewardFn:
    """Reward ``name`` scored by the HTTP endpoint ``url`` (one request per batch; see the module docstring)."""

    async def remote(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list:
        payload = {"prompts": list(prompts), "completions": list(completions), **_jsonable(columns)}
        got = await request(name, url, payload, timeout, retries)
        values = got.get("rewards") if isinstance(got, dict) else None
        if not isinstance(values, list):
            raise RewardError(f"reward {name!r}: {url} answered {str(got)[:200]!r}, not {{\"rewards\": [...]}}")
        return values

    remote.__name__ = remote.__qualname__ = name
    return remote


def judge_score(text: str) -> float:
    """1.0 when the judge's answer starts with yes, else 0.0."""
    return float(text.strip().lower().lstrip("\"'*").startswith("yes"))


def make_openai_judge(name: str, base_url: str, model: str | None = None, timeout: float = 30.0,
                      retries: int = 2, max_concurrency: int = 8) -> RewardFn:
    """Reward ``name``: an OpenAI-compatible server (``base_url``, e.g. ``http://127.0.0.1:8000/v1``) is asked
    ``JUDGE_TEMPLATE`` per completion (greedy, a few tokens); 1.0 when it answers yes. ``model``: the model
    name to send (None: the first of ``GET {base_url}/models``, asked once)."""
    base = base_url.rstrip("/")
    chosen: list[str] = [model] if model else []

    async def judge(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        if not chosen:
            listed = await request(name, f"{base}/models", None, timeout, retries)
            try:
                chosen.append(listed["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise RewardError(f"reward {name!r}: {base}/models lists no model; set rewards.judge_model")
        gate = asyncio.Semaphore(max_concurrency)

        async def one(p: str, c: str) -> float:
            body = {"model": chosen[0], "temperature": 0.0, "max_tokens": 4,
                    "messages": [{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=p, completion=c)}]}
            async with gate:
                got = await request(name, f"{base}/chat/completions", body, timeout, retries)
            try:
                return judge_score(got["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                raise RewardError(f"reward {name!r}: {base}/chat/completions answered {str(got)[:200]!r}")

        return list(await asyncio.gather(*(one(p, c) for p, c in zip(prompts, completions))))

    judge.__name__ = judge.__qualname__ = name
    return judge


def remote_reward(name: str, ctx: RewardContext) -> RewardFn:
    """The remote reward ``name`` of ``rewards.remote`` or ``rewards.judges``."""
    rc = ctx.rewards
    if name in rc.judges:
        return make_openai_judge(name, rc.judges[name], rc.judge_model, rc.remote_timeout, rc.remote_retries,
                                 rc.max_concurrency)
    return make_remote_reward(name, rc.remote[name], rc.remote_timeout, rc.remote_retries)
