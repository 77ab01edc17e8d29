"""Exact resume: a run stopped (or killed with SIGKILL) after a checkpoint and resumed reaches the same
step-N metrics and the same weights as an uninterrupted run (CPU, fp32), without duplicated metric lines."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlgrpo.model import loading, tiny_model
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.checkpoint import latest_checkpoint
from vlgrpo.data.build import build_dataset
from vlgrpo.data.manifest import read_manifest
from tests.settings import tuned_config, tuned_raw

REPO = Path(__file__).resolve().parents[2]
TIMING = {"samples_per_s", "tokens_per_s", "step_time_s", "time/encode_s", "time/generate_s",
          "time/rewards_s", "time/score_s", "time/update_s"}
PLUGIN = '''
from vlgrpo.rewards import register

@register("text_length")
def text_length(prompts, completions, **columns):
    return [min(len(c), 20) / 20.0 for c in completions]
'''
RAW = {"data": {"num_train": 16, "num_val": 2, "num_test": 2},
       "train": {"max_steps": 5, "prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 4,
                 "mixed_precision": "no", "max_completion_length": 5, "save_steps": 2, "learning_rate": 0.01,
                 "warmup_ratio": 0.2, "beta": 0.04, "num_iterations": 2, "augment": True}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "plugin.py").write_text(PLUGIN)
    raw = dict(RAW, rewards={"weights": {"text_length": 1.0, "format": 0.1}, "plugins": [str(root / "plugin.py")]})
    (root / "params.yaml").write_text(yaml.safe_dump(tuned_raw(raw)))
    cfg = tuned_config(raw)
    build_dataset(cfg, root)
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base")
    ref = train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", "ref", "reports/ref.jsonl"),
                       progress=False)
    assert ref["finished"]
    return root, cfg


def _metrics(path):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def _assert_same_as_reference(root, name):
    assert _metrics(root / f"reports/{name}.jsonl") == _metrics(root / "reports/ref.jsonl")
    a, b = load_file(root / "ref/model.safetensors"), load_file(root / f"{name}/model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _train(root, cfg, name, stop_after=None):
    return train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", name,
                        f"reports/{name}.jsonl"), progress=False, stop_after=stop_after)


@pytest.mark.slow
def test_stop_after_checkpoint_then_resume_is_exact(project):
    root, cfg = project
    s = _train(root, cfg, "stopped", stop_after=3)      # steps 1-3 run; the last checkpoint is step-2
    assert not s["finished"] and s["steps"] == 3
    assert latest_checkpoint(root / "stopped").name == "step-2"
    assert len(_metrics(root / "reports/stopped.jsonl")) == 3
    s = _train(root, cfg, "stopped")
    assert s["resumed_from"] == 2 and s["finished"]
    # step 3 was logged by the first run and again after resuming: it must appear once
    assert [r["step"] for r in _metrics(root / "reports/stopped.jsonl")] == [1, 2, 3, 4, 5]
    _assert_same_as_reference(root, "stopped")


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_exact(project):
    root, cfg = project
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "vlgrpo.train", "params.yaml", "killed",
                             "reports/killed.jsonl"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while latest_checkpoint(root / "killed") is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)                 # no cleanup handlers run
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ck = latest_checkpoint(root / "killed")
    assert ck is not None and int(ck.name[5:]) < 5
    s = _train(root, cfg, "killed")
    assert s["resumed_from"] == int(ck.name[5:]) and s["finished"]
    assert [r["step"] for r in _metrics(root / "reports/killed.jsonl")] == [1, 2, 3, 4, 5]
    _assert_same_as_reference(root, "killed")
