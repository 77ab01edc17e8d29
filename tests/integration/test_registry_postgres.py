"""The MLflow registry on a real `mlflow server` backed by PostgreSQL: register, promote, load, serve.

A tiny Qwen2.5-VL checkpoint is logged as the pyfunc model the `register` stage logs; the champion loaded
through `models:/<name>@champion` must answer exactly what the checkpoint answers when loaded directly,
both in-process (pyfunc) and over HTTP (`mlflow models serve`).
"""
import base64
import io
import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.servers import BIN, free_port, mlflow_server, postgres_database, wait_http

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vlgrpo.config import TinyModelConfig
    from vlgrpo.model.loading import save_model
    from vlgrpo.model.tiny_model import build_tiny

    texts = ["How many red circles are there? Answer with one word.", "2", "red", "circle", "yes", "no"] * 20
    model, processor = build_tiny(texts, TinyModelConfig(), seed=0)
    return save_model(model, processor, tmp_path_factory.mktemp("ckpt") / "candidate")


def _png_b64(color=(220, 40, 40)) -> tuple[str, object]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), (128, 128, 128))
    ImageDraw.Draw(img).ellipse((30, 30, 80, 80), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode(), img


def test_register_promote_load_and_serve(tmp_path, monkeypatch, tiny_checkpoint):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from tasks.registry import champion_version, log_candidate, promote, register_version
    from tasks.tracking import setup
    from vlgrpo.data.manifest import Item
    from vlgrpo.model.decoding import Decoding, generate_answers
    from vlgrpo.model.loading import load_model

    name = f"vlgrpo-test-{uuid.uuid4().hex[:6]}"
    with postgres_database() as db, mlflow_server(tmp_path, db) as srv:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
        setup(tmp_path, "vlgrpo-it")
        client = MlflowClient()
        assert champion_version(client, name) is None
        with mlflow.start_run() as run:
            info = log_candidate(ROOT, tiny_checkpoint, 3136, 12544)
            v1 = register_version(client, name, info, run.info.run_id, {"evaluate.promote": "True"})
        assert client.get_registered_model(name).aliases == {"candidate": v1}
        rec = promote(client, name, v1, reason="beats base by 0.3", by="test")
        assert champion_version(client, name) == v1
        tags = client.get_model_version(name, v1).tags
        assert tags["promotion.reason"] == "beats base by 0.3" and tags["promotion.previous_champion"] == "none"
        assert rec["promotion.by"] == "test"

        # A second version becomes the candidate; the champion stays until promoted.
        with mlflow.start_run() as run:
            info2 = log_candidate(ROOT, tiny_checkpoint, 3136, 12544)
            v2 = register_version(client, name, info2, run.info.run_id, {})
        aliases = client.get_registered_model(name).aliases
        assert aliases == {"candidate": v2, "champion": v1}

        # The champion answers like the checkpoint loaded directly.
        b64, img = _png_b64()
        question = "How many red circles are there? Answer with one word."
        champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        got = champion.predict(pd.DataFrame([{"image": b64, "question": question}]))
        img.save(tmp_path / "q.png")
        model, processor = load_model(tiny_checkpoint)
        want = generate_answers(model, processor, [Item("q", "test", "count", "<image>" + question, ["q.png"])],
                                tmp_path, Decoding(1, 32, 3136, 12544))
        assert list(got) == [want[0].text]

        # ... and over HTTP through `mlflow models serve`.
        port = free_port()
        # The scoring server is started as `uvicorn` from PATH: the venv's bin must be on it.
        env = {"MLFLOW_TRACKING_URI": srv.url, "PATH": f"{BIN}:{__import__('os').environ['PATH']}"}
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env={**__import__("os").environ, **env}, stdout=open(tmp_path / "serve.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, tmp_path / "serve.log")
            body = json.dumps({"dataframe_records": [{"image": b64, "question": question}]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.loads(r.read())
            assert answer["predictions"] == [want[0].text]
        finally:
            import os
            import signal
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def test_champion_loader_gives_the_registered_checkpoint(tmp_path, monkeypatch, tiny_checkpoint):
    """evaluate compares against the champion through this loader: it must return the registered weights."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from tasks.registry import champion_loader, log_candidate, pip_requirements, promote, register_version
    from tasks.tracking import setup
    from vlgrpo.model.loading import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    setup(tmp_path, "vlgrpo-it")
    client, name = MlflowClient(), "vlgrpo-loader-test"
    assert champion_loader(name) is None
    with mlflow.start_run() as run:
        info = log_candidate(ROOT, tiny_checkpoint, 3136, 12544)
        v = register_version(client, name, info, run.info.run_id, {})
    # The serving requirements are the installed pins (given, not inferred by loading the model again).
    req = (Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "requirements.txt").read_text().split()
    assert set(req) == set(pip_requirements()) and f"torch=={torch.__version__.split('+')[0]}" in req
    promote(client, name, v, reason="test", by="test")
    loader = champion_loader(name)
    assert loader.version == v
    model, processor = loader()
    want, _ = load_model(tiny_checkpoint)
    got, want = model.state_dict(), want.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert processor.tokenizer.get_vocab() == load_model(tiny_checkpoint)[1].tokenizer.get_vocab()
