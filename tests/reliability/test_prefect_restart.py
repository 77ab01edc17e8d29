"""Prefect server restart in the middle of a deployment run.

A real Prefect server, work pool and process worker run the `pipeline` deployment (prefect.yaml) on a tiny
project. While its `train` stage runs, the server process is stopped and started again on the same port and
database. The run must end COMPLETED, or FAILED/CRASHED with a message that says why; a second deployment
run must complete; and the registry must hold the candidate once (both runs train the same weights, so the
second run finds the version the first one registered instead of adding another).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.project import BIN, make_project, project_env, run
from tests.reliability.test_mlflow_outage import SLOW_PLUGIN
from tests.servers import prefect_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
NAME = "vlgrpo-prefect-restart"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _api(url: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _trigger(root: Path, env: dict) -> str:
    out = run([str(BIN / "prefect"), "deployment", "run", "pipeline/scheduled"], root, **env).stdout
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)


def _wait_final(url: str, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = _api(url, f"/flow_runs/{run_id}")["state"]
            if state["type"] in FINAL:
                return state
        except OSError:
            pass                                   # the server is restarting
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout}s")


def _weights(root: Path) -> bytes:
    return (root / "models/candidate/model.safetensors").read_bytes()


def test_prefect_server_restart_mid_deployment_run(tmp_path):
    root = make_project(tmp_path / "proj", model_name=NAME, params={
        "evaluate": {"min_improvement": -1.0},
        # A few slow steps: the restart lands while the train stage runs.
        "train": {"max_steps": 6, "save_steps": 3},
        "rewards": {"weights": {"accuracy": 1.0, "rel_slow": 0.1}, "plugins": ["slow_plugin.py"]}})
    (root / "slow_plugin.py").write_text(SLOW_PLUGIN)
    with prefect_server(tmp_path) as srv:
        env = {"PREFECT_API_URL": srv.url, "PREFECT_HOME": srv.env["PREFECT_HOME"]}
        prefect = str(BIN / "prefect")
        run([prefect, "--no-prompt", "work-pool", "create", "vlgrpo-process", "--type", "process"], root, **env)
        run([prefect, "--no-prompt", "deploy", "--name", "scheduled"], root, **env)
        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "vlgrpo-process", "--type", "process"],
                                  cwd=root, env=project_env(root, **env), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            first = _trigger(root, env)
            metrics = root / "reports/train_metrics.jsonl"
            deadline = time.monotonic() + 900
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
                assert time.monotonic() < deadline, "the train stage never started"
                assert _api(srv.url, f"/flow_runs/{first}")["state"]["type"] not in FINAL, \
                    (tmp_path / "worker.log").read_text()[-4000:]
                time.sleep(0.2)
            srv.stop()                                 # the server goes away in the middle of `train`
            steps_at_stop = metrics.read_text().count("\n")
            time.sleep(3)
            srv.start()                                # same port, same database
            state1 = _wait_final(srv.url, first, 900)
            weights1 = _weights(root) if state1["type"] == "COMPLETED" else None

            second = _trigger(root, env)
            state2 = _wait_final(srv.url, second, 900)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)
        wlog = (tmp_path / "worker.log").read_text(errors="replace")
        assert steps_at_stop < 6, "training ended before the restart"
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
