"""Sharded training: every accelerate config loads; FSDP2 trains on 2 CPU processes (gloo) exactly like one
process, checkpoints in the unsharded format and resumes exactly; ZeRO-3 where DeepSpeed can run.

FSDP2: accelerate 1.15 turns its FSDP plugin on only for GPU process groups (``AcceleratorState`` upgrades
MULTI_GPU-like types to FSDP, never MULTI_CPU), so the trainer applies torch's ``fully_shard`` itself when the
launch asks for FSDP2 (vlgrpo.train.sharding) - the same code on CPU and GPU, run here over gloo. The run's
summary says ``sharding: fsdp2``, so a silent fallback to DDP would fail the test.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model

from tests.slow.test_multiprocess import accelerate_launch, run_two_process_comparison
from tests.settings import tuned_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"

# The trainer's own entry point with ``stop_after`` (stop as if killed after N steps; checkpoints stay), run
# under ``accelerate launch`` like ``-m vlgrpo.train``.
DRIVER = '''
import json, os, sys
from vlgrpo.config import load_config
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
cfg = load_config("params.yaml")
stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
s = train_grpo(cfg, RunPaths.under(".", "data/manifest.jsonl", "models/base", sys.argv[1], sys.argv[2]),
               progress=False, stop_after=stop)
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({k: v for k, v in s.items() if k != "final"}), flush=True)
'''


def test_every_accelerate_config_loads_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    want = {"cpu_2proc.yaml": DistributedType.MULTI_GPU, "multi_gpu.yaml": DistributedType.MULTI_GPU,
            "fsdp2.yaml": DistributedType.FSDP, "deepspeed_zero3.yaml": DistributedType.DEEPSPEED}
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(want)
    for name, kind in want.items():
        cfg = load_config_from_file(str(CONFIGS / name))
        assert cfg.distributed_type == kind, name
    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3


def test_sharding_is_asked_by_the_fsdp2_launch_and_refuses_what_it_cannot_shard(monkeypatch):
    import dataclasses

    from vlgrpo.config import LoraConfig
    from vlgrpo.train import sharding

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not sharding.fsdp2_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")          # what accelerate launch sets from fsdp2.yaml
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert not sharding.fsdp2_requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding.fsdp2_requested()
    tc = tuned_config().train
    assert sharding.unsupported_with_sharding(tc) == []
    assert sharding.unsupported_with_sharding(dataclasses.replace(tc, lora=LoraConfig(enabled=True))) == []
    qlora = LoraConfig(enabled=True, quantize_4bit=True)
    for change, key in [({"lora": qlora}, "train.lora.quantize_4bit"), ({"eval_steps": 5}, "train.eval_steps"),
                        ({"keep_best_checkpoint": True, "eval_steps": 5}, "train.eval_steps"),
                        ({"sync_ref_model": True, "beta": 0.04}, "train.sync_ref_model")]:
        bad = sharding.unsupported_with_sharding(dataclasses.replace(tc, **change))
        assert [b.split(" ")[0] for b in bad] == [key], change


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_match_one_process_and_resume_exactly(tmp_path):
    from vlgrpo.model import loading

    # 1) 3 steps, one process vs two FSDP2 processes: metrics and final weights as in the DDP test
    summary = run_two_process_comparison(tmp_path, CONFIGS / "fsdp2.yaml", save_steps=1)
    assert summary["sharding"] == "fsdp2" and summary["device"].startswith("cpu")

    # the checkpoints are unsharded, in the 1-process format: the same weight names, the same AdamW layout
    one, two = tmp_path / "out1/checkpoints/step-2", tmp_path / "out2/checkpoints/step-2"
    assert sorted(load_file(two / "model.safetensors")) == sorted(load_file(one / "model.safetensors"))
    o1, o2 = (torch.load(d / "optimizer.pt", weights_only=True) for d in (one, two))
    assert o2["param_groups"] == o1["param_groups"] and sorted(o2["state"]) == sorted(o1["state"])
    for i, st in o1["state"].items():
        assert {k: tuple(v.shape) for k, v in o2["state"][i].items()} == {k: tuple(v.shape) for k, v in st.items()}
    # ... and they load with the normal loaders: safetensors into a fresh model, the final one via from_pretrained
    fresh, _ = loading.load_model(tmp_path / "models/base")
    load_model(fresh, str(two / "model.safetensors"))
    final, _ = loading.load_model(tmp_path / "out2")
    w2 = load_file(tmp_path / "out2/model.safetensors")
    assert all(torch.equal(t, w2[k]) for k, t in final.state_dict().items() if k in w2)

    # 2) two FSDP2 processes stopped after step 2, then resumed: the same step 3 and weights as the run that
    #    was not stopped (same processes, same arithmetic: exact)
    (tmp_path / "driver.py").write_text(DRIVER)
    stopped = accelerate_launch(tmp_path, CONFIGS / "fsdp2.yaml", ["driver.py", "out3", "reports/three.jsonl", "2"])
    assert stopped["steps"] == 2 and not stopped["finished"]
    resumed = accelerate_launch(tmp_path, CONFIGS / "fsdp2.yaml", ["driver.py", "out3", "reports/three.jsonl"])
    assert resumed["resumed_from"] == 2 and resumed["finished"] and resumed["sharding"] == "fsdp2"
    rows, full = _by_step(tmp_path / "reports/three.jsonl"), _by_step(tmp_path / "reports/two.jsonl")
    assert sorted(rows) == [1, 2, 3]
    for k in ("reward", "loss", "kl", "grad_norm", "entropy"):
        assert rows[3][k] == full[3][k], k
    w3 = load_file(tmp_path / "out3/model.safetensors")
    assert sorted(w3) == sorted(w2)
    assert all(torch.equal(w3[k], w2[k]) for k in w2)


@pytest.mark.slow
def test_lora_on_an_fsdp2_base_matches_one_process_lora_and_resumes_exactly(tmp_path, monkeypatch):
    """LoRA on a sharded base: the base and the adapters are FSDP2 units, the reference is the sharded root
    with the adapters off. 2 CPU processes give the 1-process LoRA run's metrics and adapters; checkpoints
    and the final model are the 1-process format (the adapters, gathered); a stopped run resumes exactly."""
    from vlgrpo.model import loading

    lora = {"enabled": True, "rank": 4, "alpha": 8.0}
    summary = run_two_process_comparison(tmp_path, CONFIGS / "fsdp2.yaml", save_steps=1, train={"lora": lora})
    assert summary["sharding"] == "fsdp2"
    rows = _by_step(tmp_path / "reports/two.jsonl")
    assert rows[1]["kl"] == 0.0 and rows[3]["kl"] > 0       # adapters start at 0; the reference stays the base

    one, two = tmp_path / "out1/checkpoints/step-2", tmp_path / "out2/checkpoints/step-2"
    assert not (two / "model.safetensors").exists()
    assert sorted(load_file(two / "adapter.safetensors")) == sorted(load_file(one / "adapter.safetensors"))
    o1, o2 = (torch.load(d / "optimizer.pt", weights_only=True) for d in (one, two))
    assert sorted(o2["state"]) == sorted(o1["state"])
    for i, st in o1["state"].items():
        assert {k: tuple(v.shape) for k, v in o2["state"][i].items()} == {k: tuple(v.shape) for k, v in st.items()}
    assert loading.is_adapter_dir(tmp_path / "out2") and not (tmp_path / "out2/model.safetensors").exists()
    monkeypatch.chdir(tmp_path)                             # the adapter names its base as the run did
    loading.load_model("out2")                              # base + gathered adapters, merged

    (tmp_path / "driver.py").write_text(DRIVER)
    stopped = accelerate_launch(tmp_path, CONFIGS / "fsdp2.yaml", ["driver.py", "out3", "reports/three.jsonl", "2"])
    assert stopped["steps"] == 2 and not stopped["finished"]
    resumed = accelerate_launch(tmp_path, CONFIGS / "fsdp2.yaml", ["driver.py", "out3", "reports/three.jsonl"])
    assert resumed["resumed_from"] == 2 and resumed["finished"]
    got = _by_step(tmp_path / "reports/three.jsonl")
    for k in ("reward", "loss", "kl", "grad_norm", "entropy"):
        assert got[3][k] == rows[3][k], k
    w2, w3 = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("out2", "out3"))
    assert sorted(w3) == sorted(w2) and all(torch.equal(w3[k], w2[k]) for k in w2)


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_shard_the_hybrid_qwen3_5(tmp_path):
    """Qwen3.5's Gated DeltaNet and full-attention decoder layers as FSDP2 units on 2 CPU processes: the same
    metrics and weights as one process (the shared-work rollout and scoring through the hybrid cache)."""
    summary = run_two_process_comparison(tmp_path, CONFIGS / "fsdp2.yaml", family="qwen3_5")
    assert summary["sharding"] == "fsdp2"


def _by_step(path: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["step"]: r for r in rows}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "DeepSpeed ZeRO-3 needs 2 GPUs here: accelerate 1.15 selects DeepSpeed only for a non-CPU Accelerator "
    "(AcceleratorState: ACCELERATE_USE_DEEPSPEED ... and not cpu), so on a CPU-only machine the config runs "
    "as plain DDP; and deepspeed is an optional extra (pip install -e '.[deepspeed]') not in the CPU lock file"))
def test_deepspeed_zero3_two_processes_match_one_process(tmp_path):
    pytest.importorskip("deepspeed", reason="optional extra: pip install -e '.[deepspeed]'")
    run_two_process_comparison(tmp_path, CONFIGS / "deepspeed_zero3.yaml")
