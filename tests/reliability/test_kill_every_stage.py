"""SIGKILL in the middle of every stage: `vlgrpo repro` is killed (its whole process group: dvc, the stage,
Prefect, MLflow) once inside each of data, validate, base, pilot, train, evaluate and register, each time
right after the stage opened its MLflow run (train: after its first checkpoint). After every kill the next
`vlgrpo repro` picks up where DVC's lock says the pipeline is; the last one completes. Then `dvc status` is
clean (lock and outputs agree) and the final weights, metrics, evaluation and registry equal those of an
undisturbed run of the same project: one version, aliases `candidate` and `champion`, the same tags.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.project import BIN, make_project, run
from tests.reliability.conftest import VLGRPO, kill9, spawn, wait_for
from tests.reliability.test_killed_training import _metrics

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
STAGES = ["data", "validate", "base", "pilot", "train", "evaluate", "register"]
NAME = "vlgrpo-rel-kill"
# CPU fp32 so that a resumed training run can be compared bit for bit; 4 steps, a checkpoint at 2.
PARAMS = {"evaluate": {"min_improvement": -1.0},
          "train": {"max_steps": 4, "save_steps": 2, "mixed_precision": "no"}}


def _running(root: Path, stage: str) -> bool:
    """The stage's MLflow run is open (read straight from the project's store while the stage writes)."""
    db = root / "mlflow.db"
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
            return con.execute("SELECT 1 FROM runs WHERE name = ? AND status = 'RUNNING'", (stage,)).fetchone() \
                is not None
    except sqlite3.Error:                            # locked or mid-migration: ask again
        return False


def _registry(root: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{NAME}'")
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    return aliases, versions


def _tags(mv) -> dict:
    # When it was promoted and the candidate's file hash (its config records the project's path) differ.
    return {k: v for k, v in mv.tags.items() if k not in ("promotion.at", "vlgrpo.candidate_sha256")}


def _untimed(obj):
    """The report without wall-clock fields (seconds, rates) and run ids, which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items()
                if "seconds" not in k and not k.endswith("_s") and k != "mlflow_run_id"}
    return [_untimed(v) for v in obj] if isinstance(obj, list) else obj


def _evaluation(root: Path) -> dict:
    return _untimed(json.loads((root / "reports/evaluate.json").read_text()))


def test_kill_at_every_stage_then_repro_completes_consistently(tmp_path, cli_env):
    # cli_env: one shared Prefect server instead of a temporary one per stage (its own process group, so
    # the kills below do not reach it).
    ref = make_project(tmp_path / "ref", params=PARAMS, model_name=NAME)
    run([VLGRPO, "repro"], ref, timeout=1200, **cli_env)

    root = make_project(tmp_path / "proj", params=PARAMS, model_name=NAME)
    ckpt = root / "models/candidate/checkpoints/step-2"
    for stage in STAGES:
        log = tmp_path / f"kill-{stage}.log"
        proc = spawn([VLGRPO, "repro"], root, log, **cli_env)
        try:
            wait_for(lambda: _running(root, stage) and (stage != "train" or ckpt.is_dir()), 600, proc, log,
                     poll=0.02)
        finally:
            kill9(proc)
        assert proc.returncode == -9, f"{stage}: repro ended before the kill"
        assert _running(root, stage), f"the kill missed {stage}"
        print(f"killed inside {stage}")
    run([VLGRPO, "repro"], root, timeout=1200, **cli_env)

    # DVC: the lock describes exactly the outputs on disk.
    status = run([str(BIN / "dvc"), "status"], root).stdout
    assert "Data and pipelines are up to date" in status, status
    # The same results as the undisturbed run.
    train = json.loads((root / "reports/train.json").read_text())
    assert train["resumed_from"] == 2 and train["finished"]
    assert _metrics(root / "reports/train_metrics.jsonl") == _metrics(ref / "reports/train_metrics.jsonl")
    got, want = (load_file(p / "models/candidate/model.safetensors") for p in (root, ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _evaluation(root) == _evaluation(ref)
    (aliases, versions), (ref_aliases, ref_versions) = _registry(root), _registry(ref)
    assert [str(v.version) for v in versions] == ["1"], "a candidate registered twice"
    assert aliases == ref_aliases == {"candidate": "1", "champion": "1"}
    assert _tags(versions[0]) == _tags(ref_versions[0])
    for p in (root, ref):
        assert json.loads((p / "reports/register.json").read_text())["version"] == "1"
