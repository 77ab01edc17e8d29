"""`pilot` stage flow: a small GRPO run (params.yaml `pilot.overrides` over `train`) that gates the full run.

Run: `vlgrpo pilot`; under DVC: `dvc repro pilot`. Writes reports/pilot.json with the decision of
vlgrpo.gates.pilot_passed() and its diagnoses; the flow FAILS when the gate does not pass, so nothing
downstream runs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from prefect import flow

from tasks.common import StageFailed, load, manifest_path, report_path, write_report
from tasks.model import grpo_task, publish_pilot, val_reward_task
from tasks.tracking import StreamForwarder, log_report, stage_run
from vlgrpo.train.paths import RunPaths


@flow(name="pilot", log_prints=True)
def pilot_flow(params: str = "params.yaml") -> dict:
    from vlgrpo.gates import pilot_passed

    cfg, root = load(params)
    pilot_cfg = cfg.pilot.train_config(cfg.train)
    metrics = report_path(root, "pilot_metrics", ".jsonl")
    metrics.unlink(missing_ok=True)  # a pilot is always a fresh run
    with stage_run("pilot", cfg, root) as run_id, tempfile.TemporaryDirectory(dir=root) as tmp:
        with StreamForwarder(metrics, run_id):
            paths = RunPaths.under(root, manifest_path(cfg, root), cfg.base.out_dir, Path(tmp) / "pilot-model",
                                   metrics)
            summary = grpo_task(dataclasses.replace(cfg, train=pilot_cfg), paths, "pilot-progress")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        val_reward = val_reward_task(cfg, pilot_cfg, manifest_path(cfg, root), Path(tmp) / "pilot-model", root)
        decision = dataclasses.asdict(pilot_passed(rows, cfg.pilot, cfg.train, full_steps=cfg.train.max_steps,
                                                   val_reward=val_reward, reward_weights=cfg.rewards.weights))
        decision["val_reward"] = val_reward
        report = {**decision, "train_summary": summary, "mlflow_run_id": run_id}
        log_report(write_report(root, "pilot", report))
        publish_pilot(decision)
    print(f"pilot: {'passed' if decision['passed'] else 'FAILED'}; " + "; ".join(decision["reasons"]))
    if not decision["passed"]:
        raise StageFailed("pilot gate did not pass: " + "; ".join(decision["reasons"])
                          + f" (see {report_path(root, 'pilot')})")
    return report


if __name__ == "__main__":
    pilot_flow()
