"""`train` stage flow: full-scale GRPO from models/base to models/candidate.

Run: `vlgrpo train [--force]`; under DVC: `dvc repro train`. Refuses to start unless reports/pilot.json
says the pilot passed (`--force` overrides; recorded in reports/train.json and the MLflow run). With
`pilot.auto_adjust: true` the pilot's remedies (relative: "learning rate x0.5") are applied to the values
params.yaml gives now, and the MLflow run logs the values it trains with (tag `auto_adjust_changes`: what
changed, from what to what). A killed run resumes from its last complete checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.lineage import run_name

from tasks.artifacts import link_mlflow_run, publish_train_metrics
from tasks.common import (StageFailed, expected_failures, load, manifest_path, read_report, report_path,
                          write_report)
from tasks.grpo import grpo_task
from tasks.tracking import StreamForwarder, log_report, stage_run
from vlgrpo.train.paths import RunPaths


@flow(name="train", flow_run_name=run_name("train"), log_prints=True)
@expected_failures
def train_flow(params: str = "params.yaml", force: bool = False) -> dict:
    from vlgrpo.eval.gates import PilotDecision, apply_adjustments

    cfg, root = load(params)
    pilot = read_report(root, "pilot")
    if not force and not (pilot and pilot.get("passed")):
        why = "no pilot report (run `vlgrpo pilot` first)" if pilot is None else \
            "the pilot did not pass: " + "; ".join(pilot.get("reasons", []))
        raise StageFailed(f"train refuses to start: {why}. Fix it, or pass --force to override (recorded).")
    changes: list[str] = []
    if cfg.pilot.auto_adjust and pilot:
        known = {f for f in PilotDecision.__dataclass_fields__}
        # the remedies scale the values params.yaml gives now; cfg is the one config the run uses from here
        try:
            cfg, changes = apply_adjustments(cfg, PilotDecision(**{k: v for k, v in pilot.items() if k in known}))
        except ValueError as e:                 # e.g. an absolute remedy in an old pilot report
            raise StageFailed(f"train refuses to start: {e}") from None
    metrics = report_path(root, "train_metrics", ".jsonl")
    tags = {"forced": str(force), "auto_adjust_changes": "; ".join(changes) or "none"}
    with stage_run("train", cfg, root, tags=tags) as run_id:      # params: the effective values
        url = link_mlflow_run("train", root, run_id)
        with StreamForwarder(metrics, run_id):
            paths = RunPaths.under(root, manifest_path(cfg, root), cfg.base.out_dir, cfg.train.out_dir, metrics)
            summary = grpo_task(cfg, paths, "train-progress")
        report = {**summary, "forced": force, "pilot_passed": bool(pilot and pilot.get("passed")),
                  "auto_adjust_changes": changes, "mlflow_run_id": run_id}
        log_report(write_report(root, "train", report))
        publish_train_metrics(_rows(metrics), url)
    for flag in (summary.get("watch") or {}).get("flags", []):
        print(f"train: watch flagged {flag['kind']}: {flag['message']}")
    if (summary.get("watch") or {}).get("stopped"):
        print(f"train: stopped early at step {summary['watch']['stopped']['at_step']} (train.watch.stop_on); "
              f"final model: {summary['watch'].get('final_model')}")
    final = (summary.get("final") or {}).get("reward")
    print(f"train: {summary.get('steps')} steps; final reward "
          + (f"{final:.4f}" if final is not None else "none (no step ran)"))
    return report


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    train_flow()
