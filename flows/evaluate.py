"""`evaluate` stage flow: base vs candidate vs (registry) champion on the held-out test split.

Run: `vlgrpo evaluate`; under DVC: `dvc repro evaluate`. Writes reports/evaluate.json (DVC metrics),
reports/evaluate.md (the report a person reads), plots/ (PNG + CSV for `dvc plots show`), and the
promotion decision of vlgrpo.eval.gates.should_promote() that the `register` stage acts on.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.lineage import run_name

from tasks.artifacts import link_mlflow_run
from tasks.common import expected_failures, load, manifest_path, report_path, write_report
from tasks.tracking import log_report, stage_run


@flow(name="evaluate", flow_run_name=run_name("evaluate"), log_prints=True)
@expected_failures
def evaluate_flow(params: str = "params.yaml") -> dict:
    from tasks.evaluate import evaluate_task, log_evaluation

    cfg, root = load(params)
    with stage_run("evaluate", cfg, root) as run_id:
        link_mlflow_run("evaluate", root, run_id)
        result = evaluate_task(cfg, root, manifest_path(cfg, root), run_id)
        log_report(write_report(root, "evaluate", result))
        md = report_path(root, "evaluate", ".md")
        link = log_evaluation(run_id, root, manifest_path(cfg, root))
        create_markdown_artifact(markdown=md.read_text() + f"\n\nMLflow: {link}\n", key="evaluation-report",
                                 description="Evaluation: base vs candidate vs champion")
    d = result["decision"]
    print(f"evaluate: promote={d['promote']} ({'; '.join(d['reasons'])}); report {md}")
    return result


if __name__ == "__main__":
    evaluate_flow()
