"""PostgreSQL restart under a real MLflow server backed by it, in the middle of the real `vlgrpo train`.

The test starts a throwaway PostgreSQL cluster of its own (never the shared server on 5432), puts an
`mlflow server` on it, and while the train stage runs stops the database with `pg_ctl -m immediate` (a
crash: open transactions are cut), waits until a metrics flush has failed on it, and starts it again.
Every step of every metric must then be in MLflow exactly once, as for the MLflow server outage.
"""
from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import wait_for
from tests.reliability.slow_training import (assert_each_step_once_in_mlflow, hold_until_a_flush_is_deferred, lines,
                                             sidecar_count, spawn_slow_train)
from tests.servers import mlflow_server

pytestmark = pytest.mark.reliability
STEPS = 10


def test_postgres_restart_during_training_loses_and_doubles_no_metric(project, throwaway_postgres, cli_env,
                                                                         tmp_path):
    pg = throwaway_postgres
    metrics = project / "reports/train_metrics.jsonl"
    log = tmp_path / "train.log"
    with mlflow_server(tmp_path, pg.url) as server:
        hold = tmp_path / "hold"
        proc = spawn_slow_train(project, log, server.url, STEPS, cli_env, hold=hold)
        try:
            wait_for(lambda: sidecar_count(metrics) >= 1, 300, proc, log)   # metrics reached PostgreSQL
            pg.stop("immediate")
            at_stop = lines(metrics)
            assert at_stop < STEPS, "training ended before the database went away"
            hold_until_a_flush_is_deferred(metrics, at_stop, hold, proc, log)   # the dead database met
            pg.start()
            hold.unlink()
            rc = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text(errors="replace")
        assert rc == 0, text[-4000:]

        from mlflow.tracking import MlflowClient

        report = json.loads((project / "reports/train.json").read_text())
        assert report["finished"] and report["steps"] == STEPS
        assert_each_step_once_in_mlflow(MlflowClient(tracking_uri=server.url), report["mlflow_run_id"],
                                        metrics)
        assert sidecar_count(metrics) == STEPS
