"""`validate` stage flow: the Great Expectations suite plus row-level checks over a manifest or raw file.

Run: `vlgrpo validate [--data FILE] [--report FILE]`; under DVC: `dvc repro validate`.
Exit status 1 (flow FAILED) when the error fraction exceeds validate.max_error_fraction.
"""
from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from tasks.common import load, manifest_path, report_path
from tasks.data import validate_task
from tasks.tracking import log_report, stage_run


@flow(name="validate", log_prints=True)
def validate_flow(params: str = "params.yaml", data: str | None = None, report: str | None = None) -> dict:
    cfg, root = load(params)
    data_path = Path(data) if data else manifest_path(cfg, root)
    report_file = Path(report) if report else report_path(root, "validate")
    docs = report_file.with_name(report_file.stem + "_docs") if cfg.validate.data_docs else None
    with stage_run("validate", cfg, root):
        try:
            out = validate_task(cfg, data_path, report_file, docs)
        finally:
            if report_file.exists():  # the findings are the point, also when validation fails
                log_report(report_file)
    print(out["summary"], file=sys.stderr)
    return out


if __name__ == "__main__":
    validate_flow()
