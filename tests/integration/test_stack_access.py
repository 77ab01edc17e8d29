"""The role matrix of the docker/ stack's MLflow, on a real `mlflow server --app-name basic-auth`.

docker/mlflow_access.py (the stack's `mlflow-access` service) sets up the pipeline and viewer users; each
role then does, through the real REST API, what it may and what it may not. The `champion` move goes
through the register stage's own code (tasks.registry.promote). `make test-stack` repeats the key rows
against the running compose stack.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.servers import mlflow_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]   # a server and six mlflow_access.py runs: minutes on 2 busy cores

ROOT = Path(__file__).resolve().parents[2]
MODEL, EXPERIMENT = "vlgrpo-qwen-vl", "vlgrpo"
USERS = {"admin": "Adm1n-k7Qx2-secret", "vlgrpo-pipeline": "P1pe-x9Zr4-secret", "viewer": "V1ew-m3Lp8-secret"}


@contextlib.contextmanager
def signed_in(user: str | None, password: str | None = None):
    """MLflow's client reads the credentials from the environment at each request."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    for k, v in zip(saved, (user, password if password is not None else USERS.get(user or ""))):
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def status_of(call) -> int:
    """HTTP status of an MLflow client call: 200, or the status code of the error it raised."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as e:
        return e.get_http_status_code()
    return 200


def run_access(url: str, **changes: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "MLFLOW_TRACKING_URI": url,
           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": USERS["admin"],
           "MLFLOW_PIPELINE_USER": "vlgrpo-pipeline", "MLFLOW_PIPELINE_PASSWORD": USERS["vlgrpo-pipeline"],
           "MLFLOW_VIEWER_USER": "viewer", "MLFLOW_VIEWER_PASSWORD": USERS["viewer"],
           "MLFLOW_EXPERIMENT": EXPERIMENT, "MLFLOW_MODEL_NAME": MODEL, **changes}
    return subprocess.run([sys.executable, str(ROOT / "docker/mlflow_access.py")], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack-access")
    ini = tmp / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": USERS["admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "stack-access-test-key"}
    with mlflow_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}", ["--app-name", "basic-auth"], env) as srv:
        first, again = run_access(srv.url), run_access(srv.url)
        assert first.returncode == 0, first.stderr[-2000:]
        assert again.returncode == 0, again.stderr[-2000:]   # a second run converges, it does not fail
        for user in ("vlgrpo-pipeline", "viewer"):
            assert f"user '{user}' (created)" in first.stdout and f"user '{user}' (password set)" in again.stdout
        assert not any(p in first.stdout + first.stderr + again.stdout + again.stderr for p in USERS.values())
        yield srv


def test_role_matrix_on_the_experiment_and_the_registered_model(auth_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks import registry

    monkeypatch.setenv("VLGRPO_MLFLOW_RETRIES", "1")     # a refusal is final: no backoff to wait through
    # Both URIs explicit: an earlier test in this worker may have set MLflow's process-wide registry URI.
    client = MlflowClient(tracking_uri=auth_server.url, registry_uri=auth_server.url)
    api = f"{auth_server.url}/api/2.0/mlflow"
    # Nobody gets in without a valid login (the UI's start page included).
    assert requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": EXPERIMENT},
                        timeout=30).status_code == 401
    assert requests.get(auth_server.url, timeout=30).status_code == 401
    assert requests.get(f"{api}/registered-models/get", params={"name": MODEL}, timeout=30,
                        auth=("viewer", "not-the-password")).status_code == 401

    with signed_in("admin"):
        exp = client.get_experiment_by_name(EXPERIMENT)
        assert exp is not None and client.get_registered_model(MODEL).name == MODEL

    # The pipeline writes: a run with a param, metric and artifact; a version; the candidate and champion
    # aliases through the register stage's own promote().
    art = tmp_path / "model.txt"
    art.write_text("weights stand-in")
    with signed_in("vlgrpo-pipeline"):
        run = client.create_run(exp.experiment_id)
        client.log_param(run.info.run_id, "lr", "0.1")
        client.log_metric(run.info.run_id, "reward", 0.5)
        client.log_artifact(run.info.run_id, str(art), "model")
        client.set_terminated(run.info.run_id)
        # The register stage tolerates "already exists": the admin owns the model, the pipeline adds versions.
        assert "RESOURCE_ALREADY_EXISTS" in str(pytest.raises(Exception, client.create_registered_model, MODEL).value)
        mv = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        registry._wait_ready(client, MODEL, mv)
        client.set_registered_model_alias(MODEL, "candidate", mv.version)
        promoted = registry.promote(client, MODEL, mv.version, reason="gate passed", by="vlgrpo-pipeline")
        assert registry.champion_version(client, MODEL) == mv.version == promoted["version"]
        # ... but destroys nothing and hands out nothing.
        assert status_of(lambda: client.delete_registered_model_alias(MODEL, "champion")) == 403
        assert status_of(lambda: client.delete_model_version(MODEL, mv.version)) == 403
        assert status_of(lambda: client.delete_run(run.info.run_id)) == 403
        assert status_of(lambda: client.delete_registered_model(MODEL)) == 403
        r = requests.post(f"{auth_server.url}/api/3.0/mlflow/users/permissions/grant", timeout=30,
                          auth=("vlgrpo-pipeline", USERS["vlgrpo-pipeline"]),
                          json={"username": "viewer", "resource_type": "registered_model", "resource_id": MODEL,
                                "permission": "MANAGE"})
        assert r.status_code == 403, r.text
        made = requests.post(f"{auth_server.url}/api/2.0/mlflow/users/create", timeout=30,
                             auth=("vlgrpo-pipeline", USERS["vlgrpo-pipeline"]),
                             json={"username": "intruder", "password": "Intruder-pass-123"})
        assert made.status_code == 403, made.text
    with signed_in("admin"):
        v2 = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        registry._wait_ready(client, MODEL, v2)

    # The viewer reads everything, writes nothing: above all it cannot move `champion`.
    with signed_in("viewer"):
        assert client.get_run(run.info.run_id).data.params == {"lr": "0.1"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.txt"]
        assert registry.champion_version(client, MODEL) == mv.version
        assert status_of(lambda: client.set_registered_model_alias(MODEL, "champion", v2.version)) == 403
        with pytest.raises(RuntimeError, match=r"failed after 1 attempts.*(403|PERMISSION_DENIED)"):
            registry.promote(client, MODEL, v2.version, reason="by hand", by="viewer")
        assert status_of(lambda: client.delete_registered_model_alias(MODEL, "champion")) == 403
        assert status_of(lambda: client.create_run(exp.experiment_id)) == 403
        assert status_of(lambda: client.log_param(run.info.run_id, "x", "1")) == 403
        assert status_of(lambda: client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model")) == 403
    with signed_in("admin"):
        assert registry.champion_version(client, MODEL) == mv.version       # the viewer's tries moved nothing
        client.set_registered_model_alias(MODEL, "champion", v2.version)    # the admin may
        assert registry.champion_version(client, MODEL) == v2.version


def test_changed_password_in_the_settings_replaces_the_old_one(auth_server):
    url = f"{auth_server.url}/api/2.0/mlflow/registered-models/get"
    assert requests.get(url, params={"name": MODEL}, auth=("viewer", USERS["viewer"]), timeout=30).ok
    done = run_access(auth_server.url, MLFLOW_VIEWER_PASSWORD="V1ew-rotated-q2Wn")
    assert done.returncode == 0, done.stderr[-2000:]
    assert requests.get(url, params={"name": MODEL}, auth=("viewer", USERS["viewer"]), timeout=30).status_code == 401
    assert requests.get(url, params={"name": MODEL}, auth=("viewer", "V1ew-rotated-q2Wn"), timeout=30).ok
    back = run_access(auth_server.url)
    assert back.returncode == 0, back.stderr[-2000:]


def test_missing_or_clashing_settings_stop_with_the_variable_named(auth_server):
    missing = run_access(auth_server.url, MLFLOW_PIPELINE_PASSWORD="")
    assert missing.returncode == 1 and "MLFLOW_PIPELINE_PASSWORD is not set" in missing.stderr
    clash = run_access(auth_server.url, MLFLOW_VIEWER_USER="admin")
    assert clash.returncode == 1 and "three different names" in clash.stderr
    wrong = run_access(auth_server.url, MLFLOW_TRACKING_PASSWORD="not-the-admin-password")
    assert wrong.returncode == 1 and "mlflow-access:" in wrong.stderr and "Traceback" not in wrong.stderr
