"""Sharded training configs: every accelerate config loads; FSDP2 / ZeRO-3 runs where they can run.

FSDP2 and DeepSpeed ZeRO-3 need GPUs here: accelerate 1.15 turns its FSDP plugin on only for GPU
distributed types, so ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` on a CPU-only machine
starts two processes that each run undistributed as process 0 (``DistributedType.NO``) - although torch
2.14's ``fully_shard`` itself works over gloo on CPU - and DeepSpeed has no CPU backend in the lock file.
On a machine with 2+ GPUs the 2-process FSDP2 run must train like the 1-process run, as the DDP test
(tests/slow/test_multiprocess.py) checks on CPU.
"""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"
NO_TWO_GPUS = ("FSDP2 needs 2 GPUs here: accelerate 1.15 enables FSDP only for GPU distributed types (on a "
               "CPU-only machine `accelerate launch` with fsdp2.yaml runs each process undistributed, "
               "DistributedType.NO), although torch 2.14's fully_shard itself runs over gloo on CPU")


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


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=NO_TWO_GPUS)
def test_fsdp2_two_processes_match_one_process(tmp_path):
    from tests.slow.test_multiprocess import run_two_process_comparison

    run_two_process_comparison(tmp_path, CONFIGS / "fsdp2.yaml")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DeepSpeed ZeRO-3 needs 2 GPUs and the optional "
                    "extra (pip install -e '.[deepspeed]'); DeepSpeed has no CPU backend in the lock file")
def test_deepspeed_zero3_two_processes_match_one_process(tmp_path):
    pytest.importorskip("deepspeed", reason="optional extra: pip install -e '.[deepspeed]'")
    from tests.slow.test_multiprocess import run_two_process_comparison

    run_two_process_comparison(tmp_path, CONFIGS / "deepspeed_zero3.yaml")
