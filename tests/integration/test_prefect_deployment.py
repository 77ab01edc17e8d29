"""The scheduled deployment on a real Prefect server: create the pool, deploy prefect.yaml, start a worker,
trigger a run, and see it COMPLETED - every stage a subflow, the stage artifacts on the server, and a new
model version (promoted) in MLflow.
"""
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.project import BIN, make_project, project_env, run
from tests.servers import prefect_server

pytestmark = pytest.mark.integration


def _api(url: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_scheduled_deployment_runs_the_pipeline(tmp_path):
    root = make_project(tmp_path / "proj", params={"evaluate": {"min_improvement": -1.0}},
                        model_name="vlgrpo-prefect-test")
    with prefect_server(tmp_path) as srv:
        env = {"PREFECT_API_URL": srv.url, "PREFECT_HOME": srv.env["PREFECT_HOME"]}
        prefect = str(BIN / "prefect")
        run([prefect, "--no-prompt", "work-pool", "create", "vlgrpo-process", "--type", "process"], root, **env)
        run([prefect, "--no-prompt", "deploy", "--name", "scheduled"], root, **env)

        deployments = _api(srv.url, "/deployments/filter", {})
        dep = next(d for d in deployments if d["name"] == "scheduled")
        assert dep["work_pool_name"] == "vlgrpo-process"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["parameters"] == {"params": "params.yaml", "force_train": False}

        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "vlgrpo-process", "--type", "process"],
                                  cwd=root, env=project_env(root, **env), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            out = run([prefect, "deployment", "run", "pipeline/scheduled"], root, **env).stdout
            run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
            deadline = time.monotonic() + 1500
            while True:
                state = _api(srv.url, f"/flow_runs/{run_id}")["state"]["type"]
                if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
                    break
                time.sleep(3)
        finally:
            # The worker forwards the signal to its process runner and may linger; the run is over either way.
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]

        # Every stage ran as a subflow, and the stage artifacts reached the server.
        flows = {f["id"]: f["name"] for f in _api(srv.url, "/flows/filter", {})}
        runs = _api(srv.url, "/flow_runs/filter", {})
        done = {flows[r["flow_id"]] for r in runs if r["state"]["type"] == "COMPLETED"}
        assert {"pipeline", "data", "validate", "base", "pilot", "train", "evaluate", "register"} <= done
        by_key = {a["key"]: a for a in _api(srv.url, "/artifacts/filter", {}) if a.get("key")}
        assert {"validation-summary", "pilot-diagnosis", "train-progress", "evaluation-report"} <= set(by_key)
        assert by_key["train-progress"]["data"] == 100.0
        assert "# Pilot: PASSED" in by_key["pilot-diagnosis"]["data"]
        # the verdict line itself ("promote" alone also matches "DO NOT PROMOTE")
        assert "## Decision: **PROMOTE** (candidate against the base)" in by_key["evaluation-report"]["data"]
        assert {row["check"] for row in json.loads(by_key["validation-summary"]["data"])}

    # It really ran the pipeline: a new registered version in the project's MLflow store, promoted.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    aliases = client.get_registered_model("vlgrpo-prefect-test").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "champion": "1"}
    register = json.loads((root / "reports" / "register.json").read_text())
    assert register["version"] == "1" and register["promoted"] is True
