"""The vLLM rollout server: one vLLM engine behind a small HTTP API, for ``train.rollout.engine: vllm``.

Run by the engine environment's interpreter (``make vllm-env`` builds ``.venv-vllm``), never imported by the
trainer: it imports only vLLM, torch, safetensors, Pillow and the standard library. The trainer starts it
itself (``vlgrpo.train.engine``); to run one by hand, e.g. on the GPUs of another machine::

    .venv-vllm/bin/python vlgrpo/train/vllm_server.py --model models/base --host 0.0.0.0 --port 8765

and set ``train.rollout.vllm.url: http://HOST:8765``.

API (JSON unless said otherwise):
    GET  /health    -> {"ok": true, "model": ..., "version": ...}
    POST /generate  {"prompts": [{"text": str, "images": [base64 PNG, ...]}], "n", "temperature", "top_p",
                     "max_tokens", "stop_token_ids", "banned_ids", "seed", "min_pixels", "max_pixels"}
                    -> {"outputs": [{"prompt_token_ids": [...], "samples": [{"token_ids", "logprobs",
                        "finish_reason"}, ...]}, ...]}  (per-token log-probs of the sampled tokens, after
                        temperature: what the sampler drew from)
    POST /weights   body: safetensors bytes of (a part of) the checkpoint -> {"ok": true, "tensors": n}
                    The weights are reloaded in place, then the prefix and encoder caches are reset.
    POST /shutdown  -> the server exits
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

# One process, no engine subprocess: weights can be reloaded through the worker directly, and stopping this
# process (or its process group) stops everything. Set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (a saved Qwen-VL checkpoint)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--parent-pid", type=int, default=0,
                    help="exit when this process is gone (the trainer that started the server)")
    return ap.parse_args(argv)


def _watch_parent(pid: int) -> None:
    # A trainer killed with SIGKILL runs no clean-up: the server notices its parent is gone and exits, so no
    # engine is left holding memory (or a GPU) behind a dead run.
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass


class Engine:
    """The vLLM engine and the three things the trainer asks of it."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from vllm import LLM

        self.torch = torch
        cpu = not torch.cuda.is_available()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(args.kv_cache_gib))))
        kw = dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                  enforce_eager=cpu, logprobs_mode="processed_logprobs", generation_config="vllm",
                  limit_mm_per_prompt={"image": 8, "video": 0})
        if not cpu:
            kw.update(gpu_memory_utilization=args.gpu_memory_utilization,
                      tensor_parallel_size=args.tensor_parallel_size)
        self.llm = LLM(**kw)
        self.model = args.model
        self.lock = threading.Lock()

    def generate(self, req: dict) -> dict:
        from PIL import Image
        from vllm import SamplingParams

        prompts = []
        for p in req["prompts"]:
            images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in p.get("images", [])]
            entry: dict = {"prompt": p["text"]}
            if images:
                entry["multi_modal_data"] = {"image": images}
                if req.get("min_pixels") is not None:
                    entry["mm_processor_kwargs"] = {"min_pixels": req["min_pixels"],
                                                    "max_pixels": req["max_pixels"]}
            prompts.append(entry)
        banned = {int(t): -100.0 for t in req.get("banned_ids", [])}
        sp = SamplingParams(n=int(req["n"]), temperature=float(req["temperature"]), top_p=float(req["top_p"]),
                            max_tokens=int(req["max_tokens"]), stop_token_ids=list(req.get("stop_token_ids", [])),
                            logprobs=0, logit_bias=banned or None, skip_special_tokens=False)
        with self.lock:
            if req.get("seed") is not None:
                # a per-request seed is not supported by the CPU sampler; seeding the process's generator
                # before each request makes a step's samples repeat for the same weights and prompts
                self.torch.manual_seed(int(req["seed"]))
            outs = self.llm.generate(prompts, sp, use_tqdm=False)
        result = []
        for o in outs:
            samples = []
            for c in o.outputs:
                lps = [float(next(iter(d.values())).logprob) if d else float("nan") for d in (c.logprobs or [])]
                samples.append({"token_ids": list(c.token_ids), "logprobs": lps,
                                "finish_reason": c.finish_reason})
            result.append({"prompt_token_ids": list(o.prompt_token_ids), "samples": samples})
        return {"outputs": result}

    def load_weights(self, body: bytes) -> dict:
        from safetensors.torch import load

        tensors = load(body)
        with self.lock:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors.items()),
                                                              "is_checkpoint_format": True})
            # cached prompt KV and vision-encoder outputs were computed with the old weights
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
        return {"ok": True, "tensors": len(tensors)}


def _handler(engine: Engine, stop: threading.Event):
    import vllm

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):      # one line per request on stderr is noise in the run's log
            return

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"ok": True, "model": engine.model, "version": vllm.__version__})
            else:
                self._send(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if self.path == "/generate":
                    self._send(200, engine.generate(json.loads(body)))
                elif self.path == "/weights":
                    self._send(200, engine.load_weights(body))
                elif self.path == "/shutdown":
                    self._send(200, {"ok": True})
                    stop.set()
                else:
                    self._send(404, {"error": f"no such endpoint {self.path}"})
            except Exception as e:       # the trainer shows this message; the traceback goes to the log
                import traceback

                traceback.print_exc()
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    t0 = time.perf_counter()
    engine = Engine(args)
    stop = threading.Event()
    server = HTTPServer((args.host, args.port), _handler(engine, stop))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"vllm_server: serving {args.model} on http://{args.host}:{args.port} "
          f"(loaded in {time.perf_counter() - t0:.1f}s)", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
