"""The command line that starts a GRPO run on several processes or machines (accelerate's launcher).

``train.launch`` says how many processes and machines; the stage (tasks/launch.py) runs the command built
here in the project root and follows the main process's metrics stream as it does for a 1-process run. The
command is accelerate's launcher run as a module of the same Python (no console script needed)::

    python -m accelerate.commands.launch --num_processes 2 --num_machines 1 --machine_rank 0
        --main_process_ip 127.0.0.1 --main_process_port 29517 --rdzv_backend static --same_network
        [--config_file configs/accelerate/fsdp2.yaml | --multi_gpu]
        -m vlgrpo.train run-params.yaml --root . --manifest data/manifest.jsonl --init models/base
        --out models/candidate --metrics reports/train_metrics.jsonl --summary <file> --no-progress

Without a config file the launch is plain DDP (``--multi_gpu`` selects accelerate's torchrun launcher; on a
machine without GPUs the trainer turns it into gloo CPU processes). Values given here replace the config
file's own process and machine counts. Nothing here imports torch unless ``num_processes: auto`` asks for the
number of GPUs.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Sequence

from vlgrpo.config import LaunchConfig
from vlgrpo.train.paths import RunPaths


def resolve_num_processes(launch: LaunchConfig) -> int:
    """The processes over all machines: ``num_processes``, or for ``auto`` the visible GPUs times the
    machines (1 per machine without GPUs)."""
    if launch.num_processes != "auto":
        return int(launch.num_processes)
    import torch

    return max(1, torch.cuda.device_count()) * launch.num_machines


def is_launched(launch: LaunchConfig) -> bool:
    """Does this launch need the launcher (more than one process or machine)? 1 process runs in-process."""
    return launch.num_machines > 1 or resolve_num_processes(launch) > 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a one-machine rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def trainer_args(params_file: Path, paths: RunPaths, summary_file: Path) -> list[str]:
    """``-m vlgrpo.train`` with every path of the run given explicitly (absolute), so the launched processes
    read and write what the in-process run would."""
    return ["-m", "vlgrpo.train", str(params_file), "--root", str(paths.root), "--manifest", str(paths.manifest),
            "--init", str(paths.init_model_dir), "--out", str(paths.out_dir), "--metrics", str(paths.metrics_path),
            "--summary", str(summary_file), "--no-progress"]


def launch_command(launch: LaunchConfig, root: Path, args: Sequence[str], port: int | None = None,
                   python: str | None = None) -> list[str]:
    """The launcher's command line for ``launch`` running ``args`` (e.g. ``trainer_args(...)``) in ``root``.

    ``port``: the rendezvous port when ``launch.main_process_port`` is null (one machine; default: a free
    one). Raises FileNotFoundError naming ``train.launch.config`` when that file does not exist."""
    n = resolve_num_processes(launch)
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config:
        cfg = Path(launch.config) if Path(launch.config).is_absolute() else Path(root) / launch.config
        if not cfg.is_file():
            raise FileNotFoundError(f"train.launch.config: {cfg}: no such accelerate config file")
        cmd += ["--config_file", str(cfg)]
    else:   # the trainer sets train.mixed_precision itself; "no" here only silences the launcher's default
        cmd += ["--multi_gpu", "--mixed_precision", "no"]
    ip = launch.main_process_ip or "127.0.0.1"
    port = launch.main_process_port or port or free_port(ip if launch.num_machines == 1 else "0.0.0.0")
    cmd += ["--num_processes", str(n), "--num_machines", str(launch.num_machines),
            "--machine_rank", str(launch.machine_rank), "--main_process_ip", ip, "--main_process_port", str(port),
            "--rdzv_backend", "static", "--same_network"]
    return [*cmd, *args]
