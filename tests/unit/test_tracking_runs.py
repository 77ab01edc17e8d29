"""What the pipeline and stage runs hold in a real (SQLite) MLflow store (tasks.tracking): the experiment kind,
MLflow's commit tag, a stage's own params, report summaries without nested blocks, the parent run's results."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tasks import tracking  # noqa: E402
from tests.settings import tuned_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the repository's dvc.yaml (the stages' params lists) and no store yet."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", tracking.PARENT_ENV):
        monkeypatch.delenv(k, raising=False)
    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "reports").mkdir()
    yield tmp_path
    mlflow.set_tracking_uri(prev[0])
    mlflow.set_registry_uri(prev[1])


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


EVALUATION = {"metrics": ["accuracy"], "n_items": 12, "primary_metric": "accuracy",
              "base": {"accuracy": 0.25, "accuracy_lo": 0.1, "by_task": {"count": {"accuracy": 0.5}}},
              "candidate": {"accuracy": 0.5, "accuracy_lo": 0.3},
              "delta_vs_base": {"accuracy": 0.25},
              "decision": {"promote": True, "against": "base", "reasons": ["accuracy up"]}}


def test_pipeline_and_stage_runs_hold_what_the_ui_shows(project):
    cfg = tuned_config()
    (project / "reports/register.json").write_text(json.dumps({"model_uri": "models:/m/3", "promoted": True}))
    (project / "reports/train.json").write_text(json.dumps(
        {"steps": 5, "final": {"reward": 0.4, "kl": 2.0},
         "watch": {"flags": [{"kind": "kl", "message": "KL above 1 for 10 steps"}], "stopped": None}}))
    with tracking.pipeline_run(cfg, project) as parent_id:
        with tracking.stage_run("train", cfg, project) as train_id:
            tracking.log_report(project / "reports/train.json", train_id)
        (project / "reports/evaluate.json").write_text(json.dumps(EVALUATION))
        with tracking.stage_run("evaluate", cfg, project) as eval_id:
            tracking.log_report(project / "reports/evaluate.json", eval_id)
    client = _client(project)
    exp = client.get_experiment_by_name(cfg.register.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent, train, ev = (client.get_run(i) for i in (parent_id, train_id, eval_id))

    # params: every one on the parent, the stage's own (its dvc.yaml params list) on a stage run
    assert parent.data.params == {k: v[:6000] for k, v in tracking.flat_params(cfg).items()}
    assert "train.learning_rate" in train.data.params and "data.num_train" not in train.data.params
    assert "evaluate.bootstrap" in ev.data.params and "train.learning_rate" not in ev.data.params
    # summaries: top-level values and headline metrics, no nested blocks as one-point curves
    def own(metrics):  # MLflow's system metrics (CPU, memory) aside
        return {k: v for k, v in metrics.items() if not k.startswith("system/")}

    assert own(train.data.metrics) == {"steps": 5.0, "watch.flagged": 1.0, "watch.stopped_early": 0.0}
    assert train.data.tags["vlgrpo.train_flags"] == "KL above 1 for 10 steps"
    assert own(ev.data.metrics) == {"n_items": 12.0, "base.accuracy": 0.25, "candidate.accuracy": 0.5,
                               "delta_vs_base.accuracy": 0.25, "decision.promote": 1.0}
    for r in (parent, train, ev):
        assert r.data.tags["mlflow.source.git.commit"]
    # the parent: the execution's results and which stages ran
    assert parent.data.metrics["test.candidate.accuracy"] == 0.5
    assert parent.data.metrics["test.base.accuracy"] == 0.25
    assert parent.data.metrics["test.candidate_minus_base.accuracy"] == 0.25
    assert parent.data.metrics["decision.promote"] == 1.0
    tags = parent.data.tags
    assert (tags["vlgrpo.stages_run"], tags["vlgrpo.decision"], tags["vlgrpo.registered_model"]) == \
        ("train,evaluate", "promote (against base)", "models:/m/3")
    assert tags["vlgrpo.train_flags"] == "KL above 1 for 10 steps"


def test_a_failed_execution_records_its_stages_but_no_results(project):
    cfg = tuned_config()
    (project / "reports/evaluate.json").write_text(json.dumps(EVALUATION))   # an earlier execution's
    with pytest.raises(RuntimeError, match="stage broke"):
        with tracking.pipeline_run(cfg, project) as parent_id:
            with tracking.stage_run("data", cfg, project):
                pass
            raise RuntimeError("stage broke")
    parent = _client(project).get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["vlgrpo.stages_run"] == "data"
    assert not any(k.startswith(("test.", "decision.")) for k in parent.data.metrics)


def test_an_experiment_made_before_gets_the_kind_tag(project):
    cfg = tuned_config()
    client = _client(project)
    exp_id = client.create_experiment(cfg.register.experiment)
    assert tracking.setup(project, cfg.register.experiment) == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
