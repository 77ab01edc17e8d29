"""Shared pieces of the tests that take a server (MLflow, PostgreSQL, Prefect) or a disk away in the middle of
training: a reward plugin that makes each step last long enough to aim at, and the check that every step of
every metric reached MLflow exactly once.
"""
from __future__ import annotations

import json
from pathlib import Path

# MLflow's own HTTP retries (up to ~4 minutes per call by default) off, so that a failed call returns at once
# and what the outage tests exercise is the project's retry layer (tasks.tracking.retry).
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# For a stage that must ride out a restart: our retries last ~7 minutes (delays capped at 30 s), since a
# loaded machine has been seen to take over 2 minutes to restart a server.
RIDE_OUT = {**FAST_FAIL, "VLGRPO_MLFLOW_RETRIES": "20"}

# Each call of the reward sleeps REL_SLOW_REWARD_S seconds (0 when unset), so a step lasts long enough for a
# fault to land between two of them. While the file named by REL_HOLD_FILE exists (at most 10 minutes) it
# waits: a test holds training still across an outage, so that the background flushes (every 5 s) meet the
# outage for certain, whatever the machine's speed. It always scores 0, so with or without the sleep the run
# computes the same numbers: a slowed run and an unslowed one of the same params are comparable bit for bit.
SLOW_PLUGIN = '''
import os
import time
from vlgrpo.rewards import register

@register("rel_slow")
def rel_slow(prompts, completions, **columns):
    time.sleep(float(os.environ.get("REL_SLOW_REWARD_S", "0")))
    hold, deadline = os.environ.get("REL_HOLD_FILE"), time.monotonic() + 600
    while hold and os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [0.0 for _ in completions]
'''
SLOW_REWARDS = {"weights": {"accuracy": 1.0, "rel_slow": 0.1}, "plugins": ["slow_plugin.py"]}
SLOW = {"REL_SLOW_REWARD_S": "1.0"}         # the environment of a stage run that should be slowed


def add_slow_reward(root: Path, **sections: dict) -> Path:
    """Write the plugin into the project ``root`` and name it in params.yaml (with ``sections`` too)."""
    from tests.reliability.conftest import update_params

    (root / "slow_plugin.py").write_text(SLOW_PLUGIN)
    update_params(root, rewards=SLOW_REWARDS, **sections)
    return root


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def sidecar_count(metrics: Path) -> int:
    """How many lines of the metrics stream the MLflow server has acknowledged (the forwarder's sidecar)."""
    for p in metrics.parent.glob(f".{metrics.name}.mlflow-*"):
        return int(p.read_text() or 0)
    return 0


def assert_each_step_once_in_mlflow(client, run_id: str, metrics: Path) -> None:
    """Every step of every numeric metric in the stream is in the MLflow run once, with the value the trainer
    wrote: none lost, none doubled. Step 0 holds the stage summary (reports/train.json), logged at most once."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    keys = {k for r in rows for k, v in r.items()
            if k not in ("step", "timestamp") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"loss", "reward", "grad_norm", "learning_rate"} <= keys
    for key in sorted(keys):
        want = {r["step"]: float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]}
        history = client.get_metric_history(run_id, key)
        assert len([m for m in history if m.step == 0]) <= 1, key
        assert sorted(m.step for m in history if m.step >= 1) == sorted(want), key
        assert {m.step: m.value for m in history if m.step >= 1} == want, key


def spawn_slow_train(project: Path, log: Path, tracking_uri: str, steps: int, env: dict[str, str],
                     hold: Path | None = None):
    """`vlgrpo train --force` on ``project`` (slowed: a second a step, ``steps`` steps, a checkpoint halfway),
    reporting to the MLflow server at ``tracking_uri`` with MLflow's own HTTP retries off and ours long.
    ``hold``: while this file exists, training waits inside its next reward call."""
    from tests.reliability.conftest import VLGRPO, spawn

    add_slow_reward(project, train={"max_steps": steps, "save_steps": steps // 2})
    held = {"REL_HOLD_FILE": str(hold)} if hold is not None else {}
    return spawn([VLGRPO, "train", "--force"], project, log, MLFLOW_TRACKING_URI=tracking_uri, **RIDE_OUT,
                 **SLOW, **held, **env)


def hold_until_a_flush_is_deferred(metrics: Path, at_stop: int, hold: Path, proc, log: Path) -> None:
    """With the tracking side down since ``at_stop`` lines: let one more step write its line (so a flush has
    something to send), hold training (``hold``, see SLOW_PLUGIN) and wait until a periodic flush has failed
    on the outage and been deferred. The caller releases the hold (``hold.unlink()``)."""
    from tests.reliability.conftest import wait_for

    wait_for(lambda: lines(metrics) > at_stop, 300, proc, log)
    hold.touch()
    wait_for(lambda: "metrics forwarding to MLflow deferred" in log.read_text(errors="replace"), 300, proc, log)
