"""Rewards (outcome reward models): name -> ``fn(prompts, completions, **columns) -> list[float | None]``,
always called by keyword (see :mod:`.calling`; ms-swift ORM plugins and TRL reward functions work unchanged,
see docs/rewards.md).

A reward scores a batch of completions. ``columns`` are per-completion lists built from ``Item.columns()``
(``id``, ``task``, ``solution``, ``references``, ``scene``, ``images`` and the item's extra keys) plus
``terminated`` (True when the completion ended with EOS instead of hitting the length limit) and
``completion_length`` (completion tokens). ``None`` means "not applicable to this item" (e.g. ``accuracy``
on a caption); the combined reward skips it. A reward's name is its metric name everywhere (logs, reports,
MLflow).

Every caller sets rewards up one way, then scores with them::

    from vlgrpo.rewards import RewardContext, compute_rewards, setup_rewards
    fns = setup_rewards(["accuracy", "format"], RewardContext.from_config(cfg, root, manifest_dir))
    out = compute_rewards({"accuracy": 1.0, "format": 0.1}, prompts, completions, columns, rewards=fns)
    out.total, out.per_reward["accuracy"]

Writing a reward plugin: a Python file that registers functions, listed under ``rewards.plugins`` in
params.yaml (relative to the project root) and given a weight in ``rewards.weights``::

    from vlgrpo.rewards import register

    @register("brevity")
    def brevity(prompts, completions, **columns):
        return [1.0 / (1 + len(c.split())) for c in completions]

A reward that needs the configuration (a threshold, a model folder) registers a *factory* instead: it gets
the :class:`RewardContext` (the ``rewards`` section, project root, manifest folder, pixel budget, answer
length, device) and returns the reward function, which should carry the reward's name as ``__name__``::

    from vlgrpo.rewards import RewardContext, register_factory

    @register_factory("short_enough")
    def short_enough_factory(ctx: RewardContext):
        limit = (ctx.max_completion_length or 64) // 2
        def short_enough(prompts, completions, **columns):
            return [float(n <= limit) for n in columns["completion_length"]]
        return short_enough

A name belongs to one function: registering another under a taken name is an error, except that a plugin
file may replace what a plugin file registered before (the same file loaded again, or another project's run in
the same process); a built-in is never shadowed. :func:`load_plugins` imports the files; a failing file raises
:class:`PluginError` naming it and leaves none of its rewards behind.

Built in (each module registers its own): ``accuracy``, ``format``, ``iou`` (:mod:`.answers`: short and box
answers); ``fluency``, ``soft_overlong`` (:mod:`.text`); ``detail_f1``, ``reference`` (CIDEr-D)
(:mod:`.captions`); ``clip_score`` and the learned reward models of ``rewards.models`` (:mod:`.learned`).
Scoring and combining is :mod:`.combine`, the set-up :mod:`.setup`, the registry :mod:`.registry`.
"""
from __future__ import annotations

# The built-in modules register their rewards when imported.
from vlgrpo.rewards import answers, captions, learned, text  # noqa: F401
from vlgrpo.rewards.answers import BoxConvention, accuracy, box_iou, parse_box
from vlgrpo.rewards.calling import Reward, RewardBindingError, RewardState, reward_prompt
from vlgrpo.rewards.combine import RewardBatch, combine, compute_rewards
from vlgrpo.rewards.registry import (REWARDS, PluginError, RewardContext, RewardError, RewardFactory, RewardFn,
                                     extra_columns, get_reward, load_plugins, register, register_factory)
from vlgrpo.rewards.setup import setup_rewards

__all__ = ["BoxConvention", "PluginError", "REWARDS", "Reward", "RewardBatch", "RewardBindingError",
           "RewardContext", "RewardError", "RewardFactory", "RewardFn", "RewardState", "accuracy", "box_iou",
           "combine", "compute_rewards", "extra_columns", "get_reward", "load_plugins", "parse_box",
           "register", "register_factory", "reward_prompt", "setup_rewards"]
