"""The project's scheduled Prefect deployment, for real: a work pool, `prefect deploy` of prefect.yaml and a
process worker, on a real Prefect server (tests.servers.prefect_server). Shared by the integration test of the
deployment and the reliability test that restarts the server under it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.project import BIN, project_env, run
from tests.servers import Server

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PREFECT = str(BIN / "prefect")


def api(url: str, path: str, body: dict | None = None) -> object:
    """GET (or POST ``body`` to) the Prefect REST API at ``url`` + ``path``; the decoded JSON answer."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def server_env(srv: Server) -> dict[str, str]:
    """What a `prefect` or `vlgrpo` subprocess needs to use ``srv``."""
    return {"PREFECT_API_URL": srv.url, "PREFECT_HOME": srv.env["PREFECT_HOME"]}


def deploy(root: Path, srv: Server) -> None:
    """Create the `vlgrpo-process` work pool and register prefect.yaml's deployments from ``root``."""
    env = server_env(srv)
    run([PREFECT, "--no-prompt", "work-pool", "create", "vlgrpo-process", "--type", "process"], root, **env)
    run([PREFECT, "--no-prompt", "deploy", "--name", "scheduled"], root, **env)


@contextlib.contextmanager
def worker(root: Path, srv: Server, log: Path) -> Iterator[subprocess.Popen]:
    """A process worker on the `vlgrpo-process` pool (its own process group), stopped afterwards."""
    out = open(log, "wb")
    proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", "vlgrpo-process", "--type", "process"],
                            cwd=root, env=project_env(root, **server_env(srv)), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        # The worker forwards the signal to its process runner and may linger; the runs are over either way.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        out.close()


def trigger(root: Path, srv: Server, env: dict[str, str] | None = None) -> str:
    """Start a run of `pipeline/scheduled` now, with ``env`` added to its process's environment (the process
    work pool's `env` job variable); its flow run id."""
    extra = ["--job-variable", "env=" + json.dumps(env)] if env else []
    out = run([PREFECT, "deployment", "run", "pipeline/scheduled", *extra], root, **server_env(srv)).stdout
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)


def wait_final(srv: Server, run_id: str, timeout: float, poll: float = 2.0) -> dict:
    """The flow run's state once it is final; tolerates the server being away for a while (restarting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = api(srv.url, f"/flow_runs/{run_id}")["state"]
            if state["type"] in FINAL:
                return state
        except OSError:
            pass                                   # the server is restarting
        time.sleep(poll)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout}s")
