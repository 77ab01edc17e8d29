"""Run a GRPO run on several processes / machines (``train.launch``) as a child process group of the stage.

The command comes from vlgrpo.train.launch (accelerate's launcher, torchrun underneath). The launched
processes write the metrics stream, checkpoints and the model exactly as an in-process run does, so the
stage's watchers (MLflow forwarding, progress) need nothing new; the main process writes the run's summary to
a file this module reads back. Everything the processes print goes to ``reports/<stage>_launch.log``.

Faults:
- a process that raises or dies: torchrun stops the others (SIGTERM, SIGKILL after its grace time) and
  exits non-zero; the stage fails with the failing rank's error lines and the log's last lines;
- the stage stopped (Prefect cancellation, Ctrl-C, SIGTERM): the launcher and every process it started get
  SIGTERM, then SIGKILL after ``STOP_GRACE_S``; if the stage's process dies outright the launcher gets
  SIGTERM from the kernel (``PR_SET_PDEATHSIG``) and stops its processes itself.
Checkpoints are written complete-or-not-at-all by the trainer, so the next run resumes from the last one.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from tasks.common import StageFailed
from vlgrpo.config import Config
from vlgrpo.io import atomic_write_text
from vlgrpo.train.launch import launch_command, trainer_args
from vlgrpo.train.paths import RunPaths

STOP_GRACE_S = 20.0        # SIGTERM -> SIGKILL for a stopped stage's processes
TAIL_LINES = 40            # log lines a failure message carries


def launched_grpo(cfg: Config, paths: RunPaths, stage: str) -> dict[str, Any]:
    """Train ``cfg`` (the effective config: pilot overrides / auto-adjust applied) on ``paths`` through the
    launcher; returns the main process's summary (machine rank > 0: a short summary of this machine's part).
    Raises StageFailed with the failing rank's error and the log's last lines."""
    root = Path(paths.root)
    log_path = root / "reports" / f"{stage}_launch.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{stage}-launch-") as tmp:
        params, summary_file = Path(tmp) / "params.yaml", Path(tmp) / "summary.json"
        # the processes read the very config this stage runs with (pilot overrides, auto-adjust applied)
        atomic_write_text(params, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        cmd = launch_command(cfg.train.launch, root, trainer_args(params, paths, summary_file))
        atomic_write_text(log_path, "$ " + " ".join(cmd) + "\n")
        started = time.monotonic()
        rc, tail = run_group(cmd, root, log_path)
        if rc != 0:
            seconds = time.monotonic() - started
            print(failure_message(stage, rc, tail, log_path, seconds))   # the rank's error and the last lines
            raise StageFailed(failure_summary(stage, rc, tail, log_path, seconds))
        if summary_file.exists():
            import json

            return json.loads(summary_file.read_text(encoding="utf-8"))
    if cfg.train.launch.machine_rank > 0:
        return {"machine_rank": cfg.train.launch.machine_rank, "finished": True}
    raise StageFailed(f"{stage}: the launched processes exited 0 but wrote no summary (see {log_path})")


def run_group(cmd: list[str], cwd: Path, log_path: Path) -> tuple[int, list[str]]:
    """Run ``cmd`` in a process group of its own (setsid), its output appended to ``log_path``; wait for it.
    Any exception while waiting (cancellation, KeyboardInterrupt, SIGTERM turned into SystemExit) stops the
    whole group first.
    Returns the exit status and the output's last lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")      # torchrun's own default; set here so it does not warn
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    reader = threading.Thread(target=_copy_output, args=(proc, log_path, tail), daemon=True,
                              name="launch-log")
    reader.start()
    try:
        with _sigterm_as_exit():
            while proc.poll() is None:
                time.sleep(0.2)
    except BaseException:
        stop_group(proc)
        raise
    finally:
        reader.join(timeout=10)
    return proc.returncode, list(tail)


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the launcher's process group and every process below it (torchrun starts each rank in a
    process group of its own), then SIGKILL what is still alive after ``grace`` seconds."""
    pids = [proc.pid, *_descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and (proc.poll() is None or any(_alive(p) for p in pids[1:])):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def failure_message(stage: str, rc: int, tail: list[str], log_path: Path, seconds: float) -> str:
    """What failed: the failing rank's own error lines (torchrun prefixes them ``[rankN]:``), torchrun's
    summary of which rank exited how, and the last lines of the output."""
    ranks = _failed_ranks(tail)
    own = [line for line in tail if any(line.startswith(f"[rank{r}]:") for r in ranks)]
    errors = [line for line in own if _ERROR_LINE.match(line)]
    last = tail[-TAIL_LINES:]
    who = f"rank {', '.join(ranks)}" if ranks else "a process"
    parts = [f"{stage}: {who} failed after {seconds:.0f} s (launcher exit status {rc}); "
             f"the other processes were stopped. Full output: {log_path}"]
    if own:
        parts += [f"--- error of {who} ---", *dict.fromkeys(errors[-10:]), "...", *own[-8:]]
    parts += [f"--- last {len(last)} lines ---", *last]
    return "\n".join(parts)


# "[rank1]: RuntimeError: ..." - the exception line of each traceback in a chain
_ERROR_LINE = re.compile(r"\[rank\d+\]: [A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failed)\b")


def failure_summary(stage: str, rc: int, tail: list[str], log_path: Path, seconds: float) -> str:
    """One line: which rank failed and how (its last exception line, or torchrun's exit code / signal)."""
    ranks = _failed_ranks(tail)
    who = f"rank {', '.join(ranks)}" if ranks else "a process"
    errors = [line.split("]: ", 1)[1] for line in tail if _ERROR_LINE.match(line)
              and any(line.startswith(f"[rank{r}]:") for r in ranks)]
    how = errors[-1] if errors else "; ".join(_root_cause_details(tail)) or f"launcher exit status {rc}"
    return f"{stage}: {who} failed after {seconds:.0f} s: {how} (the other processes were stopped; full output: " \
           f"{log_path})"


def _root_cause_details(lines: list[str]) -> list[str]:
    """torchrun's "exitcode" and "traceback" entries of the root-cause block ("exitcode : -9", "Signal 9
    (SIGKILL) received by PID ...")."""
    start = max((i for i, line in enumerate(lines) if "Root Cause" in line), default=None)
    if start is None:
        return []
    out = []
    for line in lines[start + 1:]:
        if line.startswith("===="):
            break
        key, _, value = line.strip().partition(":")
        if key.strip() in ("exitcode", "traceback") and value.strip() and "To enable traceback" not in value:
            out.append(f"{key.strip()} {value.strip()}")
    return out


def _failed_ranks(lines: list[str]) -> list[str]:
    """The ranks torchrun names as the root cause ("Root Cause (first observed failure)", then "rank : N");
    every rank its failure summary names when that block is missing."""
    rank = re.compile(r"\s*rank\s*:\s*(\d+)")
    start = max((i for i, line in enumerate(lines) if "Root Cause" in line), default=None)
    if start is not None:
        for line in lines[start:]:
            if m := rank.match(line):
                return [m.group(1)]
    return sorted({m.group(1) for line in lines if (m := rank.match(line))}, key=int)


def _copy_output(proc: subprocess.Popen, log_path: Path, tail: collections.deque) -> None:
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            log.write(line + "\n")
            log.flush()
            tail.append(line)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the stage's thread that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while waiting (main thread only: Python's rule), so the group is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
