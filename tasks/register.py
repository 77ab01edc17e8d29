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

    from tasks.registry import champion_version, promote, promotion_record, register_candidate

    client = MlflowClient()
    name = cfg.register.model_name
    decision = evaluation["decision"]
    tags = {"evaluate.promote": str(decision["promote"]), "evaluate.reasons": "; ".join(decision["reasons"]),
            "evaluate.primary_metric": cfg.evaluate.primary_metric}
    # Idempotent: a version an interrupted run created for these same files is finished, not duplicated.
    version, reused = register_candidate(client, name, root, under_root(root, cfg.train.out_dir), run_id, tags,
                                         (cfg.data.min_pixels, cfg.data.max_pixels), cfg.register.merge_lora,
                                         cfg.register.serving)
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
