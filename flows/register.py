"""`register` stage flow: log the candidate as an MLflow pyfunc model, register a version (alias
`candidate`) and move alias `champion` to it only when the evaluate stage's should_promote() said so.

Run: `vlgrpo register`; under DVC: `dvc repro register`. Manual promotion: `vlgrpo promote --version N
--reason "..."`.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.common import StageFailed, load, read_report, write_report
from tasks.tracking import log_report, stage_run


# Registry calls retry inside (tasks.tracking.retry, exponential backoff); the task adds one more round.
@task(name="register-candidate", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(root, cfg, evaluation: dict, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    from tasks.registry import champion_version, log_candidate, promote, register_version

    client = MlflowClient()
    name = cfg.register.model_name
    info = log_candidate(root, root / cfg.train.out_dir, cfg.data.min_pixels, cfg.data.max_pixels,
                         merge_lora=cfg.register.merge_lora)
    decision = evaluation["decision"]
    tags = {"evaluate.promote": str(decision["promote"]), "evaluate.reasons": "; ".join(decision["reasons"]),
            "evaluate.primary_metric": cfg.evaluate.primary_metric}
    version = register_version(client, name, info, run_id, tags)
    out = {"model_name": name, "version": version, "model_uri": f"models:/{name}/{version}",
           "promoted": False, "decision": decision}
    evaluated_against = evaluation.get("champion_version")
    current = champion_version(client, name)
    if decision["promote"] and current != evaluated_against:
        # The champion moved after evaluation (e.g. a manual promotion): the comparison is stale.
        out["reasons"] = [f"champion changed since evaluation ({evaluated_against} -> {current}); "
                          f"re-run evaluate before promoting"]
    elif decision["promote"]:
        out["promotion"] = promote(client, name, version, reason="; ".join(decision["reasons"]),
                                   by="vlgrpo register (should_promote)")
        out["promoted"] = True
    return out


@flow(name="register", log_prints=True)
def register_flow(params: str = "params.yaml") -> dict:
    cfg, root = load(params)
    evaluation = read_report(root, "evaluate")
    if evaluation is None or "decision" not in evaluation:
        raise StageFailed("register needs reports/evaluate.json with a decision: run `vlgrpo evaluate` first")
    with stage_run("register", cfg, root) as run_id:
        out = register_task(root, cfg, evaluation, run_id)
        log_report(write_report(root, "register", {**out, "mlflow_run_id": run_id}))
    state = "promoted to champion" if out["promoted"] else "kept as candidate"
    print(f"register: {out['model_uri']} {state}")
    return out


if __name__ == "__main__":
    register_flow()
