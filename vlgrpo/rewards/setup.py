"""The one reward set-up of training, in-training evaluation, the pilot and the evaluate stage."""
from __future__ import annotations

from typing import Iterable

from vlgrpo.io import under_root
from vlgrpo.rewards import foreign
from vlgrpo.rewards.calling import CORE_ARGS, STANDARD_COLUMNS, Reward
from vlgrpo.rewards.learned import learned_reward
from vlgrpo.rewards.remote import remote_reward
from vlgrpo.rewards.registry import REWARDS, SHADOWED, RewardContext, get_factory, is_plugin, load_plugins


def available_arguments(ctx: RewardContext) -> list[str]:
    """The argument names every reward call provides: :data:`~vlgrpo.rewards.calling.CORE_ARGS`, the standard
    columns and the manifest's extra columns (``ctx.columns``)."""
    return list(dict.fromkeys([*CORE_ARGS, *STANDARD_COLUMNS, *ctx.columns]))


def bind(name: str, fn: object, ctx: RewardContext) -> Reward:
    """``fn`` bound as reward ``name``: an ms-swift ORM in ms-swift's call style; a plugin's function in
    ``rewards.completion_format``; built-in and learned rewards with text. Raises RewardBindingError (naming the
    reward and the available arguments) when a parameter matches nothing."""
    limit = ctx.rewards.max_concurrency
    if foreign.is_orm(fn):
        return Reward(name, fn, available_arguments(ctx), style="swift", max_concurrency=limit)
    fmt = ctx.rewards.completion_format if name in REWARDS and is_plugin(name) else "text"
    return Reward(name, fn, available_arguments(ctx), completion_format=fmt, max_concurrency=limit)


def setup_rewards(names: Iterable[str], ctx: RewardContext) -> dict[str, Reward]:
    """Load the plugin files of ``ctx.rewards.plugins``, then build every reward of ``names`` for ``ctx``.

    A name in ``rewards.models`` is that learned reward model; every other name is built by its registered
    factory. Plugin files, ``clip_model`` and ``models`` are taken relative to the project root
    (``ctx.root``, never the current directory, so a stage runs the same from any folder); the ``images``
    column a reward reads is relative to ``ctx.manifest_dir``, like the manifest's own image paths.
    Unknown names raise KeyError listing the registered ones, before any reward is built. Every reward is
    bound by keyword (:mod:`~vlgrpo.rewards.calling`): a parameter that matches no argument is a
    RewardBindingError here, before any step runs.
    """
    load_plugins([under_root(ctx.root, p) for p in ctx.rewards.plugins])
    names = list(names)
    models = ctx.rewards.models
    remote = {**ctx.rewards.remote, **ctx.rewards.judges}
    for section, table in (("models", models), ("remote", ctx.rewards.remote), ("judges", ctx.rewards.judges)):
        for name in names:
            if name in table and (name in REWARDS or sum(name in t for t in (models, ctx.rewards.remote,
                                                                              ctx.rewards.judges)) > 1):
                raise KeyError(f"rewards.{section}.{name}: {name!r} is already a registered reward; pick "
                               f"another name")
    for name in names:
        if name in SHADOWED and name not in models and name not in remote:
            raise KeyError(f"reward {name!r}: plugin file {SHADOWED[name]} defines a function {name!r}, which is a "
                           f"built-in reward's name; rename the function to use it (the built-in is not replaced)")
    factories = {n: get_factory(n) for n in names if n not in models and n not in remote}

    def build(n: str) -> object:
        if n in models:
            return learned_reward(n, ctx)
        return remote_reward(n, ctx) if n in remote else factories[n](ctx)

    return {n: bind(n, build(n), ctx) for n in names}
