"""A LoRA candidate in the MLflow registry: the adapter alone (small) or merged (``register.merge_lora``).

A tiny Qwen2.5-VL base gets LoRA adapters with non-zero weights (so they change the answers' logits) and is
saved as the trainer saves a LoRA run: a peft adapter directory naming its base. Both ways of logging it
must load - through pyfunc and over HTTP with ``mlflow models serve`` - as the same model: base + adapter
merged, answering exactly what the adapter directory answers when loaded directly.
"""
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.servers import BIN, free_port, wait_http

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUESTION = "How many red circles are there? Answer with one word."


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from vlgrpo.model import loading, lora
    from vlgrpo.model import tiny_model
    from vlgrpo.config import LoraConfig, TinyModelConfig

    d = tmp_path_factory.mktemp("lora")
    texts = [QUESTION, "2", "red", "circle", "yes", "no"] * 20
    model, processor = tiny_model.build_tiny(texts, TinyModelConfig(), seed=0)
    loading.save_model(model, processor, d / "base")
    pm, processor = lora.load_policy(d / "base", LoraConfig(enabled=True, rank=4, vision=True, merger=True),
                                     torch.float32)
    with torch.no_grad():             # peft starts B at 0 (adapter = no-op); give it weights that matter
        g = torch.Generator().manual_seed(0)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(d / "candidate")
    processor.save_pretrained(d / "candidate")
    return d


def _serve(name_uri: str, env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", name_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def _ask(port: int, b64: str) -> list:
    body = json.dumps({"dataframe_records": [{"image": b64, "question": QUESTION}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["predictions"]


def _artifact_bytes(uri: str) -> int:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(uri))
    return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())


def test_adapter_and_merged_register_load_and_serve_alike(tmp_path, monkeypatch, adapter_dir):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from tasks.registry import log_candidate, register_version
    from tasks.tracking import setup
    from tests.integration.test_registry_postgres import _png_b64
    from vlgrpo.model import loading
    from vlgrpo.data.manifest import Item
    from vlgrpo.model.decoding import Decoding, generate_answers
    from vlgrpo.model.loading import load_model

    cand = adapter_dir / "candidate"
    assert loading.is_adapter_dir(cand) and loading.adapter_base(cand) == str(adapter_dir / "base")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = setup(tmp_path, "vlgrpo-lora")          # artifacts beside tmp_path/mlflow.db
    client, name = MlflowClient(), "vlgrpo-lora-test"
    versions = {}
    for merged in (False, True):
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_candidate(ROOT, cand, 3136, 12544, merge_lora=merged)
            versions[merged] = register_version(client, name, info, run.info.run_id, {})
    # the adapter version holds no base weights; the merged one is a full checkpoint
    sizes = {m: _artifact_bytes(f"models:/{name}/{v}") for m, v in versions.items()}
    base_bytes = (adapter_dir / "base" / "model.safetensors").stat().st_size
    adapter_bytes = (cand / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 5
    assert sizes[False] < base_bytes / 2 < base_bytes <= sizes[True]

    # the same weights from either: base + adapter merged, not the base
    want_model, processor = load_model(cand)
    base_model, _ = load_model(adapter_dir / "base")
    want_sd, base_sd = want_model.state_dict(), base_model.state_dict()
    assert any(not torch.equal(want_sd[k], base_sd[k]) for k in want_sd)
    b64, img = _png_b64()
    img.save(tmp_path / "q.png")
    want = generate_answers(want_model, processor, [Item("q", "test", "count", "<image>" + QUESTION, ["q.png"])],
                            tmp_path, Decoding(1, 32, 3136, 12544))
    for merged, v in versions.items():
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/{v}")
        sd = loaded.unwrap_python_model().model.state_dict()
        assert sd.keys() == want_sd.keys()
        assert all(torch.allclose(sd[k], want_sd[k], atol=1e-6) for k in sd), merged
        assert list(loaded.predict(pd.DataFrame([{"image": b64, "question": QUESTION}]))) == [want[0].text]

    # ... and over HTTP: both servers start together (each takes a while), then answer the same
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    servers = {m: _serve(f"models:/{name}/{v}", env, tmp_path / f"serve-{m}.log") for m, v in versions.items()}
    try:
        for m, (proc, port) in servers.items():
            wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, tmp_path / f"serve-{m}.log")
            assert _ask(port, b64) == [want[0].text], m
    finally:
        for proc, _ in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(30)
