"""Rewards written for other frameworks run unchanged: ms-swift ORM plugin files (4.x and 3.x, sync and async)
and TRL reward functions (every signature TRL allows), each scoring what it scores at home.

TRL is installed: its own ``GRPOTrainer._calculate_rewards`` scores the same inputs as the oracle. ms-swift
cannot be installed beside vlgrpo; its plugin files are written as its documentation shows and scored against
the call ms-swift makes, ``orm_class()(completions, **columns)``.
"""
from __future__ import annotations

import collections
import math
import sys
import textwrap
import types

import pytest
import torch

from vlgrpo import rewards as R
from vlgrpo.config import RewardsConfig
from vlgrpo.rewards import registry

SWIFT4 = textwrap.dedent('''
    import asyncio
    from swift.rewards import ORM, AsyncORM, orms

    class ExactMatch(ORM):
        instances = 0

        def __init__(self, args=None, **kwargs):
            super().__init__(args, **kwargs)
            ExactMatch.instances += 1

        def __call__(self, completions, solution, **kwargs):
            return [float(c.strip().lower() == s.lower()) for c, s in zip(completions, solution)]

    class AsyncShort(AsyncORM):
        async def __call__(self, completions, **kwargs):
            await asyncio.sleep(0)
            return [1.0 / (1 + len(c.split())) for c in completions]

    orms["swift4_exact"] = ExactMatch
    orms["swift4_short"] = AsyncShort
''')

SWIFT3 = textwrap.dedent('''
    from swift.plugin import ORM, orms

    class LastTurn(ORM):
        # ms-swift hands the conversation as "messages"; the completion is its last turn
        def __call__(self, completions, **kwargs):
            return [float(m[-1]["content"] == c) + 0.5 * (t == "color")
                    for c, m, t in zip(completions, kwargs["messages"], kwargs["task"])]

    orms["swift3_last_turn"] = LastTurn
''')

TRL = textwrap.dedent('''
    import asyncio

    def trl_plain(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def trl_solution(completions, solution, **kwargs):
        return [float(c == s) for c, s in zip(completions, solution)]

    def trl_answer(completions, answer, **kw):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    def trl_prompts(prompts, completions, **kwargs):
        return [float(len(p) - len(c)) for p, c in zip(prompts, completions)]

    def trl_state(completions, **kwargs):
        return [kwargs["trainer_state"].global_step + 0.1 * len(c) for c in completions]

    def trl_ids(completions, completion_ids, **kwargs):
        return [float(sum(ids) % 7) for ids in completion_ids]

    def trl_maybe(completions, solution, **kwargs):
        return [None if not s else float(c == s) for c, s in zip(completions, solution)]

    async def trl_async(completions, solution, **kwargs):
        await asyncio.sleep(0.01)
        return [float(s in c) for c, s in zip(completions, solution)]

    def _helper(text):          # private: not a reward
        return text
''')

TRL_CONV = textwrap.dedent('''
    def trl_conv(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    async def trl_conv_async(prompts, completions, **kwargs):
        return [float(p[-1]["content"].endswith("?")) + len(c[0]["content"].split())
                for p, c in zip(prompts, completions)]
''')

PROMPTS = ["What colour is the circle?", "How many squares are there?", "Is there a triangle?"]
COMPLETIONS = ["red", "two squares", "yes"]
COLUMNS = {"id": ["a", "b", "c"], "task": ["color", "count", "exists"], "solution": ["red", "2", ""],
           "answer": ["red", "2", "yes"], "terminated": [True, True, False], "completion_length": [2, 3, 2],
           "completion_ids": [[5, 9], [3, 4, 8], [11, 2]]}


def setup(tmp_path, files: dict[str, str], names, **rewards_cfg):
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    cfg = RewardsConfig(plugins=tuple(files), **rewards_cfg)
    return R.setup_rewards(names, R.RewardContext(cfg, tmp_path, columns=("answer",)))


def plugin_module(name: str) -> types.ModuleType:
    """The module a plugin file was loaded as (to call its objects the way their home framework does)."""
    return sys.modules[registry.REWARDS[name].__module__]


