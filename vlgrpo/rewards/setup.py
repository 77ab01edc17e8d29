"""The one reward set-up of training, in-training evaluation, the pilot and the evaluate stage."""
from __future__ import annotations

from typing import Iterable

from vlgrpo.io import under_root
from vlgrpo.rewards.learned import learned_reward
from vlgrpo.rewards.registry import REWARDS, RewardContext, RewardFn, get_factory, load_plugins


def setup_rewards(names: Iterable[str], ctx: RewardContext) -> dict[str, RewardFn]:
    """Load the plugin files of ``ctx.rewards.plugins``, then build every reward of ``names`` for ``ctx``.

    A name in ``rewards.models`` is that learned reward model; every other name is built by its registered
    factory. Plugin files, ``clip_model`` and ``models`` are taken relative to the project root
    (``ctx.root``, never the current directory, so a stage runs the same from any folder); the ``images``
    column a reward reads is relative to ``ctx.manifest_dir``, like the manifest's own image paths.
    Unknown names raise KeyError listing the registered ones, before any reward is built.
    """
    load_plugins([under_root(ctx.root, p) for p in ctx.rewards.plugins])
    names = list(names)
    models = ctx.rewards.models
    for name in names:
        if name in models and name in REWARDS:
            raise KeyError(f"rewards.models.{name}: {name!r} is already a registered reward; pick another name")
    factories = {n: get_factory(n) for n in names if n not in models}
    return {n: learned_reward(n, ctx) if n in models else factories[n](ctx) for n in names}
