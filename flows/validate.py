"""`validate` stage flow: the Great Expectations suite plus row-level checks over the project's manifest.

Run: `vlgrpo validate`; under DVC: `dvc repro validate`. Exit status 1 (flow run Failed, with the reason and
no traceback) when the error fraction exceeds validate.max_error_fraction or the suite fails.
A standalone check of any file, anywhere (no project, no Prefect or MLflow run): `vlgrpo validate --data FILE`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow

from flows.lineage import run_name

from tasks.artifacts import best_effort, link_mlflow_run, markdown_table, publish_result
from tasks.common import StageFailed, expected_failures, load, manifest_path, report_path
from tasks.data import validate_task
from tasks.tracking import log_files, log_report, stage_run


@flow(name="validate", flow_run_name=run_name("validate"), log_prints=True)
@expected_failures
def validate_flow(params: str = "params.yaml", data: str | None = None, report: str | None = None) -> dict:
    cfg, root = load(params)
    data_path = Path(data) if data else manifest_path(cfg, root)
    report_file = Path(report) if report else report_path(root, "validate")
    docs = report_file.with_name(report_file.stem + "_docs") if cfg.validate.data_docs else None
    with stage_run("validate", cfg, root) as run_id:
        url = link_mlflow_run("validate", root, run_id)
        try:
            out = validate_task(cfg, data_path, report_file, docs)
        finally:
            if report_file.exists():  # the findings are the point, also when validation fails
                log_report(report_file)
            if docs is not None and docs.is_dir():  # Great Expectations' data docs, browsable in MLflow
                log_files(run_id, {docs: "data_docs"})
    publish_validation(report_file, docs, url)
    print(out["summary"], file=sys.stderr)
    if not out["ok"]:
        raise StageFailed(out["error"])
    return out


@best_effort
def publish_validation(report_file: Path, docs: Path | None, mlflow_url: str | None) -> None:
    """The ``validate-result`` artifact: the counts, every expectation with its outcome, where the docs are."""
    if not report_file.exists():
        return
    r = json.loads(report_file.read_text())
    exps = r.get("expectations") or []
    rows = [{"expectation": e["expectation"], "column": (e.get("kwargs") or {}).get("column", ""),
             "passed": "yes" if e["success"] else "NO", "unexpected rows": e.get("unexpected_count")}
            for e in exps]
    where = []
    if docs is not None and (docs / "index.html").exists():
        where.append(f"Great Expectations Data Docs: [{docs / 'index.html'}]({(docs / 'index.html').as_uri()})"
                     " (open the file in a browser; it works offline)")
        if mlflow_url:
            where.append(f"The same pages in MLflow: [the validate run's artifacts]({mlflow_url}/artifacts), "
                         "folder `data_docs/`")
    publish_result("validate", f"Validation {'OK' if r.get('ok') else 'FAILED'}: {r.get('input')}", {
        "rows checked": r.get("rows"), "valid rows": r.get("valid_rows"), "rows with errors": r.get("error_rows"),
        "error fraction": r.get("error_fraction"),
        "expectations passed": f"{sum(e['success'] for e in exps)}/{len(exps)}",
        **{f"finding: {k}": v for k, v in (r.get("counts") or {}).items()}},
        extra=markdown_table(rows, ["expectation", "column", "passed", "unexpected rows"]) + "\n\n"
        + "\n\n".join(where))


if __name__ == "__main__":
    validate_flow()
