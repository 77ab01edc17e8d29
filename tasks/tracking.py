"""MLflow tracking for the stages: one parent run per pipeline execution, a nested run per stage.

The core writes metrics as a local JSONL stream; this module forwards that stream to MLflow. Forwarding is
idempotent (a sidecar file remembers how many lines reached which run), so a tracking-server outage loses
nothing and doubles nothing: what could not be sent is sent on the next flush.

Default tracking URI: ``sqlite:///<project>/mlflow.db`` (absolute; MLflow 3 refuses a bare ./mlruns store);
``MLFLOW_TRACKING_URI`` set by the user overrides it (MLflow's own export of the URI to that variable is undone,
see ``_use_store``). ``VLGRPO_PARENT_RUN_ID`` nests stage runs under a pipeline run. A run opened inside a
Prefect flow run carries its id, name and UI address (tags ``prefect.flow_run_id``, ``prefect.flow_run_name``,
``prefect.flow_run_url``).

Every run records the process that owns it (tags ``vlgrpo.host``, ``vlgrpo.pid``, ``vlgrpo.pid_started``). A
process killed with SIGKILL cannot end its run, so each stage and pipeline run first looks for RUNNING runs
whose owner on this host is gone and marks them KILLED (tag ``vlgrpo.killed_reason`` says when and why). A run
whose process is alive, or that belongs to another host, is never touched: projects may share one server.

What a run holds, so that the MLflow UI shows each thing where a user looks for it:

- the experiment is tagged ``mlflow.experimentKind: custom_model_development`` (MLflow opens it in the
  classic runs view, not the GenAI one);
- every run carries MLflow's own ``mlflow.source.git.commit`` (and the DVC lock's hash, the data's md5);
- a stage run logs only its own params (the ``params:`` list of its stage in dvc.yaml); the pipeline run
  logs them all, so two executions compare at the top of the run list;
- a stage's report is an artifact (``reports/<stage>.json``) with a few headline values as run metrics
  (``summary_metrics``): curves are for values per step, the rest of a report is read in the file;
- the pipeline run ends with the headline results of the execution (test metrics of base and candidate,
  the decision, the registered version), the names of the stages that ran, and the evaluation report.

MLflow is called only from tasks/ (this module, the registry and the stage tasks); flows/ go through them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from tasks.common import BackgroundLoop
from vlgrpo.config import Config

log = logging.getLogger("vlgrpo.tracking")
PARENT_ENV = "VLGRPO_PARENT_RUN_ID"
# MLflow's UI opens an experiment without this tag in its GenAI view; this value is its classic ML view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
TRAIN_FLAGS_TAG = "vlgrpo.train_flags"
MAX_DELAY = 30.0  # seconds between two tries of one MLflow call
T = TypeVar("T")


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root).resolve() / 'mlflow.db')}"


def _use_store(uri: str) -> None:
    """Point this process's MLflow at ``uri`` and leave the environment as the user set it.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also export the URI to ``MLFLOW_TRACKING_URI`` /
    ``MLFLOW_REGISTRY_URI``; ``tracking_uri`` would then read the first project's store as a user override,
    and a second project set up in the same process (a test run, a notebook, a Prefect worker) would log to
    it. Child processes do not need the export: a stage works out the same default from its own root.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(root)
    _use_store(uri)
    client = MlflowClient()
    exp = retry(lambda: client.get_experiment_by_name(experiment), what="get experiment")
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # an experiment made before the tag was set
            retry(lambda: client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND),
                  what="tag experiment")
        return exp.experiment_id
    # A local store keeps artifacts beside mlflow.db; a server decides its own artifact root (MLflow turns
    # a local location into an absolute one whatever it is given, so this one is absolute too).
    location = (Path(root).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(experiment, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:                 # not a concurrent creation by another stage: the store's own error
            raise
        return exp.experiment_id


def retry(fn: Callable[[], T], *, what: str, attempts: int | None = None, base_delay: float = 0.5) -> T:
    """Call ``fn`` with exponential backoff; re-raise with a clear message after the last attempt."""
    attempts = attempts or int(os.environ.get("VLGRPO_MLFLOW_RETRIES", "5"))
    from vlgrpo.io import DiskFull

    for i in range(attempts):
        try:
            return fn()
        except DiskFull:  # a full disk does not clear itself in seconds: say so at once
            raise
        except Exception as e:  # noqa: BLE001 - network and server errors come in many types
            if i == attempts - 1:
                raise RuntimeError(f"MLflow {what} failed after {attempts} attempts: {e}") from e
            delay = min(base_delay * 2**i, MAX_DELAY)  # capped: a long outage is retried, not slept through
            log.warning("MLflow %s failed (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def flat_params(cfg: Config) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)

    walk("", cfg.to_dict())
    return out


def stage_params(cfg: Config, root: Path, stage: str) -> dict[str, str]:
    """The params a stage reads: the entries of its ``params:`` list in dvc.yaml (a section such as ``train``
    or one key such as ``data.min_pixels``); every param where dvc.yaml or the stage is missing."""
    import yaml

    params = flat_params(cfg)
    try:
        wanted = (yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {})["stages"][stage]["params"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return params
    keys = [str(w) for w in wanted if isinstance(w, str)]
    return {k: v for k, v in params.items() if any(k == w or k.startswith(w + ".") for w in keys)}


def _git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags(root: Path) -> dict[str, str]:
    """Which code, data and pipeline state produced this run."""
    tags = {GIT_COMMIT_TAG: _git_commit(root)}
    lock = Path(root) / "dvc.lock"
    if lock.exists():
        tags["dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
        tags["data_md5"] = _data_md5(lock)
    return tags


def _data_md5(lock: Path) -> str:
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get("data", {}).get("outs", []):
        if out.get("path", "").endswith("manifest.jsonl"):
            return out.get("md5", "unknown")
    return "unknown"


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run this MLflow run belongs to (id, name, UI address); empty outside a flow run."""
    import sys

    if "prefect" not in sys.modules:     # no flow runs in a process that never imported prefect
        return {}
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    from prefect.utilities.urls import url_for

    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    url = url_for("flow-run", obj_id=flow_run.id)  # the UI's page of the run; None without a UI address
    if url:
        tags["prefect.flow_run_url"] = url
    return tags


HOST_TAG, PID_TAG, PID_STARTED_TAG = "vlgrpo.host", "vlgrpo.pid", "vlgrpo.pid_started"
KILLED_TAG = "vlgrpo.killed_reason"


def _started(pid: int) -> str | None:
    """The process's start time (seconds since the epoch, 2 decimals), or None when it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent: dead
            return None
        return f"{proc.create_time():.2f}"
    except psutil.Error:
        return None


def owner_tags() -> dict[str, str]:
    """Which process owns a run: host, pid, and the pid's start time (so a reused pid is not mistaken)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            PID_STARTED_TAG: _started(os.getpid()) or "unknown"}


def owner_alive(tags: dict[str, str]) -> bool:
    """True unless the tags name a process on this host that no longer runs (unknown owner: alive)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not str(tags.get(PID_TAG, "")).isdigit():
        return True
    started = _started(int(tags[PID_TAG]))
    recorded = tags.get(PID_STARTED_TAG, "unknown")
    return started is not None and (recorded == "unknown" or started == recorded)


def reap_orphans(experiment_id: str, by: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose owning process on this host is dead.

    Returns the ids marked. Runs of live processes, of other hosts, or without owner tags are left alone.
    A failure here never stops the stage: it is logged and the next run tries again.
    """
    client = MlflowClient()
    host = socket.gethostname()
    try:
        runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = "
                                  f"'{host}'", max_results=1000)
        marked = []
        for r in runs:
            if owner_alive(r.data.tags):
                continue
            when = datetime.now(timezone.utc).isoformat(timespec="seconds")
            client.set_tag(r.info.run_id, KILLED_TAG,
                           f"{when}: marked KILLED by {by} (pid {os.getpid()}): its process "
                           f"{r.data.tags.get(PID_TAG)} on {host} no longer runs (killed or crashed)")
            client.set_terminated(r.info.run_id, "KILLED")
            marked.append(r.info.run_id)
            log.warning("MLflow run %s (%s) was left RUNNING by dead process %s; marked KILLED",
                        r.info.run_id, r.info.run_name, r.data.tags.get(PID_TAG))
        return marked
    except Exception as e:  # noqa: BLE001 - housekeeping must never fail the stage
        log.warning("could not check for orphaned MLflow runs: %s", e)
        return []


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config, root: Path, tags: dict[str, str] | None = None) -> Iterator[str]:
    """Open the stage's MLflow run (nested under the pipeline run when there is one); yield its id.

    ``cfg`` is logged as the run's params (the stage's own: ``stage_params``): pass the config the stage
    really runs with (e.g. after the pilot's auto-adjustments), and say what differs from params.yaml in
    ``tags``.
    """
    exp_id = setup(root, cfg.register.experiment)
    reap_orphans(exp_id, by=f"stage {stage}")
    parent = os.environ.get(PARENT_ENV)
    tags = {"vlgrpo.stage": stage, **provenance_tags(root), **owner_tags(), **prefect_tags(), **(tags or {})}
    # A tracking-server or database restart at this moment must not fail the stage: retry opening the run.
    run = retry(lambda: mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent,
                                         nested=bool(parent), tags=tags,
                                         log_system_metrics=stage in ("base", "pilot", "train")),
                what=f"start the {stage} stage run")
    with _ending(run):
        retry(lambda: mlflow.log_params(stage_params(cfg, root, stage)), what="log stage params")
        yield run.info.run_id


@contextlib.contextmanager
def _ending(run: mlflow.ActiveRun) -> Iterator[None]:
    """End ``run`` FINISHED, or FAILED when the body raised, retrying across a server/database restart.

    MLflow's own ``with run:`` pops the run and then makes one unretried ``set_terminated`` call: a restart
    at that moment failed a stage whose work was done, and left the run RUNNING.
    """
    status = "FINISHED"
    try:
        yield
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _end_run(run.info.run_id, status)


def _end_run(run_id: str, status: str) -> None:
    try:
        mlflow.end_run(status)  # pops the active-run stack first, then calls the server once
    except Exception as e:  # noqa: BLE001 - the stack is popped; only the server call is left to redo
        log.warning("MLflow could not end run %s (%s); retrying", run_id, e)
        retry(lambda: MlflowClient().set_terminated(run_id, status), what=f"end run {run_id}")


@contextlib.contextmanager
def pipeline_run(cfg: Config, root: Path) -> Iterator[str]:
    """The parent run of one pipeline execution; stage runs started inside it (same or child process) nest.

    It logs every param (what differs between two executions shows in MLflow's run comparison) and, when
    the body ends, the execution's results (``summarize_pipeline``).
    """
    exp_id = setup(root, cfg.register.experiment)
    reap_orphans(exp_id, by="pipeline")
    run = retry(lambda: mlflow.start_run(experiment_id=exp_id, run_name="pipeline", tags={
        "vlgrpo.stage": "pipeline", **provenance_tags(root), **owner_tags(), **prefect_tags()}),
        what="start the pipeline run")
    run_id = run.info.run_id
    with _ending(run):
        retry(lambda: mlflow.log_params(flat_params(cfg)), what="log pipeline params")
        old = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run_id
        ok = False
        try:
            yield run_id
            ok = True
        finally:
            if old is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = old
            summarize_pipeline(run_id, exp_id, root, ok)


HEADLINE_SPLIT = "test"


def pipeline_summary(root: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The execution's headline results from reports/ → (metrics, tags): each evaluated model's test
    metrics (``test.<model>.<metric>``), the paired difference to base, the decision and the version."""
    from tasks.common import read_report

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    ev = read_report(root, "evaluate") or {}
    for name in ev.get("metrics", []):
        for model in ("base", "candidate", "champion"):
            v = (ev.get(model) or {}).get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[f"{HEADLINE_SPLIT}.{model}.{name}"] = float(v)
        v = (ev.get("delta_vs_base") or {}).get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[f"{HEADLINE_SPLIT}.candidate_minus_base.{name}"] = float(v)
    decision = ev.get("decision") or {}
    if "promote" in decision:
        metrics["decision.promote"] = float(bool(decision["promote"]))
        tags["vlgrpo.decision"] = ("promote" if decision["promote"] else "keep champion") + \
            (f" (against {decision['against']})" if decision.get("against") else "")
        tags["vlgrpo.decision_reasons"] = "; ".join(decision.get("reasons", []))[:5000]
    reg = read_report(root, "register") or {}
    if reg.get("model_uri"):
        tags["vlgrpo.registered_model"] = reg["model_uri"]
        tags["vlgrpo.promoted"] = str(bool(reg.get("promoted")))
    train = read_report(root, "train") or {}
    if (train.get("watch") or {}).get("flags"):
        tags[TRAIN_FLAGS_TAG] = "; ".join(f["message"] for f in train["watch"]["flags"])[:5000]
    return metrics, tags


def summarize_pipeline(run_id: str, experiment_id: str, root: Path, ok: bool) -> None:
    """End-of-execution record on the pipeline run: which stages ran (tag ``vlgrpo.stages_run``) and, after a
    successful execution, the headline results (``pipeline_summary``) and the evaluation report (HTML).

    After a failed execution the reports may be an earlier execution's: only the stages are recorded. A
    failure here is logged, never raised: the execution's own outcome stands.
    """
    client = MlflowClient()
    try:
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                                      order_by=["attributes.start_time ASC"], max_results=100)
        client.set_tag(run_id, "vlgrpo.stages_run", ",".join(r.info.run_name for r in children) or "none")
        if not ok:
            return
        metrics, tags = pipeline_summary(Path(root))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(_metric_key(k), v, now, 0) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        html = Path(root) / "reports" / "evaluate.html"
        if html.exists():
            client.log_artifact(run_id, str(html), "reports")
    except Exception as e:  # noqa: BLE001 - a summary must never change the execution's outcome
        log.warning("could not record the pipeline's results on MLflow run %s: %s", run_id, e)


def log_files(run_id: str, files: dict[Path, str]) -> str:
    """Log files or folders (path -> artifact folder) to the run; returns where the run can be found."""
    client = MlflowClient()
    for path, dest in files.items():
        if Path(path).is_dir():
            retry(lambda p=path, d=dest: client.log_artifacts(run_id, str(p), d), what=f"log {dest}")
        else:
            retry(lambda p=path, d=dest: client.log_artifact(run_id, str(p), d), what=f"log {dest}")
    return f"{mlflow.get_tracking_uri()} run {run_id}"


def summary_metrics(data: dict[str, Any]) -> dict[str, float]:
    """A report's headline values, logged as run metrics: its top-level numbers and flags and, in an
    evaluation report, each model's headline metrics and the paired differences. Nested blocks (a
    stage's last metrics row, per-task tables, intervals) stay in the report file only: one-point charts
    of them would bury the training curves on the run page."""
    out = {k: v for k, v in _numeric_leaves({k: v for k, v in data.items() if not isinstance(v, dict)}).items()}
    for name in data.get("metrics", []) if isinstance(data.get("metrics"), list) else []:
        for block in ("base", "candidate", "champion", "delta_vs_base", "delta_vs_champion"):
            v = (data.get(block) or {}).get(name) if isinstance(data.get(block), dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                out[f"{block}.{name}"] = float(v)
    decision = data.get("decision")
    if isinstance(decision, dict) and "promote" in decision:
        out["decision.promote"] = float(bool(decision["promote"]))
    watch = data.get("watch")
    if isinstance(watch, dict):
        out["watch.flagged"] = float(bool(watch.get("flags")))
        out["watch.stopped_early"] = float(bool(watch.get("stopped")))
    return out


def log_report(path: Path, run_id: str | None = None) -> None:
    """Log a report JSON's headline values (``summary_metrics``) as metrics and the file as an artifact."""
    data = json.loads(Path(path).read_text())
    metrics = summary_metrics(data) if isinstance(data, dict) else {}
    client = MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    batch = [Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 500):
        retry(lambda b=batch[i:i + 500]: client.log_batch(run_id, metrics=b), what="log report metrics")
    retry(lambda: client.log_artifact(run_id, str(path), "reports"), what="log report artifact")
    flags = (data.get("watch") or {}).get("flags") if isinstance(data, dict) else None
    if flags:  # the training watch's findings, in words, where the run list shows them
        text = "; ".join(str(f.get("message")) for f in flags)[:5000]
        retry(lambda: client.set_tag(run_id, TRAIN_FLAGS_TAG, text), what="tag watch flags")


def _numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float)) and obj == obj and abs(obj) != float("inf"):
        out[prefix] = float(obj)
    return out


def _metric_key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space : / ; map anything else to _.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in k)[:250]


class StreamForwarder(BackgroundLoop):
    """Forward a metrics JSONL stream (one object per step) to an MLflow run, exactly once per line.

    ``flush()`` sends lines not yet acknowledged and records the count in ``<stream>.mlflow-<run>``; a
    failure (server down) leaves the count where it was, so the next flush resends from there. A background
    thread flushes every ``interval`` seconds while training runs.
    """

    name = "metrics forwarding to MLflow"

    def __init__(self, stream: Path, run_id: str, prefix: str = "", interval: float = 5.0):
        self.stream, self.run_id, self.prefix, self.interval = Path(stream), run_id, prefix, interval
        self.sidecar = self.stream.with_name(f".{self.stream.name}.mlflow-{run_id}")
        self._lock = threading.Lock()

    def _sent(self) -> int:
        try:
            return int(self.sidecar.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def flush(self) -> int:
        """Send pending complete lines; returns how many were sent now. Raises if the server is down."""
        with self._lock:
            if not self.stream.exists():
                return 0
            lines = self.stream.read_text(encoding="utf-8").split("\n")[:-1]  # drop the partial tail
            sent = self._sent()
            pending = lines[sent:]
            if not pending:
                return 0
            client = MlflowClient()
            batch: list[Metric] = []
            for line in pending:
                row = json.loads(line)
                step = int(row.get("step", 0))
                ts = int(row.get("timestamp", time.time()) * 1000)
                for k, v in row.items():
                    if k in ("step", "timestamp") or isinstance(v, bool) or not isinstance(v, (int, float)):
                        continue
                    if v != v or abs(v) == float("inf"):
                        continue
                    batch.append(Metric(_metric_key(self.prefix + k), float(v), ts, step))
            for i in range(0, len(batch), 1000):
                client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            from vlgrpo.io import atomic_write_text

            atomic_write_text(self.sidecar, str(sent + len(pending)))
            return len(pending)

    def tick(self) -> None:
        self.flush()  # an outage raises here; BackgroundLoop logs it and the next flush resends

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        # Final flush: retry with backoff so a server that comes back in time receives everything.
        retry(self.flush, what="metrics flush", attempts=int(os.environ.get("VLGRPO_MLFLOW_RETRIES", "8")))
