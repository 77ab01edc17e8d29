"""Concurrency and torn writes.

* Two pipeline runs on one project: while a real `vlgrpo repro` holds the project lock, a second
  `vlgrpo repro` and a `vlgrpo pipeline` refuse at once, naming the lock and its holder; the first run
  finishes untouched (its outputs valid, DVC up to date, one MLflow pipeline run, not two).
* A writer SIGKILLed in the middle of an atomic write (a report file, a model directory) leaves the previous
  complete version in place - never a half file or a half directory.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.project import BIN, make_project, run
from tests.reliability.conftest import REPO, VLGRPO, kill9, spawn, wait_for
from tests.reliability.slow_training import add_slow_reward

pytestmark = pytest.mark.reliability


def test_second_pipeline_run_refuses_while_first_holds_the_lock(tmp_path, cli_env):
    root = make_project(tmp_path / "proj", model_name="vlgrpo-lock-test")
    lock = root / ".vlgrpo.lock"
    # The first run holds the lock until the refusals are checked: its pilot waits in its first reward call
    # while `hold` exists (a run that merely takes long would race the refused commands on a busy machine).
    add_slow_reward(root)
    hold = tmp_path / "hold"
    hold.touch()
    first = spawn([VLGRPO, "repro", "pilot"], root, tmp_path / "first.log", REL_HOLD_FILE=str(hold), **cli_env)
    try:
        # The holder writes its pid into the lock file right after taking the lock.
        wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), 120, first,
                 tmp_path / "first.log")
        for cmd in ([VLGRPO, "repro"], [VLGRPO, "pipeline", "--force-train"]):
            t0 = time.monotonic()
            p = run(cmd, root, timeout=120, check=False, **cli_env)
            took = time.monotonic() - t0
            assert first.poll() is None, "the first run ended before the second was refused: no overlap"
            assert p.returncode == 1, p.stdout + p.stderr
            assert str(lock) in p.stderr and f"pid {first.pid}: dvc repro" in p.stderr, p.stderr
            assert "refusing to run a second" in p.stderr
            assert "Traceback" not in p.stdout + p.stderr  # an expected refusal, not a crash
            assert took < 60, f"{cmd} took {took:.0f}s to refuse"
        hold.unlink()
        rc = first.wait(600)
    finally:
        if first.poll() is None:
            kill9(first)
    log = (tmp_path / "first.log").read_text()
    assert rc == 0, log[-4000:]

    # The first run's results are whole and consistent.
    from vlgrpo.data.manifest import read_manifest

    items = read_manifest(root / "data/manifest.jsonl")
    assert len(items) == 32 + 8 + 12
    report = json.loads((root / "reports/data.json").read_text())
    assert isinstance(report, dict) and report
    status = run([str(BIN / "dvc"), "status", "data", "--json"], root).stdout
    assert json.loads(status) == {}
    # The refused runs never opened an MLflow run: exactly one pipeline (parent) run exists.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vlgrpo").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["base", "data", "pilot", "pipeline", "validate"]
    # The lock dies with its holder: now that the first run is over, the lock can be taken again.
    from vlgrpo.io import project_lock

    with project_lock(root, "test"):
        pass


WRITER = r'''
import sys, time
from pathlib import Path
from vlgrpo.io import atomic_dir, atomic_path

kind, target = sys.argv[1], Path(sys.argv[2])
chunk = b"n" * (1 << 16)
if kind == "file":
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        for i in range(10_000):
            f.write(chunk); f.flush()
            if i == 3:
                print("mid-write", flush=True)
            time.sleep(0.01)
else:
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
        with open(tmp / "model.safetensors", "wb") as f:
            for i in range(10_000):
                f.write(chunk); f.flush()
                if i == 3:
                    print("mid-write", flush=True)
                time.sleep(0.01)
'''


def _kill_mid_write(tmp_path: Path, kind: str, target: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), kind, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "mid-write"
    finally:
        kill9(proc)
    assert proc.returncode == -9


def test_killed_report_writer_leaves_the_old_report(tmp_path):
    from vlgrpo.io import atomic_write_json

    report = tmp_path / "reports" / "evaluate.json"
    atomic_write_json(report, {"accuracy": 0.5, "promote": False})
    before = report.read_bytes()
    _kill_mid_write(tmp_path, "file", report)
    assert report.read_bytes() == before
    assert json.loads(before) == {"accuracy": 0.5, "promote": False}
    # What the killed writer left is a hidden temp file that no reader opens (DVC and the stages read the
    # named path only); the next write replaces the report normally.
    leftovers = [p.name for p in report.parent.iterdir() if p != report]
    assert leftovers and all(n.startswith(".evaluate.json.") and n.endswith(".tmp") for n in leftovers)
    atomic_write_json(report, {"accuracy": 0.75})
    assert json.loads(report.read_text()) == {"accuracy": 0.75}


def test_killed_model_writer_leaves_the_old_model_dir(tmp_path):
    from vlgrpo.io import atomic_dir

    model = tmp_path / "models" / "candidate"
    with atomic_dir(model) as tmp:
        (tmp / "config.json").write_text('{"old": true}')
        (tmp / "model.safetensors").write_bytes(b"o" * 1000)
    _kill_mid_write(tmp_path, "dir", model)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "config.json").read_text() == '{"old": true}'
    assert (model / "model.safetensors").read_bytes() == b"o" * 1000
