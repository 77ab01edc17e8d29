"""The `pipeline` flow: data → validate → base → pilot (gate) → train → evaluate → register (gate).

Run: `vlgrpo pipeline` (in-process, every stage) or `vlgrpo repro` / `make pipeline` (through `dvc repro`,
which runs only stages whose inputs changed). A scheduled Prefect deployment (prefect.yaml, `vlgrpo serve`)
runs this flow. One MLflow parent run per execution; each stage is a nested run. A failing stage or gate
fails the flow with its reason; earlier outputs and the registry stay as they were.
"""
from __future__ import annotations

from prefect import flow

from flows.base import base_flow
from flows.data import data_flow
from flows.evaluate import evaluate_flow
from flows.lineage import run_name
from flows.pilot import pilot_flow
from flows.register import register_flow
from flows.train import train_flow
from flows.validate import validate_flow
from tasks.artifacts import link_mlflow_run
from tasks.common import expected_failures, load
from tasks.tracking import pipeline_run
from vlgrpo.io import project_lock


@flow(name="pipeline", flow_run_name=run_name("pipeline"), log_prints=True)
@expected_failures
def pipeline_flow(params: str = "params.yaml", force_train: bool = False) -> dict:
    cfg, root = load(params)
    with project_lock(root, "pipeline"), pipeline_run(cfg, root) as run_id:
        link_mlflow_run("pipeline", root, run_id)
        data_flow(params)
        validate_flow(params)
        base_flow(params)
        if not force_train:
            pilot_flow(params)
        train_flow(params, force=force_train)
        evaluate_flow(params)
        out = register_flow(params)
    return {"mlflow_parent_run_id": run_id, **out}


if __name__ == "__main__":
    pipeline_flow()
