"""Real servers for the integration and reliability tests: MLflow (PostgreSQL-backed) and Prefect.

Each fixture starts the real server binary from the project's venv on a free loopback port with state of its
own (a fresh PostgreSQL database, a temporary PREFECT_HOME), waits until it answers, and tears it down.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent
PG_DSN = os.environ.get("VLGRPO_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def postgres_database(prefix: str = "vlgrpo_test") -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL; yields its SQLAlchemy URL, drops it afterwards.

    The URL names the psycopg2 driver: SQLAlchemy 2.1 would otherwise pick psycopg 3, which is not installed.
    """
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(f"{PG_DSN}/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}".replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def start(self, timeout: float = 600) -> None:
        """(Re)start the same command on the same port (used to simulate an outage and recovery)."""
        self.proc = _spawn(self.cmd, self.env, self.log)
        wait_http(self.health, timeout, self.proc, self.log)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


@contextlib.contextmanager
def mlflow_server(tmp: Path, backend_uri: str, extra_args: list[str] | None = None,
                  env: dict[str, str] | None = None) -> Iterator[Server]:
    port = free_port()
    art = tmp / "mlflow-artifacts"
    art.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_uri, "--artifacts-destination", art.as_uri(), "--workers", "1",
           *(extra_args or [])]
    log = tmp / f"mlflow-{port}.log"
    # MLflow 3's job execution (GenAI evaluation / trace jobs, which vlgrpo never submits) starts a job runner
    # and three huey consumers beside every server, each importing mlflow: CPU a 2-core machine needs for the
    # test itself, on every start and restart.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    srv = Server(f"http://127.0.0.1:{port}", _spawn(cmd, env, log), log, cmd, env,
                 health=f"http://127.0.0.1:{port}/health")
    try:
        wait_http(srv.health, 180, srv.proc, log)
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def prefect_server(tmp: Path, ui: bool = False, home: Path | None = None) -> Iterator[Server]:
    """`prefect server start` on a free port. ``home``: its PREFECT_HOME (default ``tmp/prefect-home``), e.g.
    the one a temporary server of `vlgrpo repro` wrote its runs to; ``ui``: serve the web UI too."""
    port = free_port()
    home = home or tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_UI_ENABLED": "true" if ui else "false"}
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp / f"prefect-{port}.log"
    srv = Server(env["PREFECT_API_URL"], _spawn(cmd, env, log), log, cmd, env,
                 health=f"http://127.0.0.1:{port}/api/health")
    try:
        wait_http(srv.health, 180, srv.proc, log)
        yield srv
    finally:
        srv.stop()
