"""`base` stage flow: load the configured Qwen-VL checkpoint, or build and warm-start the tiny offline one.

Run: `vlgrpo base`; under DVC: `dvc repro base`. Writes models/base/ and reports/base.json.
"""
from __future__ import annotations

from prefect import flow

from flows.lineage import run_name

from tasks.artifacts import link_mlflow_run, publish_result
from tasks.common import expected_failures, load, manifest_path, write_report
from tasks.base import base_task
from tasks.tracking import log_report, stage_run


@flow(name="base", flow_run_name=run_name("base"), log_prints=True)
@expected_failures
def base_flow(params: str = "params.yaml") -> dict:
    cfg, root = load(params)
    with stage_run("base", cfg, root) as run_id:
        link_mlflow_run("base", root, run_id)
        report = base_task(cfg, root, manifest_path(cfg, root))
        log_report(write_report(root, "base", {**report, "mlflow_run_id": run_id}))
    publish_result("base", "Base model", {
        "model": report.get("model"), "written to": report.get("out_dir"), "parameters": report.get("params"),
        "val accuracy": report.get("val_accuracy"), "val items": report.get("val_items"),
        "warm-start steps": report.get("steps"), "final warm-start loss": report.get("final_loss"),
        "seconds": report.get("seconds")})
    print(f"base: val accuracy {report.get('val_accuracy')}")
    return report


if __name__ == "__main__":
    base_flow()
