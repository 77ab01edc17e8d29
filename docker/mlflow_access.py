"""Users and permissions of the stack's MLflow server (its basic-auth app), set from docker/.env.

The compose service `mlflow-access` runs this once after `mlflow` is healthy (`docker compose up` does it);
run it again after changing a password or a name in docker/.env:

    docker compose -f docker/compose.yaml run --rm mlflow-access

It signs in as the admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and makes the server match
the settings, whatever it held before (so running it twice changes nothing):

* the pipeline user (MLFLOW_PIPELINE_USER / _PASSWORD): EDIT on the experiment (MLFLOW_EXPERIMENT) and the
  registered model (MLFLOW_MODEL_NAME): it creates runs, logs, registers versions and moves the aliases
  (`candidate`, and `champion` when the register stage's gate passes); it cannot delete, nor grant;
* the viewer (MLFLOW_VIEWER_USER / _PASSWORD), the read-only login for people: READ on both, so it sees
  every run, artifact and version but cannot log, register or move an alias;
* the experiment and the registered model are created here, by the admin, when missing, so that neither
  the pipeline nor anyone else becomes their owner (MLflow gives a creator MANAGE).

Passwords come only from the environment and are never printed. Exit status 1 with the reason on error.
"""
from __future__ import annotations

import os
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient

EDIT, READ = "EDIT", "READ"


def _need(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"mlflow-access: {name} is not set (docker/.env; python3 docker/init_env.py fills it)")
    return value


def _code(e: MlflowException) -> str:
    return getattr(e, "error_code", "") or ""


def ensure_user(auth: AuthServiceClient, username: str, password: str) -> str:
    """Create the user, or give an existing one the password of the settings. Returns what was done."""
    try:
        auth.get_user(username)
    except RestException as e:
        if _code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return "created"
    auth.update_user_password(username, password)
    return "password set"


def ensure_permission(auth: AuthServiceClient, username: str, resource_type: str, resource_id: str,
                      permission: str) -> None:
    """The user's own grant on one resource is exactly ``permission`` (granting fails on an existing row)."""
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except RestException as e:
        if _code(e) != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except RestException as e:
        if _code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)


def main() -> None:
    uri = _need("MLFLOW_TRACKING_URI")
    _need("MLFLOW_TRACKING_USERNAME")
    _need("MLFLOW_TRACKING_PASSWORD")
    experiment = os.environ.get("MLFLOW_EXPERIMENT") or "vlgrpo"
    model = os.environ.get("MLFLOW_MODEL_NAME") or "vlgrpo-qwen-vl"
    roles = {_need("MLFLOW_PIPELINE_USER"): (_need("MLFLOW_PIPELINE_PASSWORD"), EDIT),
             _need("MLFLOW_VIEWER_USER"): (_need("MLFLOW_VIEWER_PASSWORD"), READ)}
    if len(roles) != 2 or os.environ["MLFLOW_TRACKING_USERNAME"] in roles:
        sys.exit("mlflow-access: the admin, pipeline and viewer users must have three different names")
    auth, client = AuthServiceClient(uri), MlflowClient(uri)
    try:
        exp_id = ensure_experiment(client, experiment)
        ensure_registered_model(client, model)
        for user, (password, level) in roles.items():
            done = ensure_user(auth, user, password)
            ensure_permission(auth, user, "experiment", exp_id, level)
            ensure_permission(auth, user, "registered_model", model, level)
            print(f"mlflow-access: user {user!r} ({done}): {level} on experiment {experiment!r} "
                  f"(id {exp_id}) and registered model {model!r}", flush=True)
    except MlflowException as e:
        sys.exit(f"mlflow-access: {uri}: {e.message}")


if __name__ == "__main__":
    main()
