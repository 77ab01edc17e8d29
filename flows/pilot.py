"""`pilot` stage flow: a small GRPO run (params.yaml `pilot.overrides` over `train`) that gates the full run.

Run: `vlgrpo pilot`; under DVC: `dvc repro pilot`. Writes reports/pilot.json with the decision of
vlgrpo.eval.gates.pilot_passed() and its diagnoses; the flow FAILS when the gate does not pass, so nothing
downstream runs.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from prefect import flow

from flows.lineage import run_name

from tasks.artifacts import link_mlflow_run
from tasks.common import StageFailed, expected_failures, load, manifest_path, report_path, write_report
from tasks.grpo import grpo_task, publish_pilot, val_reward_task
from tasks.tracking import StreamForwarder, log_report, stage_run
from vlgrpo.train.paths import RunPaths


@flow(name="pilot", flow_run_name=run_name("pilot"), log_prints=True)
@expected_failures
def pilot_flow(params: str = "params.yaml") -> dict:
    from vlgrpo.eval.gates import pilot_passed

    cfg, root = load(params)
    pilot = dataclasses.replace(cfg, train=cfg.pilot.train_config(cfg.train))   # the full config, pilot's train
    metrics = report_path(root, "pilot_metrics", ".jsonl")
    metrics.unlink(missing_ok=True)  # a pilot is always a fresh run
    with stage_run("pilot", cfg, root) as run_id, tempfile.TemporaryDirectory(dir=root) as tmp:
        link_mlflow_run("pilot", root, run_id)
        with StreamForwarder(metrics, run_id):
            paths = RunPaths.under(root, manifest_path(cfg, root), cfg.base.out_dir, Path(tmp) / "pilot-model",
                                   metrics)
            summary = grpo_task(pilot, paths, "pilot-progress")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        val_reward = val_reward_task(pilot, root, manifest_path(cfg, root), Path(tmp) / "pilot-model")
        decision = dataclasses.asdict(pilot_passed(rows, cfg.pilot, cfg.train, full_steps=cfg.train.max_steps,
                                                   val_reward=val_reward, reward_weights=cfg.rewards.weights))
        decision["val_reward"] = val_reward
        report = {**decision, "train_summary": summary, "mlflow_run_id": run_id}
        log_report(write_report(root, "pilot", report))
        publish_pilot(decision)
    if decision.get("diagnoses"):
        print(f"pilot diagnoses (in full: {report_path(root, 'pilot')}):\n"
              + diagnosis_table(decision["diagnoses"]))
    if not decision["passed"]:  # the reasons are printed once, as the stage's error
        raise StageFailed("pilot gate did not pass: " + "; ".join(decision["reasons"])
                          + f" (see {report_path(root, 'pilot')})")
    print("pilot: passed; " + "; ".join(decision["reasons"]))
    return report


def diagnosis_table(diagnoses: list[dict], width: int = 60) -> str:
    """The pilot's diagnoses as a plain-text table (problem | evidence | remedy), cells cut to ``width``."""
    cols = ("problem", "evidence", "remedy")
    rows = [[_cut(str(d.get(c, "")), width) for c in cols] for d in diagnoses]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  " + "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


if __name__ == "__main__":
    pilot_flow()
