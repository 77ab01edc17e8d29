"""Task of the `register` stage: log the candidate, register a version, move `champion` when evaluate said so."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import StageFailed
from vlgrpo.config import Config
from vlgrpo.io import under_root


# Registry calls retry inside (tasks.tracking.retry, exponential backoff); the task adds one more round.
@task(name="register-candidate", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(root: Path, cfg: Config, evaluation: dict, run_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from tasks.common import read_report
    from tasks.registry import champion_version, promote, promotion_record, register_candidate

    client = MlflowClient()
    name = cfg.register.model_name
    decision = evaluation["decision"]
    metrics = evaluation_metrics(evaluation)
    tags = {"evaluate.promote": str(decision["promote"]), "evaluate.reasons": "; ".join(decision["reasons"]),
            "evaluate.primary_metric": cfg.evaluate.primary_metric,
            **{f"evaluate.{k}": f"{v:.6g}" for k, v in metrics.items()}}
    train = read_report(root, "train") or {}
    # Idempotent: a version an interrupted run created for these same files is finished, not duplicated.
    version, reused = register_candidate(
        client, name, root, under_root(root, cfg.train.out_dir), run_id, tags,
        (cfg.data.min_pixels, cfg.data.max_pixels), cfg.register.merge_lora,
        source_run_id=_existing_run(client, train.get("mlflow_run_id")), metrics=metrics,
        description=version_description(cfg, evaluation, train, metrics), serving=cfg.register.serving)
    out = {"model_name": name, "version": version, "model_uri": f"models:/{name}/{version}",
           "promoted": False, "decision": decision, "reused_version": reused}
    evaluated_against = evaluation.get("champion_version")
    current = champion_version(client, name)
    done = promotion_record(client, name, version) if decision["promote"] and reused else None
    if done is not None:  # an interrupted run got as far as moving the alias: record it, do not redo it
        out["promotion"], out["promoted"] = done, True
    elif decision["promote"] and current != evaluated_against:
        # The champion moved after evaluation (e.g. a manual promotion): the comparison is stale.
        out["reasons"] = [f"champion changed since evaluation ({evaluated_against} -> {current}); "
                          f"re-run evaluate before promoting"]
    elif decision["promote"]:
        out["promotion"] = promote(client, name, version, reason="; ".join(decision["reasons"]),
                                   by="vlgrpo register (should_promote)")
        out["promoted"] = True
    return out


def _existing_run(client: Any, run_id: str | None) -> str | None:
    """``run_id`` when that run is in this tracking store (a train report copied from elsewhere names a run
    that is not), else None; an outage raises (the task's retry)."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import retry

    if not run_id:
        return None

    def probe() -> str | None:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    return retry(probe, what="read train run")


def evaluation_metrics(evaluation: dict) -> dict[str, float]:
    """The evaluation's headline test metrics of the candidate (``test_<metric>``), its paired difference
    to base and to the champion, and the base model's, as the version and its logged model carry them."""
    out: dict[str, float] = {}
    for name in evaluation.get("metrics", []):
        for block, key in (("candidate", f"test_{name}"), ("base", f"base_test_{name}"),
                           ("delta_vs_base", f"test_{name}_minus_base"),
                           ("delta_vs_champion", f"test_{name}_minus_champion")):
            v = (evaluation.get(block) or {}).get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                out[key] = float(v)
    return out


def version_description(cfg: Config, evaluation: dict, train: dict, metrics: dict[str, float]) -> str:
    """What the version is, in the words a registry page shows: base model, training, evaluation, decision."""
    d = evaluation.get("decision", {})
    base = f"`{cfg.base.model}`" if cfg.base.model else "the tiny offline model the base stage built"
    lines = [f"GRPO-tuned from {base} ({train.get('steps', '?')} steps"
             + (f", train run {train['mlflow_run_id']}" if train.get("mlflow_run_id") else "") + ")."]
    primary = cfg.evaluate.primary_metric
    if f"test_{primary}" in metrics:
        line = f"Test {primary}: {metrics[f'test_{primary}']:.3f}"
        if f"base_test_{primary}" in metrics:
            line += f" (base {metrics[f'base_test_{primary}']:.3f})"
        lines.append(line + f" on {evaluation.get('n_items', '?')} held-out items.")
    if d:
        lines.append(f"Decision: {'promote' if d.get('promote') else 'do not promote'}"
                     f"{' (against the ' + d['against'] + ')' if d.get('against') else ''}: "
                     + "; ".join(d.get("reasons", [])))
    return "\n\n".join(lines)


def promote_by_hand(cfg: Config, root: Path, name: str, version: str, reason: str) -> dict[str, Any]:
    """`vlgrpo promote`: move ``champion`` to an existing, READY version; a refusal is a StageFailed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.registry import promote
    from tasks.tracking import setup

    setup(root, cfg.register.experiment)
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, version)  # one attempt: a missing version is not an outage
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StageFailed(f"refusing to promote {name} version {version}: no such registered version") from None
    if mv.status != "READY":
        raise StageFailed(f"refusing to promote {name} version {version}: registration status is {mv.status}")
    return promote(client, name, version, reason, by=None)
