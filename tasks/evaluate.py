"""Task of the `evaluate` stage: a thin adapter over vlgrpo.eval.evaluate with the registry's champion loader."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import report_path
from tasks.registry import champion_loader
from tasks.tracking import retry
from vlgrpo.config import Config
from vlgrpo.io import under_root


@task(name="evaluate-models", retries=0, cache_policy=NO_CACHE)
def evaluate_task(cfg: Config, root: Path, manifest: Path, run_id: str) -> dict[str, Any]:
    from vlgrpo.eval.evaluate import evaluate_models
    from vlgrpo.model.loading import load_model
    from vlgrpo.eval.report import metrics_only, write_evaluation_outputs

    champion = retry(lambda: champion_loader(cfg.register.model_name), what="look up champion")
    models = {"base": lambda: load_model(under_root(root, cfg.base.out_dir)),
              "candidate": lambda: load_model(under_root(root, cfg.train.out_dir)),
              "champion": champion}
    result = evaluate_models(cfg, manifest, models, progress=True, root=root)
    write_evaluation_outputs(result, root, manifest, train_metrics=report_path(root, "train_metrics", ".jsonl"),
                             n_samples=cfg.evaluate.report_samples)
    # register checks the champion did not move between this comparison and the promotion.
    return {**metrics_only(result), "champion_version": getattr(champion, "version", None),
            "mlflow_run_id": run_id}
