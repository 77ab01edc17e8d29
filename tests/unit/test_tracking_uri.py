"""Which MLflow store a stage logs to when one process works on several projects (tasks.tracking)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tasks import tracking  # noqa: E402
from tests.settings import tuned_config


@pytest.fixture
def clean_mlflow(monkeypatch):
    """A process whose environment names no store, as a fresh one; MLflow's own URIs restored afterwards."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", tracking.PARENT_ENV):
        monkeypatch.delenv(k, raising=False)
    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(prev[0])
    mlflow.set_registry_uri(prev[1])


def _store(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root.resolve() / 'mlflow.db'}")


def _stage(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    with tracking.stage_run("data", tuned_config(), root) as run_id:
        return run_id


def test_two_projects_in_one_process_log_to_their_own_stores(tmp_path, clean_mlflow):
    a, b = tmp_path / "a", tmp_path / "b"
    run_a = _stage(a)
    run_b = _stage(b)  # MLflow exported a's URI to MLFLOW_TRACKING_URI while a's run was set up
    assert (b / "mlflow.db").exists(), "project b's run went to another store"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's export of a's URI was undone
    assert _store(b).get_run(run_b).info.run_name == "data"
    assert _store(a).get_run(run_a).info.run_name == "data"
    exp_a = _store(a).get_experiment_by_name(tuned_config().register.experiment).experiment_id
    assert [r.info.run_id for r in _store(a).search_runs([exp_a])] == [run_a]
    # and back to the first project: still its own store
    run_a2 = _stage(a)
    assert {r.info.run_id for r in _store(a).search_runs([exp_a])} == {run_a, run_a2}


def test_a_user_setting_still_wins_after_a_project_was_set_up(tmp_path, clean_mlflow, monkeypatch):
    a, shared = tmp_path / "a", tmp_path / "shared"
    _stage(a)
    shared.mkdir()
    uri = f"sqlite:///{shared / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)          # the user points the process at another store
    assert tracking.tracking_uri(tmp_path / "b") == uri
    run_b = _stage(tmp_path / "b")
    assert _store(shared).get_run(run_b).info.run_name == "data"
    assert not (tmp_path / "b" / "mlflow.db").exists()
    # nor does setting up a project change what the user exported
    assert os.environ["MLFLOW_TRACKING_URI"] == uri and "MLFLOW_REGISTRY_URI" not in os.environ
