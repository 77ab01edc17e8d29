"""The Prefect artifacts' content (tasks/artifacts.py) and the stage run names (flows/lineage.py)."""
from __future__ import annotations

import subprocess

from flows.lineage import name_for, pipeline_tags, short_commit
from tasks.artifacts import markdown_table, mlflow_model_version_url, mlflow_ui, train_metrics_summary


def test_train_metrics_summary_per_metric_over_the_steps_that_logged_it():
    rows = [{"step": 1, "reward": 0.5, "kl": 0.0, "loss": 1.0, "rewards/accuracy/mean": 0.25},
            {"step": 2, "reward": 0.75, "kl": 0.5, "loss": float("nan"), "rewards/accuracy/mean": 0.5},
            {"step": 3, "reward": 0.25, "kl": 0.25, "eval/accuracy": 0.5, "rewards/accuracy/mean": 0.0}]
    table = {r["metric"]: r for r in train_metrics_summary(rows)}
    # the total reward first, then each reward's own mean, then the rest in the table's order
    assert list(table)[:3] == ["reward", "rewards/accuracy/mean", "kl"]
    assert table["reward"] == {"metric": "reward", "steps": 3, "first": 0.5, "last": 0.25, "min": 0.25,
                               "max": 0.75, "mean": 0.5}
    assert table["loss"]["steps"] == 1 and table["loss"]["last"] == 1.0      # NaN is no value
    assert table["eval/accuracy"]["steps"] == 1
    assert "entropy" not in table                                           # never logged: no row


def test_markdown_table_escapes_cells():
    out = markdown_table([{"a": "x|y", "b": 0.123456}, {"a": "two\nlines"}], ["a", "b"])
    assert out.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.1235 |", "| two lines |  |"]


def test_mlflow_links_use_the_tracking_server_or_the_local_ui(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_ui(tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000/")
    assert mlflow_model_version_url(tmp_path, "my model", 3) == \
        "http://mlflow.internal:5000/#/models/my%20model/versions/3"


def test_run_names_and_tags_carry_the_projects_commit(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.strip()
    params = str(tmp_path / "params.yaml")
    assert name_for("train", params) == f"train @ {sha}"
    assert pipeline_tags(params) == ["vlgrpo", f"commit:{sha}"]
    assert short_commit(str(tmp_path / "nowhere")) == "no-git"


def test_a_failing_artifact_never_fails_the_stage(caplog):
    from tasks.artifacts import best_effort

    @best_effort
    def publish() -> None:
        raise ConnectionError("server away")

    assert publish() is None
    assert "Prefect artifact not published (publish): server away" in caplog.text
