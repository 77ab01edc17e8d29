"""`validate` stage flow: the Great Expectations suite plus row-level checks over the project's manifest.

Run: `vlgrpo validate`; under DVC: `dvc repro validate`. Exit status 1 (flow run Failed, with the reason and
no traceback) when the error fraction exceeds validate.max_error_fraction or the suite fails.
A standalone check of any file, anywhere (no project, no Prefect or MLflow run): `vlgrpo validate --data FILE`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from tasks.common import StageFailed, expected_failures, load, manifest_path, report_path
from tasks.data import validate_task
from tasks.tracking import log_files, log_report, stage_run


@flow(name="validate", log_prints=True)
@expected_failures
def validate_flow(params: str = "params.yaml", data: str | None = None, report: str | None = None) -> dict:
    cfg, root = load(params)
    data_path = Path(data) if data else manifest_path(cfg, root)
    report_file = Path(report) if report else report_path(root, "validate")
    docs = report_file.with_name(report_file.stem + "_docs") if cfg.validate.data_docs else None
    with stage_run("validate", cfg, root) as run_id:
        try:
            out = validate_task(cfg, data_path, report_file, docs)
        finally:
            if report_file.exists():  # the findings are the point, also when validation fails
                log_report(report_file)
            if docs is not None and docs.is_dir():  # Great Expectations' data docs, browsable in MLflow
                log_files(run_id, {docs: "data_docs"})
    print(out["summary"], file=sys.stderr)
    if not out["ok"]:
        raise StageFailed(out["error"])
    return out


if __name__ == "__main__":
    validate_flow()
