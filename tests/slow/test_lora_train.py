"""A LoRA GRPO run (``train.lora`` + ``train.gradient_checkpointing``) end to end, and its exact resume.

The policy is the tiny base with adapters on the language model, the vision blocks and the merger; the
reference is the same module with the adapters off, so at step 1 (peft starts every adapter at zero) the KL
is exactly 0 and afterwards it is not. Checkpoints and the final model hold the adapters only, the base
stays untouched, and a run stopped after a checkpoint and resumed ends with the same metrics and the same
adapter weights as the uninterrupted run (fp32, CPU).
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlgrpo.model import loading

from vlgrpo.model import tiny_model
from vlgrpo.data.build import build_dataset
from vlgrpo.data.manifest import read_manifest
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from tests.settings import tuned_config

TIMING = {"samples_per_s", "tokens_per_s", "step_time_s", "time/encode_s", "time/generate_s",
          "time/rewards_s", "time/score_s", "time/update_s"}
RAW = {"data": {"num_train": 12, "num_val": 2, "num_test": 2},
       "rewards": {"weights": {"accuracy": 1.0, "format": 0.1}},
       "train": {"max_steps": 4, "prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 4,
                 "mixed_precision": "no", "max_completion_length": 5, "save_steps": 2, "learning_rate": 0.02,
                 "warmup_ratio": 0.0, "beta": 0.04, "num_iterations": 2, "gradient_checkpointing": True,
                 "lora": {"enabled": True, "rank": 4, "alpha": 8.0, "vision": True, "merger": True}}}


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def _train(root, cfg, name, stop_after=None):
    return train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", name, f"reports/{name}.jsonl"),
                      progress=False, stop_after=stop_after)


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_resumes_exactly(tmp_path):
    root, cfg = tmp_path, tuned_config(RAW)
    build_dataset(cfg, root)
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base")
    base_file = root / "models/base/model.safetensors"
    base_before = base_file.read_bytes()

    ref = _train(root, cfg, "ref")
    assert ref["finished"]
    rows = _metrics(root / "reports/ref.jsonl")
    assert rows[0]["kl"] == 0.0                              # adapters start at 0: policy == reference
    assert rows[-1]["kl"] > 0                                # ... and the reference stays the base
    out = root / "ref"
    assert loading.is_adapter_dir(out) and not (out / "model.safetensors").exists()
    assert loading.adapter_base(out) == str(root / "models/base")
    assert (out / "adapter_model.safetensors").stat().st_size < base_file.stat().st_size / 3
    step2 = out / "checkpoints" / "step-2"
    assert (step2 / "adapter.safetensors").is_file() and not (step2 / "model.safetensors").exists()
    assert base_file.read_bytes() == base_before              # the base is never written

    stopped = _train(root, cfg, "stopped", stop_after=3)     # steps 1-3; the last checkpoint is step-2
    assert not stopped["finished"]
    resumed = _train(root, cfg, "stopped")
    assert resumed["resumed_from"] == 2 and resumed["finished"]
    assert _metrics(root / "reports/stopped.jsonl") == rows
    a, b = load_file(out / "adapter_model.safetensors"), load_file(root / "stopped/adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".visual.merger." in k for k in a) and any(".visual.blocks." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the final adapter directory loads as base + adapter, merged: not the base
    merged, _ = loading.load_model(out)
    base, _ = loading.load_model(root / "models/base")
    m, s = merged.state_dict(), base.state_dict()
    assert m.keys() == s.keys() and any(not torch.equal(m[k], s[k]) for k in m)
