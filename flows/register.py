"""`register` stage flow: log the candidate as an MLflow pyfunc model, register a version (alias
`candidate`) and move alias `champion` to it only when the evaluate stage's should_promote() said so.

Run: `vlgrpo register`; under DVC: `dvc repro register`. Manual promotion: `vlgrpo promote --version N
--reason "..."`.
"""
from __future__ import annotations

from prefect import flow

from tasks.common import StageFailed, expected_failures, load, read_report, write_report
from tasks.register import register_task
from tasks.tracking import log_report, stage_run


@flow(name="register", log_prints=True)
@expected_failures
def register_flow(params: str = "params.yaml") -> dict:
    cfg, root = load(params)
    evaluation = read_report(root, "evaluate")
    if evaluation is None or "decision" not in evaluation:
        raise StageFailed("register needs reports/evaluate.json with a decision: run `vlgrpo evaluate` first")
    with stage_run("register", cfg, root) as run_id:
        out = register_task(root, cfg, evaluation, run_id)
        log_report(write_report(root, "register", {**out, "mlflow_run_id": run_id}))
    state = "promoted to champion" if out["promoted"] else "kept as candidate"
    print(f"register: {out['model_uri']} {state}")
    return out


if __name__ == "__main__":
    register_flow()
