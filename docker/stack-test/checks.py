"""Checks that docker/test-stack.sh runs inside the stack's containers (piped on stdin, nothing installed).

    docker compose ... exec -T prefect-worker python - flow-run ID   < docker/stack-test/checks.py
    docker compose ... exec -T prefect-worker python - registry      < docker/stack-test/checks.py
    docker compose ... exec -T model-server   python - serve N       < docker/stack-test/checks.py
    docker compose ... exec -T prefect-worker python - dump DIR      < docker/stack-test/checks.py

Each prints one JSON object on its last line (the script reads it) and exits non-zero with the reason when a
check fails. The URLs come from the container's own environment (PREFECT_API_URL, MLFLOW_TRACKING_URI), so
the checks talk to the servers exactly as the pipeline does - with its logins too (PREFECT_API_AUTH_STRING,
MLFLOW_TRACKING_USERNAME / _PASSWORD).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _get(url: str, body: dict | None = None, timeout: float = 60) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    login = os.environ.get("PREFECT_API_AUTH_STRING")
    if login and url.startswith(os.environ.get("PREFECT_API_URL", "\0")):
        # What Prefect's own client sends (HTTP basic).
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def flow_run(run_id: str) -> dict:
    """State of one flow run, the work pool that ran it, and how many flow runs the server knows."""
    api = os.environ["PREFECT_API_URL"].rstrip("/")
    run = _get(f"{api}/flow_runs/{run_id}")
    count = _get(f"{api}/flow_runs/count", {})
    return {"state": run["state"]["type"], "name": run["name"], "work_pool": run.get("work_pool_name"),
            "flow_runs_total": count, "terminal": run["state"]["type"] in TERMINAL,
            "message": (run["state"].get("message") or "")[:300]}


def registry(model: str = "vlgrpo-qwen-vl", experiment: str = "vlgrpo") -> dict:
    """Runs, versions, aliases and a digest of the champion's artifacts, through the tracking server."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no MLflow experiment {experiment!r} on {mlflow.get_tracking_uri()}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    versions = client.search_model_versions(f"name='{model}'")
    champion = client.get_model_version_by_alias(model, "champion")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model}@champion", dst_path=tmp))
        files = sorted(p for p in local.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.relative_to(local).as_posix().encode() + b"\0" + p.read_bytes())
        size = sum(p.stat().st_size for p in files)
    return {"tracking_uri": mlflow.get_tracking_uri(),
            "runs": sorted(f"{r.info.run_id}:{r.info.status}" for r in runs),
            "versions": sorted(v.version for v in versions), "champion": champion.version,
            "champion_run_id": champion.run_id, "artifact_files": len(files), "artifact_bytes": size,
            "artifact_sha256": digest.hexdigest()}


def serve(n: str = "4", url: str = "http://localhost:5001/invocations") -> dict:
    """Ask the served champion about the first N test items of the worker's manifest (images as base64
    bytes, the only input tasks/pyfunc_model.py takes), then send it hostile requests - a file path on the
    worker's data volume (mounted read-only here), max_new_tokens 10**9, more records than it allows - each
    of which must be a 400 with one message and no traceback, the good request answered alike after each."""
    import urllib.error

    data = Path("data")
    items = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines() if line.strip()]
    items = [it for it in items if it["split"] == "test"][: int(n)]
    paths = [(data / it["images"][0]).resolve() for it in items]
    records = [{"image": base64.b64encode(p.read_bytes()).decode(), "question": it["question"]}
               for p, it in zip(paths, items)]
    out = _get(url, {"dataframe_records": records}, timeout=300)
    answers = out["predictions"] if isinstance(out, dict) else out
    if len(answers) != len(records) or not all(isinstance(a, str) and a.strip() for a in answers):
        sys.exit(f"the served model gave {answers!r} for {len(records)} questions")
    hostile = {"file path": {"dataframe_records": [{"image": str(paths[0]), "question": items[0]["question"]}]},
               "max_new_tokens 10**9": {"dataframe_records": records[:1], "params": {"max_new_tokens": 10**9}},
               "10000 records": {"dataframe_records": records[:1] * 10_000}}
    refused = {}
    for what, body in hostile.items():
        try:
            _get(url, body, timeout=120)
            sys.exit(f"the served model answered a request with a {what} instead of refusing it")
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            if e.code != 400 or "Traceback" in text or "stack_trace" in text:
                sys.exit(f"a request with a {what} got {e.code}: {text[-500:]}")
            refused[what] = json.loads(text)["message"].split("Error: ")[-1]
        again = _get(url, {"dataframe_records": records}, timeout=300)
        if (again["predictions"] if isinstance(again, dict) else again) != answers:
            sys.exit(f"after the request with a {what} the served model answered {again!r}, not {answers!r}")
    return {"answers": answers, "solutions": [it.get("solution", "") for it in items],
            "questions": [it["question"] for it in items], "refused": refused}


def dump(out: str, model: str = "vlgrpo-qwen-vl", experiment: str = "vlgrpo") -> dict:
    """Everything the pipeline left on the servers, as files under OUT, for a search for secrets: every
    run's artifacts, params, tags and metrics keys, the model versions with their tags, and every flow
    run log line the Prefect server holds."""
    import mlflow
    from mlflow import MlflowClient

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    for r in runs:
        folder = root / "runs" / r.info.run_id
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(
            {"params": r.data.params, "tags": r.data.tags, "metrics": sorted(r.data.metrics)}))
        mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(folder / "artifacts"))
    # MLflow 3 keeps a logged model's files apart from its run's artifacts: each version's files too.
    versions = client.search_model_versions(f"name='{model}'")
    for v in versions:
        mlflow.artifacts.download_artifacts(f"models:/{model}/{v.version}", dst_path=str(root / "versions" / v.version))
    (root / "versions.json").write_text(json.dumps(
        [{"version": v.version, "tags": v.tags, "source": v.source, "run_id": v.run_id} for v in versions]))
    api = os.environ["PREFECT_API_URL"].rstrip("/")
    logs, offset = [], 0
    while True:
        page = _get(f"{api}/logs/filter", {"offset": offset, "limit": 200})
        logs += page
        offset += len(page)
        if len(page) < 200:
            break
    (root / "prefect-logs.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in logs))
    # What the server keeps of each flow run and deployment (parameters, job variables, ...).
    (root / "prefect-flow-runs.json").write_text(json.dumps(_get(f"{api}/flow_runs/filter", {"limit": 200})))
    (root / "prefect-deployments.json").write_text(json.dumps(_get(f"{api}/deployments/filter", {"limit": 200})))
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"runs": len(runs), "versions": len(versions), "prefect_log_lines": len(logs), "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    result = {"flow-run": flow_run, "registry": registry, "serve": serve, "dump": dump}[what](*args)
    print(json.dumps(result))