def test_swift_plugin_files_4x_and_3x_sync_and_async(tmp_path, restore_registry):
    names = ["swift4_exact", "swift4_short", "swift3_last_turn"]
    fns = setup(tmp_path, {"swift4.py": SWIFT4, "swift3.py": SWIFT3}, names)
    assert "swift" not in sys.modules            # the stand-in exists only while a plugin file loads
    assert [fns[n].style for n in names] == ["swift"] * 3 and fns["swift4_short"].is_async
    state = R.RewardState(global_step=4, max_steps=10)
    out = R.compute_rewards({n: 1.0 for n in names}, PROMPTS, COMPLETIONS, COLUMNS, rewards=fns,
                            trainer_state=state)
    assert out.per_reward["swift4_exact"] == [1.0, 0.0, 0.0]
    assert out.per_reward["swift4_short"] == [0.5, 1 / 3, 0.5]
    assert out.per_reward["swift3_last_turn"] == [1.5, 1.0, 1.0]
    # what ms-swift computes: the class instantiated, called with the completions first and the columns as keywords
    kwargs = {**COLUMNS, "trainer_state": state,
              "messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                           for p, c in zip(PROMPTS, COMPLETIONS)]}
    m4, m3 = plugin_module("swift4_exact"), plugin_module("swift3_last_turn")
    assert m4.ExactMatch()(COMPLETIONS, **kwargs) == out.per_reward["swift4_exact"]
    assert R.calling.run_coroutine(m4.AsyncShort()(COMPLETIONS, **kwargs)) == out.per_reward["swift4_short"]
    assert m3.LastTurn()(COMPLETIONS, **kwargs) == out.per_reward["swift3_last_turn"]


def test_a_swift_orm_is_instantiated_once_per_set_up(tmp_path, restore_registry):
    fns = setup(tmp_path, {"swift4.py": SWIFT4}, ["swift4_exact"])
    cls = type(fns["swift4_exact"].fn)
    for _ in range(3):
        R.compute_rewards({"swift4_exact": 1.0}, PROMPTS, COMPLETIONS, COLUMNS, rewards=fns)
    assert cls.instances == 1


def trl_oracle(funcs, prompts, completions, columns, global_step):
    """TRL's own GRPOTrainer._calculate_rewards on these inputs: (N, K) rewards, NaN for None."""
    from accelerate import Accelerator
    from transformers import TrainerState
    from trl import GRPOTrainer
    from trl.trainer.utils import shutdown_event_loop_in_daemon, start_event_loop_in_daemon

    trainer = object.__new__(GRPOTrainer)     # the real method on a trainer holding what it reads
    trainer.accelerator = Accelerator(cpu=True)
    trainer.args = types.SimpleNamespace(report_to=[])
    trainer.reward_funcs = list(funcs)
    trainer.reward_func_names = [f.__name__ for f in funcs]
    trainer.reward_processing_classes = [None] * len(funcs)
    trainer.state = TrainerState(global_step=global_step)
    trainer._pending_extra_logs = collections.defaultdict(list)
    trainer._pending_metrics = collections.defaultdict(list)
    trainer.environments = None
    thread, trainer.async_loop, ready = start_event_loop_in_daemon(name="oracle-loop")
    ready.wait()
    try:
        cols = {k: v for k, v in columns.items() if k != "completion_ids"}
        inputs = [{"prompt": p, **{k: v[i] for k, v in cols.items()}} for i, p in enumerate(prompts)]
        return trainer._calculate_rewards(inputs, prompts, completions, columns["completion_ids"])
    finally:
        shutdown_event_loop_in_daemon(thread, trainer.async_loop)


def as_tensor(per_reward, names):
    return torch.tensor([[math.nan if v is None else v for v in per_reward[n]] for n in names]).T


def test_trl_functions_score_what_trls_grpo_trainer_scores(tmp_path, restore_registry):
    names = ["trl_plain", "trl_solution", "trl_answer", "trl_prompts", "trl_state", "trl_ids", "trl_maybe",
             "trl_async"]
    fns = setup(tmp_path, {"trl_rewards.py": TRL}, names)
    assert "_helper" not in registry.REWARDS and fns["trl_async"].is_async
    ours = R.compute_rewards({n: 1.0 for n in names}, PROMPTS, COMPLETIONS, COLUMNS, rewards=fns,
                             trainer_state=R.RewardState(global_step=3))
    module = plugin_module("trl_plain")
    theirs = trl_oracle([getattr(module, n) for n in names], PROMPTS, COMPLETIONS, COLUMNS, 3)
    torch.testing.assert_close(as_tensor(ours.per_reward, names), theirs, equal_nan=True, rtol=0, atol=0)
    # the answer-before-**kwargs signature scores the completions against the answers, not the prompts
    assert ours.per_reward["trl_answer"] == [1.0, 0.0, 1.0]


def test_trl_conversational_functions(tmp_path, restore_registry):
    names = ["trl_conv", "trl_conv_async"]
    fns = setup(tmp_path, {"trl_conv.py": TRL_CONV}, names, completion_format="conversational")
    ours = R.compute_rewards({n: 1.0 for n in names}, PROMPTS, COMPLETIONS, COLUMNS, rewards=fns)
    module = plugin_module("trl_conv")
    theirs = trl_oracle([getattr(module, n) for n in names], [[{"role": "user", "content": p}] for p in PROMPTS],
                        [[{"role": "assistant", "content": c}] for c in COMPLETIONS], COLUMNS, 0)
    torch.testing.assert_close(as_tensor(ours.per_reward, names), theirs, rtol=0, atol=0)
    assert ours.per_reward["trl_conv"] == [3.0, 11.0, 3.0]
    # the built-ins keep getting text whatever the plugins' format
    both = setup(tmp_path, {"trl_conv.py": TRL_CONV}, ["trl_conv", "accuracy"], completion_format="conversational")
    assert R.compute_rewards({"accuracy": 1.0}, PROMPTS, COMPLETIONS, COLUMNS, rewards=both
                             ).per_reward["accuracy"] == [1.0, 0.0, None]


def test_a_parameter_that_matches_nothing_fails_at_set_up(tmp_path, restore_registry):
    bad = "def needs_gold(completions, gold_label, **kwargs):\n    return [0.0] * len(completions)\n"
    with pytest.raises(R.RewardBindingError, match=r"reward 'needs_gold': parameter\(s\) gold_label match no "
                                                    r"argument.*available: prompts, completions, .*answer"):
        setup(tmp_path, {"bad.py": bad}, ["needs_gold"])
    # whatever on_error says: an incompatible reward never silently scores None
    with pytest.raises(R.RewardBindingError):
        setup(tmp_path, {"bad.py": bad}, ["needs_gold"], on_error="skip")
    # the old positional style names parameters that are no argument: the error says so
    (tmp_path / "old.py").write_text("from vlgrpo.rewards import register\n@register('old_style')\n"
                                     "def old_style(p, c, **k):\n    return [0.0] * len(c)\n")
    with pytest.raises(R.RewardBindingError, match=r"'old_style': parameter\(s\) p, c"):
        R.setup_rewards(["old_style"], R.RewardContext(RewardsConfig(plugins=("old.py",)), tmp_path))


def test_a_plugin_function_named_like_a_built_in_is_an_error_when_used(tmp_path, restore_registry):
    (tmp_path / "clash.py").write_text("def accuracy(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    with pytest.raises(KeyError, match=r"clash\.py defines a function 'accuracy'"):
        R.setup_rewards(["accuracy"], R.RewardContext(RewardsConfig(plugins=("clash.py",)), tmp_path))


def test_async_rewards_of_one_batch_run_concurrently_and_bounded(tmp_path, restore_registry):
    src = textwrap.dedent('''
        import asyncio
        RUNNING = {"now": 0, "max": 0}

        async def _track(completions):
            RUNNING["now"] += 1
            RUNNING["max"] = max(RUNNING["max"], RUNNING["now"])
            await asyncio.sleep(0.02)
            RUNNING["now"] -= 1
            return [1.0] * len(completions)
    ''') + "".join(f"async def slow_{i}(completions, **kwargs):\n    return await _track(completions)\n"
                   for i in range(4))
    names = [f"slow_{i}" for i in range(4)]
    for limit, expected in ((2, 2), (8, 4)):
        fns = setup(tmp_path, {"slow.py": src}, names, max_concurrency=limit)
        running = plugin_module("slow_0").RUNNING
        assert R.compute_rewards({n: 1.0 for n in names}, PROMPTS, COMPLETIONS, COLUMNS, rewards=fns).total == [4.0] * 3
        assert running["max"] == expected


def test_training_with_an_unbindable_reward_fails_before_any_model_is_loaded(tmp_path, restore_registry):
    from tests.settings import tuned_config
    from vlgrpo.data.manifest import Item, write_manifest
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths

    (tmp_path / "bad.py").write_text("def needs_gold(completions, gold_label, **kwargs):\n    return [0.0]\n")
    write_manifest(tmp_path / "manifest.jsonl", [Item("a", "train", "color", "<image>Colour?", ["a.png"], "red")])
    cfg = tuned_config({"rewards": {"weights": {"needs_gold": 1.0}, "plugins": ["bad.py"]}})
    # there is no model folder at all: the reward's error comes first, before any loading
    with pytest.raises(R.RewardBindingError, match="'needs_gold': parameter\\(s\\) gold_label"):
        train_grpo(cfg, RunPaths.under(tmp_path, "manifest.jsonl", "models/none", "out", "m.jsonl"), progress=False)
