"""`data` stage flow: build data/manifest.jsonl and the image cache from params.yaml `data`.

Run: `vlgrpo data` (or `python -m flows.data`); under DVC: `dvc repro data`.
"""
from __future__ import annotations


from prefect import flow

from flows.lineage import run_name

from tasks.artifacts import link_mlflow_run, publish_result
from tasks.common import StageFailed, expected_failures, load, write_report
from tasks.data import build_dataset_task
from tasks.tracking import log_report, stage_run


@flow(name="data", flow_run_name=run_name("data"), log_prints=True)
@expected_failures
def data_flow(params: str = "params.yaml") -> dict:
    cfg, root = load(params)
    with stage_run("data", cfg, root) as run_id:
        link_mlflow_run("data", root, run_id)
        summary = build_dataset_task(cfg, root)
        if "error" in summary:
            raise StageFailed(f"data: {summary['error']}")
        log_report(write_report(root, "data", {**summary, "mlflow_run_id": run_id}))
    publish_result("data", "Dataset built", {
        "source": summary.get("source"), "rows": summary.get("rows"), "input rows": summary.get("input_rows"),
        "splits": _counts(summary.get("splits")), "tasks": _counts(summary.get("tasks")),
        "images": summary.get("images"), "dropped (errors)": summary.get("dropped_errors"),
        "dropped (duplicates)": summary.get("dropped_duplicates"), "findings": len(summary.get("findings") or []),
        "manifest": summary.get("manifest")}, extra="Details: `reports/data.json`.")
    # The findings list can be long for a large raw import: it is in reports/data.json; print the counts.
    brief = {k: summary.get(k) for k in ("source", "rows", "splits", "tasks", "dropped_errors", "counts")}
    print(f"data: {brief} (details: reports/data.json)")
    return summary


def _counts(d: dict | None) -> str | None:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if d else None


if __name__ == "__main__":
    data_flow()
