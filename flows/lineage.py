"""One pipeline execution as one tree of Prefect flow runs, with names a person can read.

`vlgrpo repro` runs every DVC stage as a process of its own, so Prefect alone would record seven unrelated
top-level flow runs. The `vlgrpo repro` process therefore opens a `pipeline @ <commit>` flow run
(flows/repro.py) and exports its id in ``VLGRPO_PREFECT_PARENT_FLOW_RUN`` (and its tags in
``VLGRPO_PREFECT_TAGS``); a stage process that finds it there (``run_stage``) creates its own flow run as a
subflow of that run - a tracking task run in the parent pointing at the stage's flow run, which is what Prefect
itself creates for a flow called inside another flow - so the Prefect UI shows one pipeline run with its
stages inside. `vlgrpo pipeline` calls the stage flows in-process, where Prefect nests them by itself.

Every stage flow run is named ``<stage> @ <short commit>`` (``run_name``) and tagged ``vlgrpo`` and
``commit:<short commit>``.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

PARENT_ENV = "VLGRPO_PREFECT_PARENT_FLOW_RUN"
TAGS_ENV = "VLGRPO_PREFECT_TAGS"


@functools.lru_cache(maxsize=8)
def short_commit(root: str) -> str:
    """The checkout's short commit (``no-git`` outside a git repo). Not marked dirty: dvc.lock changes while a
    pipeline runs, and the stages of one execution must carry one name."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return sha or "no-git"
    except (OSError, subprocess.SubprocessError):
        return "no-git"


def _root_of(params: Any) -> str:
    return str(Path(str(params or "params.yaml")).resolve().parent)


def name_for(stage: str, params: Any = "params.yaml") -> str:
    return f"{stage} @ {short_commit(_root_of(params))}"


def run_name(stage: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<stage> @ <commit>`` of the project the run's ``params`` names."""

    def name() -> str:
        from prefect.runtime import flow_run

        return name_for(stage, (flow_run.parameters or {}).get("params"))

    return name


def pipeline_tags(params: Any = "params.yaml") -> list[str]:
    return ["vlgrpo", f"commit:{short_commit(_root_of(params))}"]


def export_parent(flow_run_id: str, tags: list[str]) -> dict[str, str | None]:
    """Export the parent flow run to child processes; returns the previous values for ``restore``."""
    old = {k: os.environ.get(k) for k in (PARENT_ENV, TAGS_ENV)}
    os.environ[PARENT_ENV] = str(flow_run_id)
    os.environ[TAGS_ENV] = json.dumps(tags)
    return old


def restore(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_stage(stage_flow: Any, **parameters: Any) -> Any:
    """Run a stage flow: as a subflow of the exported parent flow run if there is one, else as usual.

    Returns what calling the flow returns (a failed run raises ``prefect.exceptions.FailedRun``, as a plain
    call does). A parent that this server does not know (a stale variable, another server) is ignored: the
    stage runs as a top-level flow run rather than not at all.
    """
    from prefect import get_client
    from prefect import tags as tagged
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_engine import run_flow

    def alone() -> Any:
        with tagged(*pipeline_tags(parameters.get("params"))):
            return stage_flow(**parameters)

    parent = os.environ.get(PARENT_ENV)
    if not parent or not os.environ.get("PREFECT_API_URL"):
        return alone()
    tags = json.loads(os.environ.get(TAGS_ENV) or "[]")
    name = name_for(stage_flow.name, parameters.get("params"))
    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(uuid.UUID(parent))
        except (ObjectNotFound, ValueError):
            flow_run = None
        else:
            flow_run = _subflow_run(client, stage_flow, uuid.UUID(parent), name, tags, parameters)
    if flow_run is None:
        return alone()
    return run_flow(stage_flow, flow_run=flow_run, parameters=parameters)


def _subflow_run(client: Any, stage_flow: Any, parent: uuid.UUID, name: str, tags: list[str],
                 parameters: dict[str, Any]) -> Any:
    from prefect import Task
    from prefect.states import Pending

    """The stage's flow run as a subflow of ``parent``: what the engine creates for a flow called inside
    another flow, a task run in the parent standing for the child; the server moves that task run's state
    along with the child's (``child_flow_run_id``), so the parent's graph and lists show the stage's outcome."""
    tracker = Task(name=stage_flow.name, fn=stage_flow.fn, version=stage_flow.version)
    task_run = client.create_task_run(tracker, flow_run_id=parent, name=name, extra_tags=tags,
                                      dynamic_key=f"{stage_flow.name}-{uuid.uuid4().hex[:8]}", state=Pending())
    return client.create_flow_run(stage_flow, name=name, tags=tags, parent_task_run_id=task_run.id,
                                  parameters=stage_flow.serialize_parameters(parameters), state=Pending())
