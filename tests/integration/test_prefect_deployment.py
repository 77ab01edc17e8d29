"""The scheduled deployment on a real Prefect server: create the pool, deploy prefect.yaml, start a worker,
trigger a run, and see it COMPLETED - every stage a subflow, the stage artifacts on the server, and a new
model version (promoted) in MLflow. The project trains on 2 processes (``train.launch.num_processes: 2``):
the pilot and train stages of the worker's flow run start them through accelerate's launcher.
"""
import json

import pytest

from tests.deployment import api, deploy, trigger, wait_final, worker
from tests.project import make_project
from tests.servers import prefect_server

pytestmark = pytest.mark.integration
STAGE_NAMES = ("data", "validate", "base", "pilot", "train", "evaluate", "register")


def test_scheduled_deployment_runs_the_pipeline(tmp_path):
    root = make_project(tmp_path / "proj", params={"evaluate": {"min_improvement": -1.0},
                                                   "train": {"launch": {"num_processes": 2}}},
                        model_name="vlgrpo-prefect-test")
    with prefect_server(tmp_path) as srv:
        deploy(root, srv)
        deployments = api(srv.url, "/deployments/filter", {})
        dep = next(d for d in deployments if d["name"] == "scheduled")
        assert dep["work_pool_name"] == "vlgrpo-process"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["parameters"] == {"params": "params.yaml", "force_train": False}

        with worker(root, srv, tmp_path / "worker.log"):
            state = wait_final(srv, trigger(root, srv), 1500, poll=3)["type"]
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]

        # Every stage ran as a subflow, and the stage artifacts reached the server.
        flows = {f["id"]: f["name"] for f in api(srv.url, "/flows/filter", {})}
        runs = api(srv.url, "/flow_runs/filter", {})
        done = {flows[r["flow_id"]] for r in runs if r["state"]["type"] == "COMPLETED"}
        assert {"pipeline", "data", "validate", "base", "pilot", "train", "evaluate", "register"} <= done
        by_key = {a["key"]: a for a in api(srv.url, "/artifacts/filter", {}) if a.get("key")}
        assert {"validation-summary", "pilot-diagnosis", "train-progress", "evaluation-report"} <= set(by_key)
        assert by_key["train-progress"]["data"] == 100.0
        assert "# Pilot: PASSED" in by_key["pilot-diagnosis"]["data"]
        # the verdict line itself ("promote" alone also matches "DO NOT PROMOTE")
        assert "## Decision: **PROMOTE** (candidate against the base)" in by_key["evaluation-report"]["data"]
        summary = {row["what"]: row["value"] for row in json.loads(by_key["validation-summary"]["data"])}
        assert summary["verdict"] == "OK" and summary["rows checked"] == summary["valid rows"] > 0
        # Named stage runs inside the pipeline's run (in-process subflows), each linked to its MLflow run.
        pipeline = next(r for r in runs if flows[r["flow_id"]] == "pipeline")
        stages = [r for r in runs if r["parent_task_run_id"] and r["name"].split(" @ ")[0] in STAGE_NAMES]
        assert pipeline["name"].startswith("pipeline @ ") and len(stages) == len(STAGE_NAMES)
        links = [a for a in api(srv.url, "/artifacts/filter", {}) if a.get("key") == "mlflow-run"]
        assert {a["flow_run_id"] for a in links} == {pipeline["id"], *(r["id"] for r in stages)}

    # It really ran the pipeline: a new registered version in the project's MLflow store, promoted.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    aliases = client.get_registered_model("vlgrpo-prefect-test").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "champion": "1"}
    assert json.loads((root / "reports" / "train.json").read_text())["num_processes"] == 2
    register = json.loads((root / "reports" / "register.json").read_text())
    assert register["version"] == "1" and register["promoted"] is True
