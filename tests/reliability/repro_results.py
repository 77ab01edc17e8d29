"""The check shared by the tests that disturb a `vlgrpo repro` (kills in every stage, a full disk): once a
last `vlgrpo repro` has completed, the project must hold what the undisturbed run of the same project holds.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.project import BIN, run
from tests.reliability.conftest import REPRO_NAME
from tests.reliability.test_killed_training import _metrics


def registry(root: Path):
    """(aliases, versions) of the project's registered model, read from its own MLflow store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{REPRO_NAME}'")
    aliases = {k: str(v) for k, v in client.get_registered_model(REPRO_NAME).aliases.items()}
    return aliases, versions


def _tags(mv) -> dict:
    # When it was promoted, the candidate's file hash (its config records the project's path) and the ids of
    # the runs that trained and registered it differ between any two executions.
    return {k: v for k, v in mv.tags.items()
            if k not in ("promotion.at", "vlgrpo.candidate_sha256", "vlgrpo.register_run_id", "vlgrpo.train_run_id")}


def _untimed(obj):
    """The report without wall-clock fields (seconds, rates) and run ids, which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items()
                if "seconds" not in k and not k.endswith("_s") and k != "mlflow_run_id"}
    return [_untimed(v) for v in obj] if isinstance(obj, list) else obj


def _evaluation(root: Path) -> dict:
    return _untimed(json.loads((root / "reports/evaluate.json").read_text()))


def assert_same_as_undisturbed(root: Path, ref: Path, resumed_from: int = 2) -> None:
    """DVC's lock and the outputs agree; training resumed from ``step-<resumed_from>``; and the final weights,
    train metrics, evaluation report and registry (one version, `candidate` and `champion`, the same tags)
    equal those of the undisturbed run ``ref``."""
    status = run([str(BIN / "dvc"), "status"], root).stdout
    assert "Data and pipelines are up to date" in status, status
    train = json.loads((root / "reports/train.json").read_text())
    assert train["resumed_from"] == resumed_from and train["finished"], train
    assert _metrics(root / "reports/train_metrics.jsonl") == _metrics(ref / "reports/train_metrics.jsonl")
    got, want = (load_file(p / "models/candidate/model.safetensors") for p in (root, ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _evaluation(root) == _evaluation(ref)
    (aliases, versions), (ref_aliases, ref_versions) = registry(root), registry(ref)
    assert [str(v.version) for v in versions] == ["1"], "a candidate registered twice"
    assert aliases == ref_aliases == {"candidate": "1", "champion": "1"}
    assert _tags(versions[0]) == _tags(ref_versions[0])
    for p in (root, ref):
        assert json.loads((p / "reports/register.json").read_text())["version"] == "1"
