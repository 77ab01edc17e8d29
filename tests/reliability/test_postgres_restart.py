"""PostgreSQL restart under a real MLflow server backed by it, in the middle of the real `vlgrpo train`.

The test starts a throwaway PostgreSQL cluster of its own (never the shared server on 5432), puts an
`mlflow server` on it, and while the train stage runs stops the database with `pg_ctl -m immediate` (a
crash: open transactions are cut), waits until a metrics flush has failed on it, and starts it again.
Every step of every metric must then be in MLflow exactly once, as for the MLflow server outage.
"""
from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import VLGRPO, spawn, update_params, wait_for
from tests.reliability.test_mlflow_outage import RIDE_OUT, SLOW_PLUGIN, _lines, _sidecar_count
from tests.servers import mlflow_server

pytestmark = pytest.mark.reliability
STEPS = 8


def test_postgres_restart_during_training_loses_and_doubles_no_metric(project, throwaway_postgres, cli_env,
                                                                         tmp_path):
    pg = throwaway_postgres
    (project / "slow_plugin.py").write_text(SLOW_PLUGIN)
    update_params(project, train={"max_steps": STEPS, "save_steps": 4},
                  rewards={"weights": {"accuracy": 1.0, "rel_slow": 0.1}, "plugins": ["slow_plugin.py"]})
    metrics = project / "reports/train_metrics.jsonl"
    log = tmp_path / "train.log"
    with mlflow_server(tmp_path, pg.url) as server:
        proc = spawn([VLGRPO, "train", "--force"], project, log, MLFLOW_TRACKING_URI=server.url, **RIDE_OUT,
                     **cli_env)
        try:
            wait_for(lambda: _sidecar_count(metrics) >= 1, 300, proc, log)   # metrics reached PostgreSQL
            pg.stop("immediate")
            at_stop = _lines(metrics)
            assert at_stop < STEPS, "training ended before the database went away"
            wait_for(lambda: "metrics forwarding to MLflow deferred" in log.read_text(errors="replace"),
                     120, proc, log)
            pg.start()
            rc = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text(errors="replace")
        assert rc == 0, text[-4000:]

        from mlflow.tracking import MlflowClient

        report = json.loads((project / "reports/train.json").read_text())
        assert report["finished"] and report["steps"] == STEPS
        client = MlflowClient(tracking_uri=server.url)
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        keys = {k for r in rows for k, v in r.items()
                if k not in ("step", "timestamp") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {"loss", "reward", "grad_norm", "learning_rate"} <= keys
        for key in sorted(keys):
            want = [r["step"] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
            history = client.get_metric_history(report["mlflow_run_id"], key)
            assert len([m for m in history if m.step == 0]) <= 1, key
            got = sorted(m.step for m in history if m.step >= 1)
            assert got == want, key                     # every step once: none lost, none doubled
            # and each value is the one the trainer wrote
            assert {m.step: m.value for m in history if m.step >= 1} == \
                {r["step"]: float(r[key]) for r in rows if r["step"] in want}, key
        assert _sidecar_count(metrics) == STEPS
