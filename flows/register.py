"""`register` stage flow: log the candidate as an MLflow pyfunc model, register a version (alias
`candidate`) and move alias `champion` to it only when the evaluate stage's should_promote() said so.

Run: `vlgrpo register`; under DVC: `dvc repro register`. Manual promotion: `vlgrpo promote --version N
--reason "..."`.
"""
from __future__ import annotations

from prefect import flow

from flows.lineage import run_name

from tasks.artifacts import link_model_version, link_mlflow_run, publish_result
from tasks.common import StageFailed, expected_failures, load, read_report, write_report
from tasks.register import register_task
from tasks.tracking import log_report, stage_run


@flow(name="register", flow_run_name=run_name("register"), log_prints=True)
@expected_failures
def register_flow(params: str = "params.yaml") -> dict:
    cfg, root = load(params)
    evaluation = read_report(root, "evaluate")
    if evaluation is None or "decision" not in evaluation:
        raise StageFailed("register needs reports/evaluate.json with a decision: run `vlgrpo evaluate` first")
    with stage_run("register", cfg, root) as run_id:
        link_mlflow_run("register", root, run_id)
        out = register_task(root, cfg, evaluation, run_id)
        log_report(write_report(root, "register", {**out, "mlflow_run_id": run_id}))
    state = "promoted to champion" if out["promoted"] else "kept as candidate"
    url = link_model_version(root, out["model_name"], out["version"])
    publish_result("register", "Registered model version", {
        "model": out["model_uri"], "aliases": "champion, candidate" if out["promoted"] else "candidate",
        "decision": state, "why": "; ".join(evaluation["decision"].get("reasons", [])),
        "reused an existing version": out.get("reused_version"), "MLflow model version": url})
    print(f"register: {out['model_uri']} {state}")
    return out


if __name__ == "__main__":
    register_flow()
