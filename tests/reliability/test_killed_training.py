"""Killed training: `kill -9` of the real `vlgrpo train` stage right after its first checkpoint; running the
stage again resumes from that checkpoint and ends with the same weights and the same metrics stream as an
uninterrupted run (CPU, fp32). A partial or unreadable checkpoint is never loaded.

(tests/slow/test_resume.py covers the trainer module alone; here the fault hits the whole stage process -
Prefect flow, MLflow run, metrics forwarder - and the re-run goes through the same CLI.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.project import run
from tests.reliability.conftest import VLGRPO, kill9, spawn, wait_for
from tests.reliability.slow_training import SLOW, add_slow_reward
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.checkpoint import CHECKPOINT_DIR, STATE_FILE, latest_checkpoint

pytestmark = pytest.mark.reliability
# Wall-clock measurements differ between runs by nature; everything else must match exactly.
TIMING = {"samples_per_s", "tokens_per_s", "step_time_s", "time/encode_s", "time/generate_s",
          "time/rewards_s", "time/score_s", "time/update_s"}


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def _train_in_process(root: Path, out: str, metrics: str, stop_after: int | None = None) -> dict:
    from vlgrpo.config import load_config

    cfg = load_config(root / "params.yaml")
    return train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", out, metrics),
                        progress=False, stop_after=stop_after)


@pytest.fixture(scope="module")
def reference(ready_project, tmp_path_factory) -> tuple[list[dict], dict]:
    """The uninterrupted run: its metrics stream and final weights."""
    root = tmp_path_factory.mktemp("ref") / "proj"
    shutil.copytree(ready_project, root)
    # The slow reward (it scores 0: the same numbers) is in every run here, so the killed one can be slowed.
    add_slow_reward(root)
    s = _train_in_process(root, "models/ref", "reports/ref.jsonl")
    assert s["finished"] and s["resumed_from"] is None
    return _metrics(root / "reports/ref.jsonl"), load_file(root / "models/ref/model.safetensors")


def _assert_equal_to_reference(reference, metrics: Path, weights: Path) -> None:
    ref_metrics, ref_weights = reference
    got = _metrics(metrics)
    assert [r["step"] for r in got] == [1, 2, 3, 4]          # none lost, none doubled
    assert got == ref_metrics
    w = load_file(weights)
    assert w.keys() == ref_weights.keys()
    for k in ref_weights:
        assert torch.equal(w[k], ref_weights[k]), k


def test_sigkilled_train_stage_resumes_and_matches_uninterrupted_run(project, reference, tmp_path, cli_env):
    candidate = project / "models/candidate"
    log = tmp_path / "killed.log"
    add_slow_reward(project)
    # Slowed to a second a step, so the kill lands between step-2's checkpoint and step 3's end on any machine.
    proc = spawn([VLGRPO, "train", "--force"], project, log, **SLOW, **cli_env)
    try:
        wait_for(lambda: latest_checkpoint(candidate) is not None, 600, proc, log, poll=0.02)
    finally:
        kill9(proc)                          # the stage, its Prefect server and everything in its group
    assert proc.returncode == -9, "the stage ended before it could be killed"
    assert latest_checkpoint(candidate).name == "step-2"
    assert not (candidate / "model.safetensors").exists()    # no final model from the killed run
    assert not (project / "reports/train.json").exists()

    p = run([VLGRPO, "train", "--force"], project, timeout=600, **cli_env)
    report = json.loads((project / "reports/train.json").read_text())
    assert report["resumed_from"] == 2 and report["finished"] and report["steps"] == 4, p.stdout[-2000:]
    _assert_equal_to_reference(reference, project / "reports/train_metrics.jsonl",
                               candidate / "model.safetensors")

    # The resumed stage's MLflow run holds every step exactly once.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    history = client.get_metric_history(report["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


def test_partial_and_unreadable_checkpoints_are_never_loaded(project, reference, capfd):
    add_slow_reward(project)                                 # the reference's reward set-up
    out = project / "models/candidate"
    s = _train_in_process(project, "models/candidate", "reports/train_metrics.jsonl", stop_after=3)
    assert not s["finished"] and latest_checkpoint(out).name == "step-2"
    ckpts = out / CHECKPOINT_DIR
    good = ckpts / "step-2"

    # A writer killed before its rename leaves a hidden temp dir (complete-looking, newer step number).
    tmp = ckpts / ".step-4.k1ll3d.tmp"
    shutil.copytree(good, tmp)
    (tmp / STATE_FILE).write_text(json.dumps({"step": 4}))
    # A dir without the state file (written last) is incomplete.
    shutil.copytree(good, ckpts / "step-6")
    (ckpts / "step-6" / STATE_FILE).unlink()
    # A renamed dir whose bytes never reached the disk (power loss): state file there, weights truncated.
    shutil.copytree(good, ckpts / "step-8")
    weights = ckpts / "step-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert latest_checkpoint(out).name == "step-8"          # looks complete by name and state file ...

    s = _train_in_process(project, "models/candidate", "reports/train_metrics.jsonl")
    assert s["resumed_from"] == 2 and s["finished"]          # ... but resume skipped it for step-2
    assert "skipping unreadable checkpoint" in capfd.readouterr().err
    _assert_equal_to_reference(reference, project / "reports/train_metrics.jsonl", out / "model.safetensors")


def test_no_readable_checkpoint_refuses_instead_of_starting_over(project, reference):
    out = project / "models/candidate"
    s = _train_in_process(project, "models/candidate", "reports/train_metrics.jsonl", stop_after=2)
    assert latest_checkpoint(out).name == "step-2"
    st = out / CHECKPOINT_DIR / "step-2" / "optimizer.pt"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(TrainingError, match=r"step-2: cannot resume from this checkpoint"):
        _train_in_process(project, "models/candidate", "reports/train_metrics.jsonl")
    assert not (out / "model.safetensors").exists()
    assert s["steps"] == 2
