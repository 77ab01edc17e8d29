"""How every reward is called: by keyword, bound to its parameters once at set-up.

A reward gets named arguments only - ``prompts``, ``completions``, ``completion_ids``, ``trainer_state``
and every per-completion column (``id``, ``task``, ``solution``, ``references``, ``scene``, ``images``,
``terminated``, ``completion_length`` and the manifest's extra columns) - so a function binds by name
whatever the order of its parameters (TRL's convention). A function without ``**kwargs`` gets only the
arguments it names; a parameter without a default that matches no argument is a :class:`RewardBindingError`
at set-up, before any step runs. ms-swift ORM objects are called as ms-swift calls them: the completions
first (whatever that parameter is called), everything else by keyword, plus ``messages`` (the prompt and
the completion as one conversation). ``async`` rewards are awaited; those of one batch run concurrently.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

CORE_ARGS = ("prompts", "completions", "completion_ids", "trainer_state")
STANDARD_COLUMNS = ("id", "task", "solution", "references", "scene", "images", "terminated", "completion_length")
SWIFT_ARGS = ("messages",)
COMPLETION_FORMATS = ("text", "conversational")
STYLES = ("keyword", "swift")
NOT_PER_ITEM = ("trainer_state",)     # arguments that are one value for the batch, not one per completion


class RewardBindingError(TypeError):
    """A reward's parameters do not fit the arguments rewards are called with; names the reward."""


@dataclasses.dataclass(frozen=True)
class RewardState:
    """``trainer_state``: where the run is when a reward is called (TRL's ``TrainerState`` fields of that name).

    ``global_step``: optimizer steps done before this batch (0 in the first training step; evaluation after
    step k sees k); ``max_steps``: the run's ``train.max_steps`` (None outside a run).
    """
    global_step: int = 0
    max_steps: int | None = None


def reward_prompt(item: Any) -> str:
    """The prompt every reward sees for a manifest item, in training and in evaluation alike: the question
    without image tags (``Item.text``); the images themselves are the ``images`` column."""
    return item.text


def is_async_callable(fn: Any) -> bool:
    """Does calling ``fn`` return a coroutine (an ``async def``, a partial of one, an object with ``async
    __call__``)?"""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _signature(name: str, fn: Callable) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardBindingError(f"reward {name!r}: cannot read the parameters of {fn!r}: {e}") from None


class Reward:
    """A reward function bound at set-up: how to call it and what it is given.

    ``available``: the argument names a call will provide (:data:`CORE_ARGS`, the columns); ``style``:
    ``keyword`` (vlgrpo and TRL) or ``swift`` (an ms-swift ORM: completions first, positionally);
    ``completion_format``: ``conversational`` hands TRL-style functions ``prompts`` / ``completions`` as
    message lists (``[{"role": "assistant", "content": text}]``) instead of strings; ``max_concurrency``:
    how many async rewards of a batch may run at once (``rewards.max_concurrency``).
    """

    def __init__(self, name: str, fn: Callable, available: Iterable[str], style: str = "keyword",
                 completion_format: str = "text", max_concurrency: int = 8):
        if style not in STYLES:
            raise ValueError(f"reward {name!r}: call style must be one of {STYLES}, got {style!r}")
        if completion_format not in COMPLETION_FORMATS:
            raise ValueError(f"rewards.completion_format must be one of {COMPLETION_FORMATS}, got "
                             f"{completion_format!r}")
        self.name, self.fn, self.style, self.completion_format = name, fn, style, completion_format
        self.max_concurrency = max_concurrency
        self.is_async = is_async_callable(fn)
        params = list(_signature(name, fn).parameters.values())
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        if style == "swift":
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if not positional:
                raise RewardBindingError(f"reward {name!r}: an ms-swift ORM's __call__ takes the completions "
                                         f"as its first parameter; {fn!r} has none")
            params = [p for p in params if p is not positional[0]]
            available = [*available, *SWIFT_ARGS]
        bad = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
        if bad:
            raise RewardBindingError(f"reward {name!r}: positional-only parameter(s) {', '.join(bad)}; rewards "
                                     f"are called by keyword")
        self.params = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.required = [p.name for p in params
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]
        self.available = tuple(dict.fromkeys(available))
        missing = [p for p in self.required if p not in self.available]
        if missing:
            raise RewardBindingError(
                f"reward {name!r}: parameter(s) {', '.join(missing)} match no argument rewards are called with; "
                f"available: {', '.join(self.available)}")

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, {self.style}, {'async' if self.is_async else 'sync'})"

    def arguments(self, args: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The positional and keyword arguments of one call, from all the batch's ``args``."""
        args = dict(args)
        if self.style == "swift":
            args["messages"] = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                for p, c in zip(args["prompts"], args["completions"])]
        elif self.completion_format == "conversational":
            args["prompts"] = [[{"role": "user", "content": p}] for p in args["prompts"]]
            args["completions"] = [[{"role": "assistant", "content": c}] for c in args["completions"]]
        missing = [p for p in self.required if p not in args]
        if missing:        # set-up checked the names it knew; a caller passed fewer columns
            raise RewardBindingError(f"reward {self.name!r}: no argument {', '.join(missing)} in this batch; "
                                     f"given: {', '.join(args)}")
        kw = args if self.takes_all else {k: v for k, v in args.items() if k in self.params}
        if self.style == "swift":
            kw = dict(kw)
            return (args["completions"],), {k: v for k, v in kw.items() if k != "completions"}
        return (), kw

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The underlying function called directly (awaited when async)."""
        out = self.fn(*args, **kwargs)
        return run_coroutine(out) if self.is_async else out

    def call(self, args: Mapping[str, Any]) -> Any:
        """Score one batch (awaited here when the reward is async)."""
        pos, kw = self.arguments(args)
        if self.is_async:
            return run_coroutine(self.fn(*pos, **kw))
        return self.fn(*pos, **kw)


def item_args(args: Mapping[str, Any], i: int) -> dict[str, Any]:
    """The arguments of item ``i`` alone (one-element lists; batch-wide values unchanged)."""
    return {k: (v if k in NOT_PER_ITEM else [v[i]]) for k, v in args.items()}


def run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion from synchronous code, also when this thread already runs an event loop
    (then on a fresh loop in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def call_concurrently(rewards: Sequence[Reward], args: Mapping[str, Any], limit: int) -> list[Any]:
    """Call the async ``rewards`` on one batch concurrently, at most ``limit`` at a time; each result is the
    reward's value or the exception it raised."""
    if limit < 1:
        raise ValueError(f"rewards.max_concurrency must be >= 1, got {limit}")

    async def main() -> list[Any]:
        gate = asyncio.Semaphore(limit)

        async def one(r: Reward) -> Any:
            async with gate:
                pos, kw = r.arguments(args)
                return await r.fn(*pos, **kw)

        return await asyncio.gather(*(one(r) for r in rewards), return_exceptions=True)

    return run_coroutine(main())
