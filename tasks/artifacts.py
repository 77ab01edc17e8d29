"""Prefect artifacts of the stages: what each stage produced, and links to its MLflow run and model version.

Every stage flow run gets a link artifact ``mlflow-run`` to its MLflow run and a ``<stage>-result`` artifact
with the stage's numbers (validation counts and expectations, the training metrics, ...). The MLflow UI
address is the tracking server's when MLflow logs to one; with the local SQLite store it is what
``mlflow ui --backend-store-uri sqlite:///<project>/mlflow.db`` serves by default (http://127.0.0.1:5000).
Outside a Prefect flow run nothing is published.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import quote

log = logging.getLogger("vlgrpo.artifacts")
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
F = TypeVar("F", bound=Callable[..., Any])


def best_effort(fn: F) -> F:
    """An artifact is a view of results kept elsewhere (reports/, MLflow): a Prefect or MLflow server that
    is away at that moment must not fail a stage whose work is done. The failure is logged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - network and server errors come in many types
            log.warning("Prefect artifact not published (%s): %s", fn.__name__, e)
            return None

    return wrapper  # type: ignore[return-value]


def in_flow_run() -> bool:
    from prefect.runtime import flow_run

    return bool(flow_run.id)


def mlflow_ui(root: Path) -> str:
    """Where the MLflow UI of this project's runs is."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri(root)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI


def mlflow_run_url(root: Path, experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui(root)}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_model_version_url(root: Path, name: str, version: str | int) -> str:
    return f"{mlflow_ui(root)}/#/models/{quote(name, safe='')}/versions/{version}"


def _how_to_open(root: Path) -> str:
    from tasks.tracking import tracking_uri

    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return f"MLflow tracking server {uri}"
    return f"open it with `mlflow ui --backend-store-uri {uri}`"


@best_effort
def link_mlflow_run(stage: str, root: Path, run_id: str) -> str | None:
    """A Prefect link artifact (key ``mlflow-run``) to the stage's MLflow run; returns the URL."""
    if not in_flow_run():
        return None
    import mlflow
    from prefect.artifacts import create_link_artifact

    from tasks.tracking import retry

    run = retry(lambda: mlflow.get_run(run_id), what="read the run")
    url = mlflow_run_url(root, run.info.experiment_id, run_id)
    create_link_artifact(link=url, link_text=f"MLflow run `{run.info.run_name}` ({run_id[:8]})", key="mlflow-run",
                         description=f"The {stage} stage's MLflow run; {_how_to_open(root)}")
    return url


@best_effort
def link_model_version(root: Path, name: str, version: str | int) -> str | None:
    """A Prefect link artifact (key ``mlflow-model-version``) to a registered model version."""
    if not in_flow_run():
        return None
    from prefect.artifacts import create_link_artifact

    url = mlflow_model_version_url(root, name, version)
    create_link_artifact(link=url, link_text=f"{name} version {version}", key="mlflow-model-version",
                         description=f"The registered model version; {_how_to_open(root)}")
    return url


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


@best_effort
def publish_result(stage: str, title: str, facts: dict[str, Any], extra: str = "") -> None:
    """A Prefect markdown artifact ``<stage>-result``: a title, a two-column table of facts, more markdown."""
    if not in_flow_run():
        return
    from prefect.artifacts import create_markdown_artifact

    table = markdown_table(({"what": k, "value": v} for k, v in facts.items() if v is not None), ["what", "value"])
    create_markdown_artifact(markdown=f"## {title}\n\n{table}\n\n{extra}".rstrip() + "\n", key=f"{stage}-result",
                             description=title)


# The train stage's table: these columns of reports/train_metrics.jsonl, when the run logged them.
# Each reward's own mean (rewards/<name>/mean) follows the total reward.
TRAIN_COLUMNS = ["reward", "reward_std", "frac_reward_zero_std", "kl", "loss", "entropy", "grad_norm",
                 "learning_rate", "completions/mean_length", "clip_ratio/region_mean", "eval/accuracy",
                 "eval/reward"]


def train_metrics_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: first, last, min, max and mean over the steps that logged it."""
    out = []
    per_reward = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    wanted = TRAIN_COLUMNS[:3] + per_reward + TRAIN_COLUMNS[3:]
    names = [c for c in wanted if any(isinstance(r.get(c), (int, float)) for r in rows)]
    for name in names:
        pts = [(r.get("step"), float(r[name])) for r in rows
               if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
        vals = [v for _, v in pts if v == v]
        if not vals:
            continue
        out.append({"metric": name, "steps": len(vals), "first": vals[0], "last": vals[-1], "min": min(vals),
                    "max": max(vals), "mean": sum(vals) / len(vals)})
    return out


@best_effort
def publish_train_metrics(rows: list[dict[str, Any]], run_url: str | None) -> None:
    """The train stage's ``train-metrics`` table artifact (first/last/min/max/mean per metric)."""
    if not in_flow_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    table = train_metrics_summary(rows)
    create_table_artifact(table=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in table], key="train-metrics",
                          description=f"Training metrics over {len(rows)} steps (per step in MLflow"
                                      + (f": {run_url})" if run_url else ")"))
