"""Hostile requests to a real `mlflow models serve` of a registered tiny model.

A tiny Qwen2.5-VL checkpoint is registered on a real `mlflow server` exactly as the register stage does it
(pyfunc model, signature, the ``register.serving`` caps of params.yaml as its model_config), promoted to
``champion`` and served with `mlflow models serve -m models:/<name>@champion`. Each hostile request - a
server-side file path, a decompression bomb as base64, ``max_new_tokens: 10**9``, 10,000 records, a
non-image, ... - must get a 400 answer within the client's timeout, with one message that names the reason
and no traceback; after each one the server still answers a good request with the same answer as before.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.servers import BIN, free_port, mlflow_server, wait_http
from tests.unit.test_pyfunc_decode import bomb_png

# slow: registering and serving take 1-2 minutes on 2 shared cores before the first request.
pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What colour is the shape? Answer with one word."
TIMEOUT_S = 120          # the client's bound on every answer; the refusals take far less (printed)


def _png_b64(side: int = 112, color=(220, 40, 40)) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (128, 128, 128))
    ImageDraw.Draw(img).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url: str, body: dict) -> tuple[int, str, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, r.read().decode(), time.monotonic() - t
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.monotonic() - t


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(invocations URL, the answer to the good request, the checkpoint) of a served registered tiny model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.registry import log_candidate, promote, register_version
    from tasks.tracking import setup
    from vlgrpo.config import load_config
    from vlgrpo.model.loading import save_model
    from vlgrpo.model.tiny_model import build_tiny

    tmp = tmp_path_factory.mktemp("serve")
    cfg = load_config(ROOT / "params.yaml")         # the shipped caps, as the register stage logs them
    texts = [QUESTION, "red", "green", "blue", "yellow"] * 20
    model, processor = build_tiny(texts, cfg.base.tiny, seed=0)
    ckpt = save_model(model, processor, tmp / "candidate")
    name = f"vlgrpo-serve-{uuid.uuid4().hex[:6]}"
    with mlflow_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}") as srv:
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = srv.url
        try:
            setup(tmp, "vlgrpo-serve")
            client = MlflowClient()
            with mlflow.start_run() as run:
                info = log_candidate(ROOT, ckpt, cfg.data.min_pixels, cfg.data.max_pixels,
                                     serving=cfg.register.serving)
                version = register_version(client, name, info, run.info.run_id, {})
            promote(client, name, version, reason="test", by="test")
        finally:
            if old is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old
        port, log = free_port(), tmp / "serve.log"
        # The scoring server is started as `uvicorn` from PATH: the venv's bin must be on it.
        env = {**os.environ, "MLFLOW_TRACKING_URI": srv.url, "PATH": f"{BIN}:{os.environ['PATH']}"}
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 300, proc, log)
            url = f"http://127.0.0.1:{port}/invocations"
            status, text, took = _post(url, {"dataframe_records": [{"image": _png_b64(), "question": QUESTION}]})
            assert status == 200, text
            answer = json.loads(text)["predictions"]
            assert len(answer) == 1 and isinstance(answer[0], str)
            print(f"good request: 200 in {took:.2f} s: {answer}")
            yield url, answer, ckpt
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def _assert_refused(served, body: dict, reason: str) -> dict:
    """The request gets a 400 with one message holding ``reason`` and no traceback; the server still answers."""
    url, answer, _ = served
    status, text, took = _post(url, body)
    print(f"{status} in {took:.2f} s: {text[-300:]}")
    assert status == 400, text
    err = json.loads(text)
    assert err["error_code"] == "INVALID_PARAMETER_VALUE" and reason in err["message"], err
    assert "stack_trace" not in err and "Traceback" not in text and 'File "' not in text
    # Still alive, and still the same model: the good request gets the same answer.
    status, again, _ = _post(url, {"dataframe_records": [{"image": _png_b64(), "question": QUESTION}]})
    assert status == 200 and json.loads(again)["predictions"] == answer, again
    return err


def test_a_server_side_path_is_refused_without_touching_the_file(served, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(base64.b64decode(_png_b64(color=(0, 200, 0))))
    answers = []
    for path in (str(secret), str(tmp_path / "missing.png"), "/etc/passwd"):
        err = _assert_refused(served, {"dataframe_records": [{"image": path, "question": QUESTION}]},
                              "record 0: image is not base64-encoded image bytes (this server reads no file paths")
        answers.append(err["message"].split("Error: ")[-1])
    # An existing and a missing file get the same answer: the reply tells nothing about the server's disk.
    assert answers[0] == answers[1]


@pytest.mark.parametrize("side, reason", [
    (8192, "record 1: image is 8192x8192 = 67108864 pixels; this model takes at most 16777216"),
    (20000, "record 1: image claims more than"),
])
def test_a_decompression_bomb_as_base64_is_refused(served, side, reason):
    bomb = base64.b64encode(bomb_png(side)).decode()
    _assert_refused(served, {"dataframe_records": [{"image": _png_b64(), "question": QUESTION},
                                                   {"image": bomb, "question": QUESTION}]}, reason)


def test_max_new_tokens_of_a_billion_is_refused(served):
    _assert_refused(served, {"dataframe_records": [{"image": _png_b64(), "question": QUESTION}],
                             "params": {"max_new_tokens": 10**9}},
                    "params.max_new_tokens is 1000000000; this model allows 1 to 256")


def test_a_huge_batch_size_is_refused(served):
    _assert_refused(served, {"dataframe_records": [{"image": _png_b64(), "question": QUESTION}],
                             "params": {"batch_size": 10**6}},
                    "params.batch_size is 1000000; this model allows 1 to 32")


def test_ten_thousand_records_are_refused(served):
    image = _png_b64(side=56)
    _assert_refused(served, {"dataframe_records": [{"image": image, "question": QUESTION}] * 10_000},
                    "the request has 10000 records; this model answers at most 64 per request")


@pytest.mark.parametrize("payload, reason", [
    (b"MZ\x90\x00 this is no image at all" * 10, "record 0: not an image of an accepted format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "record 0: not an image of an accepted"),
])
def test_a_non_image_is_refused(served, payload, reason):
    _assert_refused(served, {"dataframe_records": [{"image": base64.b64encode(payload).decode(),
                                                    "question": QUESTION}]}, reason)


def test_a_huge_question_is_refused(served):
    _assert_refused(served, {"dataframe_records": [{"image": _png_b64(), "question": "why? " * 20_000}]},
                    "record 0: question has 100000 characters; this model takes at most 4096")


def test_a_request_at_every_cap_is_answered_like_the_checkpoint(served, tmp_path):
    """64 records, batch_size 32, max_new_tokens 256 (the shipped caps) are answered, exactly as the checkpoint
    answers them in-process. (That the params reach the model at all - MLflow drops params a model logged no
    schema for - the refusals above show: a dropped max_new_tokens could not be refused.)"""
    from PIL import Image

    from vlgrpo.data.manifest import Item
    from vlgrpo.model.decoding import Decoding, generate_answers
    from vlgrpo.model.loading import load_model

    url, answer, ckpt = served
    Image.open(io.BytesIO(base64.b64decode(_png_b64()))).save(tmp_path / "q.png")
    model, processor = load_model(ckpt)
    item = Item("0", "test", "vqa", "<image>" + QUESTION, ["q.png"])
    assert answer == [generate_answers(model, processor, [item], tmp_path, Decoding(8, 32, 3136, 12544))[0].text]
    status, text, took = _post(url, {"dataframe_records": [{"image": _png_b64(), "question": QUESTION}] * 64,
                                     "params": {"batch_size": 32, "max_new_tokens": 256}})
    print(f"64 records at the caps: {status} in {took:.2f} s")
    assert status == 200, text
    want = generate_answers(model, processor, [item] * 64, tmp_path, Decoding(32, 256, 3136, 12544))
    assert json.loads(text)["predictions"] == [o.text for o in want]
