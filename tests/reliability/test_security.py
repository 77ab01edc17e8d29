"""Security defaults, each shown against the real thing:

* weights are safetensors only; every ``torch.load`` in the code uses ``weights_only=True`` (the source is
  parsed) and a checkpoint whose optimizer file is a code-running pickle is refused - the payload, which does
  run under ``weights_only=False``, never runs;
* ``trust_remote_code`` is off unless params say so: a model folder that ships its own code is refused by the
  base stage's loader and its code never runs;
* dataset paths are confined to the dataset's folder and remote fetching is off by default (a local HTTP
  server sees no request);
* MLflow basic auth on a real ``mlflow server --app-name basic-auth``: a stage succeeds with credentials
  from MLFLOW_TRACKING_USERNAME/PASSWORD and fails clearly without; the password appears in no param, tag,
  report, artifact, project file or log.
"""
from __future__ import annotations

import ast
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.project import run
from tests.reliability.conftest import REPO, VLGRPO, update_params
from tests.servers import mlflow_server
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.reliability
CODE_DIRS = ("vlgrpo", "tasks", "flows")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def test_source_never_unpickles_unsafely_nor_enables_remote_code():
    torch_loads, problems = 0, []
    for d in CODE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            rel = path.relative_to(REPO)
            for owner, name, kw, node in _calls(ast.parse(path.read_text(), str(path))):
                where = f"{rel}:{node.lineno}"
                if owner == "torch" and name == "load":
                    torch_loads += 1
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if owner in ("pickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
                    problems.append(f"{where}: {owner}.{name}")
                tr = kw.get("trust_remote_code")
                if isinstance(tr, ast.Constant) and tr.value is True:
                    problems.append(f"{where}: trust_remote_code=True hard-coded")
                ss = kw.get("safe_serialization")
                if isinstance(ss, ast.Constant) and ss.value is False:
                    problems.append(f"{where}: safe_serialization=False")
    assert problems == []
    assert torch_loads >= 3          # the checkpoint loader's three files were found and checked


class _Payload:
    """Unpickling this calls os.mkdir(target): what an attacker's 'optimizer state' would do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def _train(root: Path, stop_after: int | None = None) -> dict:
    from vlgrpo.config import load_config

    cfg = load_config(root / "params.yaml")
    return train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", "models/candidate",
                        "reports/train_metrics.jsonl"), progress=False, stop_after=stop_after)


def test_weights_are_safetensors_and_a_malicious_checkpoint_pickle_is_refused(project, tmp_path):
    s = _train(project, stop_after=2)
    assert s["steps"] == 2
    ckpt = latest_checkpoint(project / "models/candidate")
    assert ckpt.name == "step-2"

    # Only safetensors hold weights; the .pt files are optimizer/scheduler/RNG state, plain tensors.
    files = [p for p in (project / "models").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".jinja", ".pt", ".txt"}
    assert sorted(p.name for p in files if p.suffix == ".pt") == ["optimizer.pt", "rng_state.pt", "scheduler.pt"]
    assert sorted(p.name for p in files if p.suffix == ".safetensors") == ["model.safetensors"] * 2
    for p in files:
        if p.suffix == ".pt":
            torch.load(p, weights_only=True)       # loads as pure data

    sentinel = tmp_path / "pwned"
    torch.save(_Payload(sentinel), ckpt / "optimizer.pt")
    with pytest.raises(TrainingError, match=r"step-2: cannot resume from this checkpoint: .*[Ww]eights.only"):
        _train(project)
    assert not sentinel.exists()
    # The payload is live: a plain pickle load (weights_only=False), in a separate process, runs it.
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(ckpt / "optimizer.pt")], check=True, capture_output=True)
    assert sentinel.is_dir()


EVIL_CODE = '''
import os, pathlib
pathlib.Path(os.environ["VLGRPO_TEST_SENTINEL"]).mkdir()   # runs on import: remote code executed
'''


def test_model_with_custom_code_is_refused_without_trust_remote_code(project, tmp_path, monkeypatch):
    from vlgrpo.train.warm_start import run_base
    from vlgrpo.config import load_config
    from vlgrpo.model.loading import ModelLoadError

    evil = project / "evil-model"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil_vl", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}}))
    (evil / "evil.py").write_text(EVIL_CODE)
    sentinel = tmp_path / "ran"
    monkeypatch.setenv("VLGRPO_TEST_SENTINEL", str(sentinel))
    assert load_config(REPO / "params.yaml").base.trust_remote_code is False      # the shipped default
    update_params(project, base={"model": "evil-model"})
    cfg = load_config(project / "params.yaml")
    assert cfg.base.trust_remote_code is False
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        run_base(cfg, project, project / "data/manifest.jsonl", progress=False)
    assert not sentinel.exists()
    assert not (project / "models/base/evil.py").exists()


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _Recorder.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_dataset_paths_confined_and_no_remote_fetch_by_default(project, tmp_path):
    from PIL import Image

    from vlgrpo.config import load_config
    from vlgrpo.data.build import BuildError, build_dataset
    from vlgrpo.data.validation import check_file

    srv = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ds = project / "dataset"
        ds.mkdir()
        outside = tmp_path / "secret.png"
        Image.new("RGB", (64, 64), (200, 0, 0)).save(outside)
        (ds / "link.png").symlink_to(outside)
        images = ["../../secret.png", str(outside), "link.png", f"http://127.0.0.1:{srv.server_port}/x.png"]
        rows = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                              {"role": "assistant", "content": "red"}], "images": [im]} for im in images]
        (ds / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        update_params(project, data={"source": "jsonl", "path": "dataset/train.jsonl"})
        cfg = load_config(project / "params.yaml")
        assert cfg.data.allow_remote is False                                   # the shipped default

        _, kept, findings, stats, _ = check_file(ds / "train.jsonl", cfg)
        assert kept == [] and stats["error_rows"] == 4
        assert sorted(f["check"] for f in findings) == ["path_escape"] * 3 + ["remote_url"]
        with pytest.raises(BuildError, match="no valid rows out of 4"):
            build_dataset(cfg, project)
        assert _Recorder.hits == []                                              # nothing was fetched
        cache = project / "data/cache"
        from PIL import Image as _I
        red = [p for p in cache.rglob("*.png") if _I.open(p).convert("RGB").getpixel((0, 0)) == (200, 0, 0)]
        assert red == []                                # the file outside was never copied in
    finally:
        srv.shutdown()


SECRET = "Rel-s3cret-9f2c7e1a"


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_mlflow_basic_auth_with_env_credentials_and_no_secret_leaks(project, cli_env, tmp_path):
    from mlflow.tracking import MlflowClient

    import importlib.util

    assert importlib.util.find_spec("flask_wtf"), "mlflow basic auth needs mlflow[auth]: pip install Flask-WTF"
    ini = tmp_path / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                   f"admin_username = admin\nauthorization_function = "
                   f"mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": SECRET,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "rel-test-flask-key"}
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    with mlflow_server(srv_dir, f"sqlite:///{srv_dir / 'mlflow.db'}", ["--app-name", "basic-auth"], env) as srv:
        base = {"MLFLOW_TRACKING_URI": srv.url, **cli_env}
        # Without credentials: refused by the server, reported clearly, after the retry limit.
        p = run([VLGRPO, "data"], project, timeout=300, check=False, VLGRPO_MLFLOW_RETRIES="2",
                MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", **base)
        out = p.stdout + p.stderr
        assert p.returncode == 1, out[-3000:]
        assert "failed after 2 attempts" in out and ("401" in out or "nauthorized" in out), out[-3000:]
        assert not (project / "reports/data.json").exists()

        # With credentials from the environment: the stage runs and logs to the protected server.
        p = run([VLGRPO, "data"], project, timeout=300, MLFLOW_TRACKING_USERNAME="admin",
                MLFLOW_TRACKING_PASSWORD=SECRET, **base)
        report = json.loads((project / "reports/data.json").read_text())
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", SECRET
        try:
            client = MlflowClient(tracking_uri=srv.url)
            r = client.get_run(report["mlflow_run_id"])
            artifacts = [a.path for a in client.list_artifacts(r.info.run_id, "reports")]
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        assert r.info.status == "FINISHED" and artifacts == ["reports/data.json"]

    # The secret is nowhere: not in params or tags, reports, project files, artifacts, or the stage's logs.
    assert not [k for k, v in {**r.data.params, **r.data.tags}.items() if SECRET in v or SECRET in k]
    assert "MLFLOW_TRACKING_PASSWORD" not in json.dumps({**r.data.params, **r.data.tags})
    assert SECRET not in p.stdout + p.stderr + out
    assert _grep_tree(project, SECRET.encode()) == []
    assert _grep_tree(srv_dir / "mlflow-artifacts", SECRET.encode()) == []
    assert (srv_dir / "mlflow-artifacts").is_dir() and any((srv_dir / "mlflow-artifacts").rglob("data.json"))
