"""Task of the `evaluate` stage: a thin adapter over vlgrpo.eval.evaluate with the registry's champion loader,
and what the evaluate run shows in MLflow (``log_evaluation``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import read_report, report_path
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
    # What the training watch flagged goes into the report a person reads (reports/train.json: watch).
    flags = ((read_report(root, "train") or {}).get("watch") or {}).get("flags") or []
    write_evaluation_outputs(result, root, manifest, train_metrics=report_path(root, "train_metrics", ".jsonl"),
                             n_samples=cfg.evaluate.report_samples, train_flags=flags)
    # register checks the champion did not move between this comparison and the promotion.
    return {**metrics_only(result), "champion_version": getattr(champion, "version", None),
            "mlflow_run_id": run_id}


SAMPLES_TABLE = "evaluation/samples.json"


def log_evaluation(run_id: str, root: Path, manifest: Path) -> str:
    """Log the evaluation report to the evaluate run as MLflow shows it; returns where the run is.

    - ``reports/evaluate.html``: the report with its pictures embedded (MLflow's artifact viewer shows it);
    - ``reports/evaluate.md`` with ``reports/evaluate_assets/`` and ``plots/`` at the same relative places as
      in the project, so the markdown's image links resolve inside the run's artifacts too;
    - ``evaluation/samples.json``: every evaluated item as an MLflow table (image, question, reference, each
      model's answer and whether it is right), browsable in the run's Evaluation / artifact views.
    """
    from tasks.tracking import log_files

    reports = root / "reports"
    files = {reports / "evaluate.md": "reports", reports / "evaluate.html": "reports", root / "plots": "plots"}
    if (reports / "evaluate_assets").is_dir():
        files[reports / "evaluate_assets"] = "reports/evaluate_assets"
    where = log_files(run_id, {p: d for p, d in files.items() if p.exists()})
    items = reports / "evaluate_items.jsonl"
    if items.exists():
        table = samples_table(items, manifest)
        if table is not None:
            from mlflow.tracking import MlflowClient

            retry(lambda: MlflowClient().log_table(run_id, data=table, artifact_file=SAMPLES_TABLE),
                  what="log samples table")
    return where


def samples_table(items_path: Path, manifest: Path, thumb_px: int = 96) -> Any:
    """``reports/evaluate_items.jsonl`` as a DataFrame for ``log_table``: a thumbnail (``mlflow.Image``) and
    the text columns per item; None when there are no items."""
    import json

    import mlflow
    import pandas as pd
    from PIL import Image

    from vlgrpo.data.manifest import resolve_image

    rows = []
    for line in items_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        it = json.loads(line)
        row: dict[str, Any] = {"id": it.get("id"), "task": it.get("task"), "question": it.get("question"),
                               "reference": it.get("solution") or "; ".join((it.get("references") or [])[:2])}
        image = None
        if it.get("images"):
            try:
                with Image.open(resolve_image(manifest, it["images"][0])) as im:
                    im = im.convert("RGB")
                    im.thumbnail((thumb_px, thumb_px))
                    image = mlflow.Image(im)
            except (OSError, ValueError):  # an unreadable image leaves its cell empty, the row stays
                image = None
        row["image"] = image
        for model, answer in (it.get("answers") or {}).items():
            row[f"{model}_answer"] = answer
            row[f"{model}_correct"] = (it.get("correct") or {}).get(model)
        rows.append(row)
    return pd.DataFrame(rows) if rows else None
