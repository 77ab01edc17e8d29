"""Registration killed half-way: SIGKILL of the real `vlgrpo register` stage between creating a model
version and setting its aliases, and after the champion alias moved but before the stage's report. Each
re-run finishes the version the killed run created - never a second version of the same candidate - and the
registry ends as an undisturbed run leaves it: one version, aliases `candidate` and `champion`, the same tags.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.project import run
from tests.reliability.conftest import REPO, VLGRPO

pytestmark = pytest.mark.reliability
ALIAS = "mlflow.tracking:MlflowClient.set_registered_model_alias"


def _registry(root: Path, name: str) -> tuple[dict, list]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except Exception:  # noqa: BLE001 - no registered model yet
        aliases = {}
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))
    return aliases, versions


def _ready_to_register(project: Path) -> None:
    # The stage logs the project's own pyfunc wrapper and core code with the model.
    for pkg in ("tasks", "vlgrpo"):
        shutil.copytree(REPO / pkg, project / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(project / "models/base", project / "models/candidate")
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports/evaluate.json").write_text(json.dumps(
        {"decision": {"promote": True, "reasons": ["candidate beats base"]}, "champion_version": None,
         "metrics": ["accuracy"], "n_items": 4, "candidate": {"accuracy": 0.5}, "base": {"accuracy": 0.25},
         "delta_vs_base": {"accuracy": 0.25}}))


def _register(root: Path, env: dict, kill_at: str | None = None):
    cmd = [VLGRPO, "register"] if kill_at is None else \
        [sys.executable, "-m", "tests.reliability.kill_at", kill_at, "register"]
    return run(cmd, root, timeout=300, check=kill_at is None, **env)


def _stable_tags(mv) -> dict:
    # When and by which run differ between any two runs; everything else must be equal.
    from tasks.registry import REGISTER_RUN_TAG, TRAIN_RUN_TAG

    return {k: v for k, v in mv.tags.items() if k not in ("promotion.at", REGISTER_RUN_TAG, TRAIN_RUN_TAG)}


def test_kill_inside_registration_never_leaves_a_half_registered_or_duplicate_version(project, cli_env):
    name = "vlgrpo-rel-test"
    _ready_to_register(project)
    env = {**cli_env, "PYTHONPATH": str(REPO)}

    # 1. Killed right after the version was created, before any alias: a version with no alias exists.
    p = _register(project, env, f"{ALIAS}:1")
    assert p.returncode == -9, p.stderr[-3000:]
    aliases, versions = _registry(project, name)
    assert [str(mv.version) for mv in versions] == ["1"] and aliases == {}

    # 2. The re-run finds that version (same candidate files), finishes it and promotes it; killed after
    #    `champion` moved but before the stage's report was written.
    p = _register(project, env, "tasks.common:write_report:1")
    assert p.returncode == -9, p.stderr[-3000:]
    aliases, versions = _registry(project, name)
    assert [str(mv.version) for mv in versions] == ["1"] and aliases == {"candidate": "1", "champion": "1"}
    assert not (project / "reports/register.json").exists()

    # 3. The last re-run completes: the same version, already promoted (not promoted twice), reported.
    _register(project, env)
    report = json.loads((project / "reports/register.json").read_text())
    assert report["version"] == "1" and report["promoted"] and report["reused_version"]
    aliases, versions = _registry(project, name)
    assert [str(mv.version) for mv in versions] == ["1"] and aliases == {"candidate": "1", "champion": "1"}
    # Exactly the tags an undisturbed registration writes, each once, from the run that promoted it.
    from tasks.registry import FINGERPRINT_TAG, candidate_fingerprint

    tags = versions[0].tags
    assert _stable_tags(versions[0]) == {
        "evaluate.promote": "True", "evaluate.reasons": "candidate beats base",
        "evaluate.primary_metric": "accuracy", "evaluate.test_accuracy": "0.5",
        "evaluate.base_test_accuracy": "0.25", "evaluate.test_accuracy_minus_base": "0.25",
        FINGERPRINT_TAG: candidate_fingerprint(project / "models/candidate"),
        "promotion.reason": "candidate beats base", "promotion.by": "vlgrpo register (should_promote)",
        "promotion.previous_champion": "none"}
    assert report["promotion"]["promotion.at"] == tags["promotion.at"]
    # The logged model records the version once (the model page shows it registered), with the evaluation's
    # metrics; the version names the run that completed the registration.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    from tasks.registry import model_id_of

    model = client.get_logged_model(model_id_of(versions[0]))
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": "1"}]
    assert {m.key: m.value for m in model.metrics} == {
        "test_accuracy": 0.5, "base_test_accuracy": 0.25, "test_accuracy_minus_base": 0.25}
    assert tags["vlgrpo.register_run_id"] == report["mlflow_run_id"]
    assert "Test accuracy: 0.500 (base 0.250)" in client.get_model_version(name, "1").description
