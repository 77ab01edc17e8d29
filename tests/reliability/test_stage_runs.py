"""Stage runs after faults and refusals, through the real `vlgrpo` commands and real servers.

- Orphaned MLflow runs: a `vlgrpo repro` SIGKILLed while its data stage runs leaves the parent and the stage
  run RUNNING; the next `vlgrpo repro` marks both KILLED (with a tag saying when and why), while a live run of
  another project on the same tracking server and experiment stays RUNNING.
- A tracking-server restart just as a stage ends: the stage still succeeds and its run ends FINISHED.
- Expected failures (invalid data, a failed pilot gate) end with the reason printed once, no traceback, and
  the Prefect flow run Failed with that reason as its state message.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.project import make_project, project_env, run
from tests.reliability.conftest import VLGRPO, kill9, spawn, stage_run_open, update_params, wait_for
from tests.reliability.slow_training import RIDE_OUT
from tests.servers import mlflow_server

pytestmark = pytest.mark.reliability

# A stage run that stays open in a live process (another project's run in progress).
LIVE = r'''
import time
from tasks.common import load
from tasks.tracking import stage_run

cfg, root = load("params.yaml")
with stage_run("train", cfg, root) as run_id:
    print(run_id, flush=True)
    time.sleep(900)
'''

# A stage whose body is done when the test says so (after it has taken the tracking server away).
ENDS_DURING_RESTART = r'''
import sys
from tasks.common import load
from tasks.tracking import stage_run

cfg, root = load("params.yaml")
with stage_run("validate", cfg, root) as run_id:
    print(run_id, flush=True)
    sys.stdin.readline()
print("stage done", flush=True)
'''


def _runs(client, **filters: str) -> list:
    exp = client.get_experiment_by_name("vlgrpo")
    if exp is None:
        return []
    where = " and ".join(f"tags.`{k}` = '{v}'" if k != "status" else f"attributes.status = '{v}'"
                         for k, v in filters.items())
    return client.search_runs([exp.experiment_id], where)


def test_sigkilled_runs_marked_killed_live_run_elsewhere_untouched(tmp_path, ready_project, cli_env):
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}") as srv:
        env = {**cli_env, "MLFLOW_TRACKING_URI": srv.url}
        client = MlflowClient(tracking_uri=srv.url)
        other = tmp_path / "other"
        shutil.copytree(ready_project, other)
        live = subprocess.Popen([sys.executable, "-c", LIVE], cwd=other, env=project_env(other, **env),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        root = make_project(tmp_path / "proj", model_name="vlgrpo-orphan-test")
        log = tmp_path / "killed.log"
        killed = spawn([VLGRPO, "repro"], root, log, **env)
        try:
            wait_for(lambda: stage_run_open(tmp_path / "mlflow.db", "data"), 300, killed, log, 0.02)
            kill9(killed)  # the repro, dvc and the data stage: no handler runs
            live_id = live.stdout.readline().strip()
            assert client.get_run(live_id).info.status == "RUNNING"
            orphans = _runs(client, status="RUNNING", **{"vlgrpo.host": client.get_run(live_id).data.tags[
                "vlgrpo.host"]})
            orphans = {r.info.run_id: r for r in orphans if r.info.run_id != live_id}
            assert sorted(r.info.run_name for r in orphans.values()) == ["data", "pipeline"]

            run([VLGRPO, "repro", "data"], root, timeout=600, **env)  # the next run

            for run_id, before in orphans.items():
                after = client.get_run(run_id)
                assert after.info.status == "KILLED", before.info.run_name
                reason = after.data.tags["vlgrpo.killed_reason"]
                assert f"process {before.data.tags['vlgrpo.pid']} on " in reason and "by pipeline" in reason
                assert after.info.end_time is not None
            assert client.get_run(live_id).info.status == "RUNNING"  # alive elsewhere: left alone
            assert live.poll() is None
            fresh = [r for r in _runs(client, **{"vlgrpo.stage": "data"}) if r.info.run_id not in orphans]
            assert [r.info.status for r in fresh] == ["FINISHED"]
        finally:
            kill9(killed)
            kill9(live)


def test_stage_run_ends_finished_across_a_tracking_server_restart(tmp_path, cli_env):
    """MLflow's own run exit makes one unretried call; a restart there failed a finished stage (CI, once)."""
    from mlflow.tracking import MlflowClient

    root = make_project(tmp_path / "proj")
    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}") as srv:
        env = {**cli_env, "MLFLOW_TRACKING_URI": srv.url, **RIDE_OUT}
        proc = subprocess.Popen([sys.executable, "-c", ENDS_DURING_RESTART], cwd=root,
                                env=project_env(root, **env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            run_id = proc.stdout.readline().strip()
            assert MlflowClient(tracking_uri=srv.url).get_run(run_id).info.status == "RUNNING"
            srv.stop()
            proc.stdin.write("\n")
            proc.stdin.flush()      # the stage ends while the server is down
            srv.start()
            out, _ = proc.communicate(timeout=600)
        finally:
            kill9(proc)
        assert proc.returncode == 0 and "stage done" in out, out[-3000:]
        assert "retrying" in out, out[-3000:]     # the end really met the outage
        run = MlflowClient(tracking_uri=srv.url).get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.end_time is not None


def _flow_runs(api: str, name: str) -> list[dict]:
    body = json.dumps({"flows": {"name": {"any_": [name]}}, "sort": "START_TIME_DESC", "limit": 50}).encode()
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("stage,params,reason", [
    ("validate", {"train": {"max_prompt_tokens": 10}}, "validation failed for "),
    ("pilot", {"pilot": {"min_reward_slope": 100.0}}, "pilot gate did not pass: "),
])
def test_expected_failure_prints_reason_once_and_fails_the_prefect_run(project, cli_env, stage, params, reason):
    update_params(project, **params)
    p = run([VLGRPO, stage], project, timeout=600, check=False, **cli_env)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert p.stderr.count(f"vlgrpo {stage}: error: {reason}") == 1, out[-3000:]
    error = next(line for line in p.stderr.splitlines() if line.startswith(f"vlgrpo {stage}: error: "))
    message = error.removeprefix(f"vlgrpo {stage}: error: ")
    runs = [r for r in _flow_runs(cli_env["PREFECT_API_URL"], stage) if r["state"]["message"] == message]
    assert len(runs) == 1 and runs[0]["state"]["type"] == "FAILED", [r["state"] for r in runs]
