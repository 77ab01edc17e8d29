"""Prefect server restart in the middle of a deployment run.

A real Prefect server, work pool and process worker run the `pipeline` deployment (prefect.yaml) on a tiny
project. While its `train` stage runs, the server process is stopped and started again on the same port and
database. The run must end COMPLETED, or FAILED/CRASHED with a message that says why; a second deployment
run must complete; and the registry must hold the candidate once (both runs train the same weights, so the
second run finds the version the first one registered instead of adding another).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.deployment import FINAL, api, deploy, trigger, wait_final, worker
from tests.project import make_project
from tests.reliability.slow_training import SLOW, add_slow_reward
from tests.servers import prefect_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
NAME = "vlgrpo-prefect-restart"
STEPS = 4


def _weights(root: Path) -> bytes:
    return (root / "models/candidate/model.safetensors").read_bytes()


def test_prefect_server_restart_mid_deployment_run(tmp_path):
    root = make_project(tmp_path / "proj", model_name=NAME, params={"evaluate": {"min_improvement": -1.0}})
    add_slow_reward(root, train={"max_steps": STEPS, "save_steps": STEPS // 2})
    with prefect_server(tmp_path) as srv:
        deploy(root, srv)
        with worker(root, srv, tmp_path / "worker.log"):
            # Only the first run is slowed (a second a step: the restart lands while `train` runs); the
            # slow reward scores 0 either way, so both runs train the same weights.
            first = trigger(root, srv, env=SLOW)
            metrics = root / "reports/train_metrics.jsonl"
            deadline = time.monotonic() + 900
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
                assert time.monotonic() < deadline, "the train stage never started"
                assert api(srv.url, f"/flow_runs/{first}")["state"]["type"] not in FINAL, \
                    (tmp_path / "worker.log").read_text()[-4000:]
                time.sleep(0.2)
            srv.stop()                                 # the server goes away in the middle of `train`
            steps_at_stop = metrics.read_text().count("\n")
            time.sleep(3)
            srv.start()                                # same port, same database
            state1 = wait_final(srv, first, 900)
            weights1 = _weights(root) if state1["type"] == "COMPLETED" else None

            second = trigger(root, srv)
            state2 = wait_final(srv, second, 900)
        wlog = (tmp_path / "worker.log").read_text(errors="replace")
        assert steps_at_stop < STEPS, "training ended before the restart"
        if state1["type"] != "COMPLETED":                  # failed: it must say why
            assert state1["type"] in ("FAILED", "CRASHED") and state1.get("message"), state1
        assert state2["type"] == "COMPLETED", wlog[-5000:]

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [str(v.version) for v in versions] == ["1"], "the candidate was registered twice"
    assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == \
        {"candidate": "1", "champion": "1"}
    register = json.loads((root / "reports/register.json").read_text())
    assert register["version"] == "1" and register["promoted"]
    if weights1 is not None:                           # both runs trained the same candidate
        assert _weights(root) == weights1 and register["reused_version"]
    print(f"first run: {state1['type']} ({state1.get('message')}); second: {state2['type']}")
