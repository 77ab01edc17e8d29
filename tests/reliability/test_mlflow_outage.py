"""MLflow outage: a real `mlflow server` stops in the middle of the real `vlgrpo train` stage.

Training goes on (the metrics stay in the local JSONL stream); the forwarder's periodic flushes fail and are
deferred; the stage's final flush retries with backoff until the server is back on the same port; then every
step of every metric is in MLflow exactly once. With the server down for good, the `register` stage retries
with backoff, fails with a clear message after VLGRPO_MLFLOW_RETRIES attempts, and the champion alias stays
where it was.

MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 turns off MLflow's own HTTP retries (up to ~4 minutes per call by default)
so that each failed call returns at once and the project's retry layer (tasks.tracking.retry) is what runs.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.project import run
from tests.reliability.conftest import REPO, VLGRPO, update_params, wait_for
from tests.reliability.slow_training import (FAST_FAIL, assert_each_step_once_in_mlflow, lines, sidecar_count,
                                             spawn_slow_train, hold_until_a_flush_is_deferred)
from tests.servers import mlflow_server

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}") as srv:
        yield srv


def test_tracking_server_outage_during_training_loses_and_doubles_nothing(project, server, cli_env, tmp_path):
    metrics = project / "reports/train_metrics.jsonl"
    log = tmp_path / "train.log"
    hold = tmp_path / "hold"
    proc = spawn_slow_train(project, log, server.url, 10, cli_env, hold=hold)
    try:
        # The tracking run started and a periodic flush reached the server: now take the server away.
        wait_for(lambda: sidecar_count(metrics) >= 1, 300, proc, log)
        server.stop()
        time.sleep(0.2)                                    # a flush in flight at the stop has settled
        at_stop, sent_at_stop = lines(metrics), sidecar_count(metrics)
        assert at_stop < 10, "training ended before the outage"
        hold_until_a_flush_is_deferred(metrics, at_stop, hold, proc, log)   # whatever the machine's speed
        hold.unlink()
        # Training goes on without the server, to the end; the final flush retries with backoff.
        wait_for(lambda: "MLflow metrics flush failed" in log.read_text(errors="replace"), 300, proc, log)
        assert lines(metrics) == 10
        assert (project / "models/candidate/model.safetensors").exists()
        assert sidecar_count(metrics) == sent_at_stop < 10   # nothing got through while the server was away
        server.start()
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server.proc.poll() is not None:
            server.start()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    # The periodic flushes during the outage failed and were deferred (logged, training went on) before the
    # stage's final flush started retrying.
    deferred = text.find("metrics forwarding to MLflow deferred")
    assert 0 <= deferred < text.find("MLflow metrics flush failed"), text[-4000:]
    assert re.search(r"MLflow metrics flush failed \(.*\); retrying in \d", text)

    from mlflow.tracking import MlflowClient

    report = json.loads((project / "reports/train.json").read_text())
    assert report["finished"] and report["steps"] == 10
    assert_each_step_once_in_mlflow(MlflowClient(tracking_uri=server.url), report["mlflow_run_id"], metrics)
    assert sidecar_count(metrics) == 10


def _seed_champion(url: str, root: Path, name: str) -> str:
    """Register version 1 of ``name`` and make it champion, the way the register stage does."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.registry import log_candidate, promote, register_version

    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        exp = client.get_experiment_by_name("vlgrpo")
        exp_id = exp.experiment_id if exp else client.create_experiment("vlgrpo")
        with mlflow.start_run(experiment_id=exp_id) as r:
            info = log_candidate(REPO, root / "models/base", 3136, 12544)
            v = register_version(client, name, info, r.info.run_id, {})
        promote(client, name, v, reason="seed", by="test")
    finally:  # later tests in this process must not talk to this (soon stopped) server by default
        mlflow.set_tracking_uri(prev[0])
        mlflow.set_registry_uri(prev[1])
    return v


def test_registry_outage_fails_clearly_after_retries_and_keeps_champion(project, server, cli_env, tmp_path):
    from mlflow.tracking import MlflowClient

    name = "vlgrpo-rel-outage"
    update_params(project, register={"model_name": name})
    v1 = _seed_champion(server.url, project, name)
    shutil.copytree(project / "models/base", project / "models/candidate")
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports/evaluate.json").write_text(json.dumps(
        {"decision": {"promote": True, "reasons": ["candidate beats champion"]}, "champion_version": v1}))

    server.stop()
    try:
        t0 = time.monotonic()
        p = run([VLGRPO, "register"], project, timeout=300, check=False, MLFLOW_TRACKING_URI=server.url,
                VLGRPO_MLFLOW_RETRIES="3", **FAST_FAIL, **cli_env)
        took = time.monotonic() - t0
    finally:
        server.start()
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert re.search(r"MLflow [a-z ]+ failed after 3 attempts", out), out[-3000:]
    # Backoff between the attempts: 0.5 s, then 1 s.
    assert re.search(r"retrying in 0\.5s", out) and re.search(r"retrying in 1\.0s", out)
    assert took < 120
    assert not (project / "reports/register.json").exists()

    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    assert client.get_registered_model(name).aliases == {"candidate": v1, "champion": v1}
    assert [mv.version for mv in client.search_model_versions(f"name='{name}'")] == [v1]
