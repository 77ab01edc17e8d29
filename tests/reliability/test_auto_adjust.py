"""`pilot.auto_adjust` through the real `vlgrpo train` stage: the pilot's remedy scales the value params.yaml
gives *now*, MLflow logs the value the run trains with, and the stage prints the final reward it reached."""
from __future__ import annotations

import json
import re

import pytest

from tests.project import run
from tests.reliability.conftest import VLGRPO, update_params
from vlgrpo.config import load_config
from vlgrpo.eval.gates import pilot_passed


def test_a_halving_remedy_applies_to_the_lowered_rate_and_mlflow_logs_the_effective_value(project, cli_env):
    from mlflow.tracking import MlflowClient

    # The pilot ran at 5e-4 and saw a grad-norm spike: its remedy is "learning rate x0.5".
    cfg = update_params(project, pilot={"auto_adjust": True},
                        train={"learning_rate": 5e-4, "max_steps": 1, "save_steps": 1})
    rows = [{"step": s + 1, "loss": 0.01, "reward": 0.3 + 0.02 * s, "kl": 0.01, "samples_per_s": 30.0,
             "grad_norm": 50.0 if s == 6 else 1.0} for s in range(10)]
    pcfg = load_config(project / "params.yaml")
    decision = pilot_passed(rows, pcfg.pilot, pcfg.train, full_steps=1)
    assert decision.passed and [d["problem"] for d in decision.diagnoses] == ["unstable"]
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports/pilot.json").write_text(json.dumps(decision.to_dict()))
    # Then the user lowers the rate; the pilot stage does not depend on it and is not re-run.
    cfg["train"]["learning_rate"] = 1e-4
    update_params(project, train=cfg["train"])

    p = run([VLGRPO, "train"], project, timeout=600, **cli_env)
    report = json.loads((project / "reports/train.json").read_text())
    assert report["auto_adjust_changes"] == ["train.learning_rate: 0.0001 -> 5e-05 (x0.5; unstable)"]
    first = json.loads((project / "reports/train_metrics.jsonl").read_text().splitlines()[0])
    assert first["learning_rate"] <= 5e-5 + 1e-12          # 2.5e-4 (the pilot's absolute remedy) before

    run_ = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_run(report["mlflow_run_id"])
    assert run_.data.params["train.learning_rate"] == "5e-05"
    assert run_.data.tags["auto_adjust_changes"] == report["auto_adjust_changes"][0]

    printed = re.search(r"train: 1 steps; final reward (\S+)", p.stdout + p.stderr)
    assert printed, (p.stdout + p.stderr)[-3000:]
    assert float(printed.group(1)) == pytest.approx(report["final"]["reward"], abs=1e-4)
