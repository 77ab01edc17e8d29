"""Remote rewards against a real HTTP server process on 127.0.0.1 (tests/reward_server.py): a scoring endpoint
with retries, timeouts and clear errors, an OpenAI-compatible judge with bounded concurrency, and a short GRPO
run scored by that judge."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.servers import free_port, wait_http
from tests.tiny_setup import tiny_project, tiny_train_cfg
from vlgrpo import rewards as R
from vlgrpo.config import RewardsConfig

REPO = Path(__file__).resolve().parents[2]
COMPLETIONS = ["red", "two big blue squares here", "yes", "", "a circle", "no"]
COLUMNS = {"id": list("abcdef"), "solution": ["red", "2", "yes", "x", "circle", "yes"]}
PROMPTS = ["What is it?"] * len(COMPLETIONS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("reward_server") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.reward_server", str(port)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/stats", 30, proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def stats(url):
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
        return json.loads(r.read())


def score(names, **cfg):
    fns = R.setup_rewards(names, R.RewardContext(RewardsConfig(**cfg)))
    return R.compute_rewards({n: 1.0 for n in names}, PROMPTS, COMPLETIONS, COLUMNS, rewards=fns,
                             on_error=cfg.get("on_error", "raise")).per_reward


def test_a_remote_scoring_endpoint(server):
    got = score(["exact"], remote={"exact": f"{server}/score"})
    assert got["exact"] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_a_remote_endpoint_is_retried_then_fails_clearly(server):
    with pytest.raises(R.RewardError, match=rf"reward 'flaky': {server}/flaky failed after 1 tries: HTTP 503"):
        score(["flaky"], remote={"flaky": f"{server}/flaky"}, remote_retries=0)
    # the server refuses its first two requests (the batch's, then the first item's alone); retries get through
    assert score(["flaky"], remote={"flaky": f"{server}/flaky"}, remote_retries=2)["flaky"][0] == 1.0
    with pytest.raises(R.RewardError, match=r"reward 'slow': .*/slow failed after 1 tries: .*timed out"):
        score(["slow"], remote={"slow": f"{server}/slow"}, remote_retries=0, remote_timeout=0.3)
    # with on_error: skip an unreachable endpoint scores None, and the other rewards still count
    dead = f"http://127.0.0.1:{free_port()}/score"
    got = score(["gone", "format"], remote={"gone": dead}, remote_retries=0, on_error="skip")
    assert got["gone"] == [None] * len(COMPLETIONS) and got["format"][0] == 1.0


def test_an_openai_compatible_judge_with_bounded_concurrency(server):
    before = stats(server)["requests"].get("/v1/chat/completions", 0)
    got = score(["judge"], judges={"judge": f"{server}/v1"}, max_concurrency=2)
    # the server's judge says yes to answers of one to three words
    assert got["judge"] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    s = stats(server)
    assert s["requests"]["/v1/chat/completions"] - before == len(COMPLETIONS)
    assert s["requests"]["/v1/models"] >= 1                     # the model name was asked, not configured
    assert s["max_in_flight"] == 2                             # six requests at once, two at a time


@pytest.mark.slow        # two tiny GRPO steps, 16 judge requests: ~25 s
def test_a_short_grpo_run_scored_by_a_remote_judge(server, tmp_path):
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths

    cfg = tiny_train_cfg(tmp_path, {"judge": 1.0, "format": 0.1}, num_val=0)
    cfg = dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, judges={"judge": f"{server}/v1"},
                                                               judge_model="tiny-judge"))
    root = tiny_project(tmp_path, cfg, "")
    before = stats(server)["requests"].get("/v1/chat/completions", 0)
    out = train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", "out/j", "reports/j.jsonl"),
                     progress=False)
    assert out["finished"] and out["steps"] == 2
    rows = [json.loads(x) for x in (root / "reports/j.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["rewards/judge/mean"] <= 1.0 for r in rows)
    n = cfg.train.max_steps * cfg.train.prompts_per_step * cfg.train.num_generations
    assert stats(server)["requests"]["/v1/chat/completions"] - before == n
