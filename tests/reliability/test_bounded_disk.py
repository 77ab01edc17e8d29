"""Bounded disk: `train.save_total_limit` keeps only the newest N checkpoints (plus, with
`train.keep_best_checkpoint`, the one of the highest-reward step); the deleted ones never break resume, and
a run killed and resumed under the limit still ends with the weights and metrics of an undisturbed run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.reliability.slow_training import add_slow_reward
from tests.reliability.test_killed_training import _assert_equal_to_reference, _train_in_process
from tests.reliability.test_killed_training import reference  # noqa: F401  (the undisturbed run, a fixture)
from vlgrpo.train.checkpoint import CHECKPOINT_DIR, STATE_FILE, complete_checkpoints, rotate_checkpoints

pytestmark = pytest.mark.reliability


def _names(out: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(out)]


def test_save_total_limit_keeps_the_newest_checkpoints_and_resume_stays_exact(project, reference):  # noqa: F811
    # A checkpoint every step, at most 2 kept: the disk holds 2 checkpoints however long the run. The rewards
    # are the reference run's (with the slow reward, which scores 0).
    add_slow_reward(project, train={"save_steps": 1, "save_total_limit": 2})
    out = project / "models/candidate"
    s = _train_in_process(project, "models/candidate", "reports/train_metrics.jsonl", stop_after=3)
    assert s["steps"] == 3 and _names(out) == ["step-3", "step-2"]
    one = sum(f.stat().st_size for f in (out / CHECKPOINT_DIR / "step-3").iterdir())
    held = sum(f.stat().st_size for f in (out / CHECKPOINT_DIR).rglob("*") if f.is_file())
    assert held < 2 * one + 4096              # two checkpoints (their state files differ by a few bytes)

    s = _train_in_process(project, "models/candidate", "reports/train_metrics.jsonl")     # resumes at 3
    assert s["resumed_from"] == 3 and s["finished"]
    assert _names(out) == ["step-4", "step-3"]
    _assert_equal_to_reference(reference, project / "reports/train_metrics.jsonl", out / "model.safetensors")
    # Each checkpoint records its step's mean reward, for keep_best_checkpoint.
    rewards = {json.loads(x)["step"]: json.loads(x)["reward"]
               for x in (project / "reports/train_metrics.jsonl").read_text().splitlines()}
    for p in complete_checkpoints(out):
        assert json.loads((p / STATE_FILE).read_text())["reward"] == rewards[int(p.name[5:])]


def _fake_checkpoints(out: Path, rewards: dict[int, float | None]) -> None:
    for step, reward in rewards.items():
        d = out / CHECKPOINT_DIR / f"step-{step}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_text(json.dumps({"step": step, "reward": reward}))
        torch.save({"w": torch.zeros(4)}, d / "optimizer.pt")


@pytest.mark.parametrize("keep_best, kept", [
    (False, ["step-5", "step-4"]),
    (True, ["step-5", "step-4", "step-2"]),       # step-2 had the highest reward
])
def test_rotation_keeps_newest_n_and_the_best(tmp_path, keep_best, kept):
    out = tmp_path / "candidate"
    _fake_checkpoints(out, {1: 0.1, 2: 0.9, 3: 0.2, 4: None, 5: 0.4})
    partial = out / CHECKPOINT_DIR / ".step-6.x.tmp"                # a killed writer's leftover: not counted
    partial.mkdir()
    gone = rotate_checkpoints(out, 2, keep_best)
    assert _names(out) == kept
    assert sorted(p.name for p in gone) == sorted({"step-1", "step-2", "step-3"} - set(kept))
    assert partial.is_dir()
    assert rotate_checkpoints(out, None, keep_best) == []                          # None: keep all


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    # A higher-numbered leftover (another run's, or unreadable) must not push out the one just saved.
    out = tmp_path / "candidate"
    _fake_checkpoints(out, {8: 0.0, 2: 0.0, 4: 0.0})
    rotate_checkpoints(out, 1, False, current=out / CHECKPOINT_DIR / "step-4")
    assert _names(out) == ["step-8", "step-4"]
