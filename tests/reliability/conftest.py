"""Shared pieces of the fault-injection tests: a tiny ready-to-train project, process helpers.

The ready project (params.yaml, data/manifest.jsonl + image cache, models/base) is built once per session in
this process (seconds) and copied per test, so each test spends its time on the fault, not on set-up. One
real Prefect server serves every stage command of the session (``cli_env``), instead of each command starting
a temporary one of its own.
Training is CPU fp32 (``mixed_precision: "no"``) so that a resumed run can be compared bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from tests.project import BIN, TINY_PARAMS, deep_update, make_project, project_env, run
from tests.reliability.slow_training import SLOW_PLUGIN, SLOW_REWARDS
from tests.servers import prefect_server

REPO = Path(__file__).resolve().parents[2]
VLGRPO = str(BIN / "vlgrpo")

# 4 steps, checkpoints at 2 and 4: a kill after step-2 leaves real work to resume.
TRAIN = {"max_steps": 4, "save_steps": 2, "mixed_precision": "no", "learning_rate": 0.01}
# Every VQA task type, whatever the shipped default mix is: the reward tests pick items by task.
DATA = {"task_mix": {"count": 1.0, "color": 1.0, "shape": 1.0, "exists": 1.0, "caption": 0.0}}


def tiny_params(**sections: dict) -> dict:
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(cfg, TINY_PARAMS)
    deep_update(cfg, {"train": dict(TRAIN), "data": {"task_mix": dict(DATA["task_mix"])},
                      "register": {"model_name": "vlgrpo-rel-test"}})
    for k, v in sections.items():
        deep_update(cfg, {k: v})
    return cfg


def write_params(root: Path, cfg: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def update_params(root: Path, **sections: dict) -> dict:
    cfg = yaml.safe_load((root / "params.yaml").read_text())
    for k, v in sections.items():
        deep_update(cfg, {k: v})
    write_params(root, cfg)
    return cfg


@pytest.fixture(scope="session")
def ready_project(tmp_path_factory) -> Path:
    """A project folder with data and an (untrained) tiny base model; copy it, never modify it."""
    from vlgrpo.model import loading, tiny_model
    from vlgrpo.config import load_config
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest

    root = tmp_path_factory.mktemp("ready") / "proj"
    root.mkdir()
    write_params(root, tiny_params())
    cfg = load_config(root / "params.yaml")
    build_dataset(cfg, root)
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base", rebuild="vlgrpo base")
    return root


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `vlgrpo` subprocesses: a shared real Prefect server."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as srv:
        yield {"PREFECT_API_URL": srv.url, "PREFECT_HOME": srv.env["PREFECT_HOME"]}


@pytest.fixture
def project(ready_project, tmp_path) -> Path:
    dest = tmp_path / "proj"
    shutil.copytree(ready_project, dest)
    return dest


# The end-to-end faults under `vlgrpo repro` (a kill in every stage, a full disk under training) each compare
# with one undisturbed `vlgrpo repro` of the same project, run once per session. CPU fp32, so that a resumed
# training run can be compared bit for bit; 4 steps, a checkpoint at 2. The slow reward (0 unless a run's
# environment sets REL_SLOW_REWARD_S) lets a test slow the disturbed run down without changing its numbers.
REPRO_NAME = "vlgrpo-rel-repro"
# Only a guard against a hang, never a pass/fail criterion: one whole `vlgrpo repro` took over 20 minutes on
# the shared 2-core machine under load (about 1-2 minutes when it is idle).
REPRO_TIMEOUT = 3600
REPRO_PARAMS = {"evaluate": {"min_improvement": -1.0}, "rewards": SLOW_REWARDS,
                "train": {"max_steps": 4, "save_steps": 2, "mixed_precision": "no"}}


def repro_project(dest: Path) -> Path:
    """A fresh project (git + DVC, nothing run yet) with REPRO_PARAMS."""
    root = make_project(dest, params=REPRO_PARAMS, model_name=REPRO_NAME)
    (root / "slow_plugin.py").write_text(SLOW_PLUGIN)
    return root


@pytest.fixture(scope="session")
def undisturbed_repro(tmp_path_factory, cli_env) -> Path:
    """A repro_project after one plain `vlgrpo repro`: the reference a disturbed run must end equal to."""
    root = repro_project(tmp_path_factory.mktemp("undisturbed") / "proj")
    run([VLGRPO, "repro"], root, timeout=REPRO_TIMEOUT, **cli_env)
    return root


def spawn(cmd: list[str], root: Path, log: Path, **env: str) -> subprocess.Popen:
    """Start ``cmd`` in ``root`` in a process group of its own (so a kill reaches its children too)."""
    return subprocess.Popen(cmd, cwd=root, env=project_env(root, **env), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"process exited ({proc.returncode}) before the condition held:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(poll)


def stage_run_open(db: Path, stage: str) -> bool:
    """The stage's MLflow run is open, read straight from the SQLite store ``db`` while the stage writes (cheap
    enough to poll every 20 ms: a short stage's run is open for a few seconds only)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
            return con.execute("SELECT 1 FROM runs WHERE name = ? AND status = 'RUNNING'", (stage,)).fetchone() \
                is not None
    except sqlite3.Error:                            # locked or mid-migration: ask again
        return False


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group: no cleanup handler, finally block or atexit runs. Returns once every
    process of the group is gone (reaped), not only the leader: a killed `dvc repro` that still exists for a
    moment after its parent is waited for holds DVC's rwlock for the next command (DVC checks the pid), which
    made the next `vlgrpo repro` fail with "is busy" in a CI run."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)
    deadline = time.monotonic() + 60
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    """Pids (zombies included) whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return members


PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
PG_USER = "vlgrpo-pg"        # PostgreSQL refuses to run as root: as root, the cluster runs as this user


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb, trust auth, a free loopback port) that a test may stop and
    restart without touching the machine's shared server on 5432."""

    def __init__(self, base: Path):
        from tests.servers import free_port

        self.port = free_port()
        self.dir = base / "pgdata"
        self.log = base / "postgres.log"
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def _run(self, *cmd: str) -> None:
        subprocess.run(self._as_owner(*cmd), check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        self._run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")

    def start(self) -> None:
        # fsync off: the faults here are process-level (the OS keeps what PostgreSQL wrote), not power loss.
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-l", str(self.log), "-o", opts, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-m", mode, "-w", "stop")


@pytest.fixture
def throwaway_postgres():
    """A started ThrowawayPostgres with an empty `mlflow` database; stopped and deleted afterwards."""
    import tempfile

    if PG_BIN is None:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    if os.geteuid() == 0 and subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True)
    # Not under pytest's tmp_path: that is private to root, and the server runs as PG_USER.
    base = Path(tempfile.mkdtemp(prefix="vlgrpo-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, PG_USER)
    pg = ThrowawayPostgres(base)
    try:
        pg.init()
        yield pg
    finally:
        try:
            pg.stop("immediate")
        except subprocess.CalledProcessError:
            pass                                  # already stopped
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def tmpfs_at(path: Path, size_mb: int) -> Iterator[Path]:
    """Mount a small tmpfs at ``path`` (a real filesystem that really fills up); unmount it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI and test machines run tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(path: Path, leave_bytes: int = 0) -> Path:
    """Take all the free space on ``path``'s filesystem but ``leave_bytes``; delete the file to free it."""
    filler = path / ".filler"
    free = shutil.disk_usage(path).free
    with open(filler, "wb") as f:
        if free > leave_bytes:
            os.posix_fallocate(f.fileno(), 0, free - leave_bytes)
    return filler
