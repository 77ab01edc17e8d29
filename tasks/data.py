"""Tasks of the `data` and `validate` stages: thin adapters over vlgrpo.data and vlgrpo.data.validation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from vlgrpo.config import Config


# File I/O can hit a transient failure (full disk being cleaned, NFS hiccup): retry with backoff.
@task(name="build-dataset", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def build_dataset_task(cfg: Config, root: Path) -> dict[str, Any]:
    """Build the manifest. A dataset that cannot give one (no valid rows, an unreadable source: BuildError) is
    an expected outcome, returned as ``error`` for the flow to fail with - not raised, so it is neither
    retried nor logged with a traceback."""
    from vlgrpo.data.build import BuildError, build_dataset

    try:
        return build_dataset(cfg, root)
    except BuildError as e:
        return {"error": str(e)}


def summary_rows(result: Any) -> list[dict[str, Any]]:
    """The validation in numbers: rows, valid and error rows, expectations passed, then each check's count."""
    passed = sum(e["success"] for e in result.expectations)
    rows = [{"what": "verdict", "value": "OK" if result.ok else "FAILED"},
            {"what": "rows checked", "value": result.rows},
            {"what": "valid rows", "value": result.valid_rows},
            {"what": "rows with errors", "value": result.error_rows},
            {"what": "error fraction", "value": round(result.error_fraction, 6)},
            {"what": "expectations passed", "value": f"{passed}/{len(result.expectations)}"}]
    rows += [{"what": f"finding: {check}", "value": n} for check, n in sorted(result.counts.items())]
    return rows


@task(name="validate-dataset", cache_policy=NO_CACHE)
def validate_task(cfg: Config, data: Path, report: Path, docs: Path) -> dict[str, Any]:
    """Run the suite and publish the summary table as a Prefect artifact.

    Returns ``ok`` and, when not ok, the ``error`` the flow fails with: invalid data is an expected outcome
    of this task, not a crash, so it is returned rather than raised (no traceback in the logs).
    """
    from vlgrpo.data.validation import format_summary, validate_file

    try:
        result = validate_file(data, cfg, report_path=report, data_docs_dir=docs)
    except ValueError as e:  # the readers' channel for a missing or malformed document; names the file
        return {"ok": False, "summary": f"validate FAILED: {e}", "error": str(e)}
    create_table_artifact(table=summary_rows(result), key="validation-summary", description=f"Validation of {data}")
    out = {"ok": result.ok, "summary": format_summary(result), "report": str(report)}
    if not result.ok:
        out["error"] = (f"validation failed for {data}: {result.error_rows} of {result.rows} rows with errors, "
                        f"expectations {'passed' if result.suite_success else 'FAILED'}; see {report}")
    return out
