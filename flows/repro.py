"""`vlgrpo repro` (make pipeline): `dvc repro` as one pipeline execution in MLflow and in Prefect.

Run: `vlgrpo repro [dvc repro args]`. The `pipeline @ <commit>` flow run opened here is the parent of every
stage DVC runs (flows/lineage.py); the MLflow parent run opened inside it is the parent of every stage's
MLflow run, and each side links to the other (MLflow tags ``prefect.flow_run_id`` / ``prefect.flow_run_url``,
Prefect link artifact ``mlflow-run``). A failing stage fails this flow run with dvc's exit status.
"""
from __future__ import annotations

from prefect import flow

from flows.dvc_run import dvc_repro
from flows.lineage import export_parent, pipeline_tags, restore, run_name
from tasks.common import STAGES, StageFailed, expected_failures, load, read_report


@flow(name="pipeline", flow_run_name=run_name("pipeline"), log_prints=True)
@expected_failures
def repro_flow(params: str = "params.yaml", dvc_args: list[str] | None = None) -> dict:
    from prefect.runtime import flow_run

    from tasks.artifacts import link_mlflow_run, publish_result
    from tasks.tracking import pipeline_run

    cfg, root = load(params)
    old = export_parent(str(flow_run.id), pipeline_tags(params))
    try:
        with pipeline_run(cfg, root) as run_id:
            url = link_mlflow_run("pipeline", root, run_id)
            rc = dvc_repro(root, list(dvc_args or []))
            if rc != 0:
                raise StageFailed(f"dvc repro failed (exit {rc}); earlier outputs and the registry are unchanged")
    finally:
        restore(old)
    register = read_report(root, "register") or {}
    publish_result("pipeline", "Pipeline execution", {
        "MLflow parent run": url, "stages run": ", ".join(_stages_run(flow_run.id)) or "none (all up to date)",
        "registered version (latest register stage)": register.get("model_uri"),
        "promoted to champion": register.get("promoted")})
    return {"mlflow_parent_run_id": run_id, "dvc_exit": rc}


def _stages_run(flow_run_id: str) -> list[str]:
    """The stages DVC ran in this execution: the subflow runs under this flow run, in the pipeline's order."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    except Exception:  # noqa: BLE001 - only the summary artifact needs it
        return []
    names = {t.name.split(" @ ")[0] for t in runs}
    return [s for s in STAGES if s in names]
