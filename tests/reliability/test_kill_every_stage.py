"""SIGKILL in the middle of every stage: `vlgrpo repro` is killed (its whole process group: dvc, the stage,
Prefect, MLflow) once inside each of data, validate, base, pilot, train, evaluate and register, each time
right after the stage opened its MLflow run (train: after its first checkpoint). After every kill the next
`vlgrpo repro` picks up where DVC's lock says the pipeline is; the last one completes. Then `dvc status` is
clean (lock and outputs agree) and the final weights, metrics, evaluation and registry equal those of an
undisturbed run of the same project: one version, aliases `candidate` and `champion`, the same tags.
"""
from __future__ import annotations


import pytest

from tests.project import run
from tests.reliability.conftest import REPRO_TIMEOUT, VLGRPO, kill9, repro_project, spawn, stage_run_open, wait_for
from tests.reliability.repro_results import assert_same_as_undisturbed

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
STAGES = ["data", "validate", "base", "pilot", "train", "evaluate", "register"]


def test_kill_at_every_stage_then_repro_completes_consistently(undisturbed_repro, tmp_path, cli_env):
    # cli_env: one shared Prefect server instead of a temporary one per stage (its own process group, so
    # the kills below do not reach it).
    root = repro_project(tmp_path / "proj")
    ckpt = root / "models/candidate/checkpoints/step-2"
    for stage in STAGES:
        log = tmp_path / f"kill-{stage}.log"
        proc = spawn([VLGRPO, "repro"], root, log, **cli_env)
        try:
            wait_for(lambda: stage_run_open(root / "mlflow.db", stage) and (stage != "train" or ckpt.is_dir()),
                     REPRO_TIMEOUT, proc, log, poll=0.02)
        finally:
            kill9(proc)
        assert proc.returncode == -9, f"{stage}: repro ended before the kill"
        assert stage_run_open(root / "mlflow.db", stage), f"the kill missed {stage}"
        print(f"killed inside {stage}")
    run([VLGRPO, "repro"], root, timeout=REPRO_TIMEOUT, **cli_env)

    # DVC's lock describes exactly the outputs on disk, and the results equal the undisturbed run's.
    assert_same_as_undisturbed(root, undisturbed_repro)
