"""``train.launch``: its checks, the launcher command the stages build (parsed back by accelerate's own
parser and the trainer's), the failure message, and stopping a process tree whose ranks sit in sessions of
their own. The multi-process runs themselves: tests/slow/test_launch.py."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlgrpo.config import ConfigError, LaunchConfig, config_from_dict
from vlgrpo.train.launch import is_launched, launch_command, resolve_num_processes, trainer_args
from vlgrpo.train.paths import RunPaths

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("launch, key", [
    ({"num_processes": 0}, "train.launch.num_processes"),
    ({"num_processes": "many"}, "train.launch.num_processes"),
    ({"machine_rank": 1}, "train.launch.machine_rank"),
    ({"num_machines": 2, "num_processes": 3, "main_process_ip": "10.0.0.1", "main_process_port": 29500},
     "train.launch.num_processes"),
    ({"num_machines": 2, "num_processes": 2}, "train.launch.main_process_ip"),
    ({"main_process_port": 70000}, "train.launch.main_process_port"),
    ({"nproc": 2}, "train.launch.nproc"),
])
def test_bad_launch_settings_are_refused_naming_the_key(launch, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"train": {"launch": launch}})


def test_one_process_trains_in_process_more_go_through_the_launcher():
    assert not is_launched(LaunchConfig())
    assert is_launched(LaunchConfig(num_processes=2))
    assert is_launched(LaunchConfig(num_processes=2, num_machines=2, machine_rank=1, main_process_ip="h",
                                    main_process_port=1))
    import torch

    assert resolve_num_processes(LaunchConfig(num_processes="auto")) == max(1, torch.cuda.device_count())


def _paths(root: Path) -> RunPaths:
    return RunPaths.under(root, "data/manifest.jsonl", "models/base", "models/candidate", "reports/m.jsonl")


def test_the_command_parses_back_as_accelerate_and_the_trainer_read_it(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    from vlgrpo.train.__main__ import _parser

    (tmp_path / "models/base").mkdir(parents=True)
    paths = _paths(tmp_path)
    launch = LaunchConfig(num_processes=4, config=str(REPO / "configs/accelerate/fsdp2.yaml"), num_machines=2,
                          machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29500)
    cmd = launch_command(launch, tmp_path, trainer_args(tmp_path / "p.yaml", paths, tmp_path / "s.json"))
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    a = launch_command_parser().parse_args(cmd[3:])
    assert (a.num_processes, a.num_machines, a.machine_rank, a.main_process_ip, a.main_process_port) == \
        (4, 2, 1, "10.0.0.1", 29500)
    assert a.config_file == str(REPO / "configs/accelerate/fsdp2.yaml") and not a.multi_gpu
    assert a.module and a.training_script == "vlgrpo.train"
    t = _parser().parse_args(a.training_script_args)
    assert RunPaths.under(t.root, t.manifest, t.init, t.out, t.metrics) == paths
    assert t.params == str(tmp_path / "p.yaml") and t.summary == str(tmp_path / "s.json") and t.no_progress

    # no config file: plain DDP (torchrun) on a free port of this machine
    a = launch_command_parser().parse_args(launch_command(LaunchConfig(num_processes=2), tmp_path, ["x.py"])[3:])
    assert a.multi_gpu and a.num_processes == 2 and a.main_process_ip == "127.0.0.1" and a.main_process_port > 0
    with pytest.raises(FileNotFoundError, match="train.launch.config"):
        launch_command(LaunchConfig(num_processes=2, config="configs/accelerate/nope.yaml"), tmp_path, ["x.py"])


# torchrun's failure summary, as accelerate launch prints it when rank 1 died and rank 0 was stopped
TORCHRUN_TAIL = """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "fault.py", line 14, in fault
[rank1]:     raise RuntimeError("injected fault on rank 1")
[rank1]: RuntimeError: injected fault on rank 1
[rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:7084.
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
vlgrpo.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-07_23:52:33
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7246)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_23:52:33
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 7247)
============================================================""".splitlines()


def test_the_failure_message_names_the_root_cause_rank_and_its_error(tmp_path):
    from tasks.launch import failure_message, failure_summary

    line = failure_summary("train", 1, TORCHRUN_TAIL, tmp_path / "train_launch.log", 12.3)
    assert line.startswith("train: rank 1 failed after 12 s: RuntimeError: injected fault on rank 1 (")
    killed = [x for x in TORCHRUN_TAIL if not x.startswith("[rank")]
    killed[-2] = "  exitcode  : -9 (pid: 7247)"
    killed.insert(-1, "  traceback : Signal 9 (SIGKILL) received by PID 7247")
    assert "rank 1 failed after 12 s: exitcode -9 (pid: 7247); traceback Signal 9 (SIGKILL) received by PID 7247" \
        in failure_summary("train", 1, killed, tmp_path / "train_launch.log", 12.3)
    msg = failure_message("train", 1, TORCHRUN_TAIL, tmp_path / "train_launch.log", 12.3)
    assert msg.startswith("train: rank 1 failed after 12 s")
    own = msg.split("--- error of rank 1 ---")[1].split("--- last")[0]
    assert "[rank1]: RuntimeError: injected fault on rank 1" in own and "[rank0]" not in own
    assert "exitcode  : 1 (pid: 7247)" in msg and str(tmp_path / "train_launch.log") in msg


# A launcher whose child runs in a session of its own (as torchrun starts each rank) and ignores SIGTERM.
TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('ready', flush=True); time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def test_stopping_the_group_reaches_ranks_in_their_own_sessions(tmp_path):
    from tasks.launch import _alive, _descendants, stop_group

    proc = subprocess.Popen([sys.executable, "-c", TREE], start_new_session=True)
    try:
        for _ in range(200):
            kids = _descendants(proc.pid)
            if kids:
                break
            time.sleep(0.05)
        assert kids, "the launcher's child did not start"
        time.sleep(0.5)                          # let the child install its SIGTERM handler
        stop_group(proc, grace=1.0)
        assert proc.poll() is not None
        for _ in range(100):                     # SIGKILLed; reaped by init once its parent is gone
            if not any(_alive(k) and _state(k) != "Z" for k in kids):
                break
            time.sleep(0.05)
        assert not any(_alive(k) and _state(k) != "Z" for k in kids)
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
