"""The vLLM rollout engine (``train.rollout.engine: vllm``): a client of ``vlgrpo/train/vllm_server.py``.

vLLM lives in its own environment (``make vllm-env``), so the trainer never imports it: ``VllmEngine`` starts
the server with ``train.rollout.vllm.python`` (or talks to one at ``train.rollout.vllm.url``), pushes the
policy's weights to it, and asks it for G completions per prompt with the log-prob of every sampled token.
The server it started is stopped when the run ends, when the trainer exits (atexit) and when a start fails;
the server itself exits when the trainer's process is gone (even after a SIGKILL).

The engine gets each prompt as the trainer renders it: the chat-templated text (one ``<|image_pad|>`` per
image; the engine expands it, as the processor does) and the images already fitted to the pixel budget.
"""
from __future__ import annotations

import atexit
import base64
import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from vlgrpo.config import VllmConfig
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.sampling import SamplingSpec
from vlgrpo.train.state import Completions, Rollout, Run, StepClock

SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")
LOG_TAIL_LINES = 5


class EngineError(TrainingError):
    """The rollout engine could not start, died, or did not answer in time (the message names the engine,
    its URL and the last lines of its log)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")    # lossless: the engine sees the trainer's pixels
    return base64.b64encode(buf.getvalue()).decode()


class VllmEngine:
    """A vLLM server this run started (``start``) or one already running (``connect``)."""

    def __init__(self, url: str, cfg: VllmConfig, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None, python: str | None = None):
        self.url, self.cfg, self.proc, self.log_path, self.python = url.rstrip("/"), cfg, proc, log_path, python
        self.pushes, self.last_sync_step, self.sync_s = 0, None, 0.0
        if proc is not None:
            atexit.register(self.close)

    # -- life cycle ---------------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: VllmConfig, model_dir: Path | str, root: Path, seed: int) -> "VllmEngine":
        """Start the server from ``cfg.python`` on a free local port and wait until it answers (at most
        ``cfg.startup_timeout_s``); EngineError (with its log's last lines) when it cannot."""
        python = Path(cfg.python) if Path(cfg.python).is_absolute() else Path(root) / cfg.python
        if not python.exists():
            raise EngineError(f"train.rollout.engine vllm: the engine environment's python {python} does not "
                              f"exist (train.rollout.vllm.python); build it with `make vllm-env`")
        port = _free_port()
        log_path = Path(tempfile.mkdtemp(prefix="vlgrpo-vllm-")) / "server.log"
        cmd = [str(python), str(SERVER_SCRIPT), "--model", str(model_dir), "--port", str(port),
               "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len), "--seed", str(seed),
               "--kv-cache-gib", str(cfg.kv_cache_gib), "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
               "--tensor-parallel-size", str(cfg.tensor_parallel_size), "--parent-pid", str(os.getpid())]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(log_path, "wb") as log:
            # its own process group: stopping the group stops anything the engine started
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                                    start_new_session=True)
        engine = cls(f"http://127.0.0.1:{port}", cfg, proc, log_path, str(python))
        try:
            engine._wait_ready()
        except BaseException:
            engine.close()
            raise
        return engine

    @classmethod
    def connect(cls, cfg: VllmConfig) -> "VllmEngine":
        """A server already running at ``cfg.url`` (never stopped by this run)."""
        engine = cls(cfg.url, cfg)
        engine._wait_ready()
        return engine

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._error(f"exited with code {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if json.load(r).get("ok"):
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise self._error(f"did not answer within train.rollout.vllm.startup_timeout_s "
                                  f"({self.cfg.startup_timeout_s:g}s)")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the server this run started (its whole process group); nothing for a ``connect``-ed one."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.close)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- errors -------------------------------------------------------------------------------------------
    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, errors="replace") as f:
            lines = deque((ln.strip() for ln in f if ln.strip()), maxlen=4 * LOG_TAIL_LINES)
        seen, tail = set(), []
        for ln in reversed(lines):          # the newest distinct lines (vLLM repeats some warnings per request)
            if ln not in seen and len(tail) < LOG_TAIL_LINES:
                seen.add(ln)
                tail.append(ln)
        return " | ".join(reversed(tail))

    def _error(self, what: str) -> EngineError:
        where = f"{self.url}" + (f", started with {self.python}" if self.python else "")
        tail = self.log_tail()
        log = f"; log {self.log_path}: {tail}" if tail else (f"; log {self.log_path}" if self.log_path else "")
        return EngineError(f"vllm rollout engine ({where}) {what}{log}")

    def _post(self, path: str, body: bytes, content_type: str) -> dict:
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.request_timeout_s) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise self._error(f"failed on {path}: HTTP {e.code} {detail}") from None
        except (OSError, ValueError) as e:
            if self.proc is not None:
                try:                    # a dropped connection is usually the server dying: give it a moment
                    self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc is not None and self.proc.poll() is not None:
                raise self._error(f"died (exit code {self.proc.returncode}) during {path}") from None
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise self._error(f"did not answer {path} within train.rollout.vllm.request_timeout_s "
                                  f"({self.cfg.request_timeout_s:g}s)") from None
            raise self._error(f"cannot be reached on {path}: {e}") from None

    # -- the three requests ------------------------------------------------------------------------------
    def push_weights(self, model: nn.Module) -> float:
        """Send the policy's weights (LoRA: merged) to the engine → seconds the push took."""
        from safetensors.torch import save

        t0 = time.perf_counter()
        body = save({k: v.detach().to("cpu").contiguous() for k, v in engine_weights(model)})
        self._post("/weights", body, "application/octet-stream")
        self.pushes += 1
        return time.perf_counter() - t0

    def generate(self, texts: Sequence[str], images: Sequence[Sequence[Any]], spec: SamplingSpec, seed: int,
                 pixels: tuple[int, int]) -> list[dict]:
        """G samples of every prompt (``texts[p]`` with its ``images[p]``) → the server's per-prompt outputs:
        ``prompt_token_ids`` (the expanded prompt the engine ran) and ``samples`` (token ids, per-token
        log-probs after temperature, finish reason)."""
        req = {"prompts": [{"text": t, "images": [_png_b64(im) for im in ims]} for t, ims in zip(texts, images)],
               "n": spec.num_generations, "temperature": spec.temperature, "top_p": spec.top_p,
               "max_tokens": spec.max_new_tokens, "stop_token_ids": sorted(set(spec.stop_ids)),
               "banned_ids": list(spec.banned_ids), "seed": seed, "min_pixels": pixels[0], "max_pixels": pixels[1]}
        return self._post("/generate", json.dumps(req).encode(), "application/json")["outputs"]


def engine_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the names the engine loads: the model's own state-dict names (vLLM maps
    them as it maps a checkpoint's). A peft LoRA policy gives its merged weights (base + B·A·scale), the
    adapters themselves untouched. A tied head is sent too, as its own copy: the CPU engine repacks the head
    into a kernel format of its own, which a reload of the embedding alone leaves stale."""
    if getattr(model, "base_model", None) is not None and hasattr(model, "peft_config"):
        yield from _merged_lora_weights(model)
        return
    for name, t in model.state_dict().items():
        yield checkpoint_name(name), (t.clone() if name == "lm_head.weight" else t)


# transformers >= 4.52 nests Qwen-VL's modules (model.language_model.*, model.visual.*); checkpoints and vLLM's
# loader use the flat names (model.*, visual.*). A pushed weight vLLM cannot place would be skipped silently.
_NAME_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def checkpoint_name(name: str) -> str:
    """A state-dict name as a saved Qwen-VL checkpoint names it (the name the engine's loader maps)."""
    for new, old in _NAME_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def _merged_lora_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    inner = model.base_model.model
    deltas = {}
    for mname, mod in inner.named_modules():
        if isinstance(mod, LoraLayer):
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    d = mod.get_delta_weight(adapter)
                    deltas[mname] = deltas.get(mname, 0) + d
    for name, t in inner.state_dict().items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        if clean == "lm_head.weight":
            t = t.clone()
        mod_name = clean.rsplit(".", 1)[0]
        if clean.endswith(".weight") and mod_name in deltas:
            t = (t.float() + deltas[mod_name].float()).to(t.dtype)
        yield checkpoint_name(clean), t


def to_completions(outputs: list[dict], spec: SamplingSpec) -> tuple[Completions, torch.Tensor]:
    """The server's outputs → (Completions in prompt order, the engine's per-token log-probs (N, C), 0 on
    padding). A completion is terminated when it stopped on a stop token (its last token)."""
    samples = [s for o in outputs for s in o["samples"]]
    C = max(1, max(len(s["token_ids"]) for s in samples))
    N = len(samples)
    ids = torch.full((N, C), spec.pad_id, dtype=torch.long)
    mask = torch.zeros((N, C), dtype=torch.long)
    logp = torch.zeros((N, C), dtype=torch.float32)
    stops = set(spec.stop_ids)
    terminated = torch.zeros(N, dtype=torch.bool)
    for i, s in enumerate(samples):
        toks = s["token_ids"]
        n = len(toks)
        ids[i, :n] = torch.tensor(toks, dtype=torch.long)
        mask[i, :n] = 1
        logp[i, :n] = torch.tensor(s["logprobs"][:n], dtype=torch.float32)
        terminated[i] = bool(n) and toks[-1] in stops
    return Completions(ids, mask, terminated), logp


def start_engine(cfg: VllmConfig, model_dir: Path | str, root: Path, seed: int) -> VllmEngine:
    """The run's engine: ``connect`` to ``cfg.url`` when given, else ``start`` one."""
    return VllmEngine.connect(cfg) if cfg.url else VllmEngine.start(cfg, model_dir, root, seed)



def sync_weights(run: Run, step: int, clock: StepClock) -> None:
    """Push the policy to the engine before ``step``'s rollout when ``train.rollout.vllm.sync_steps`` steps
    passed since the last push (always before the run's first rollout: a resumed policy, or a server that
    ran another run, must not sample)."""
    eng = run.engine
    if eng.last_sync_step is not None and step - eng.last_sync_step < run.tc.rollout.vllm.sync_steps:
        return
    eng.sync_s = eng.push_weights(run.policy)
    eng.last_sync_step = step
    clock.lap("sync")


def vllm_rollout(run: Run, step: int, clock: StepClock) -> Rollout:
    """One step's rollout with the prompts sampled by the vLLM engine (``train.rollout.engine: vllm``): the
    weights synced first, the step's prompts rendered once (the trainer encodes the same text and images),
    G completions each with the engine's log-probs, then rewards, advantages and the trainer's log-probs as
    in the plain rollout (``vlgrpo.train.rollout``), with the sampler mismatch corrected."""
    from vlgrpo.model import prompt_encoding
    from vlgrpo.train import data_order as P
    from vlgrpo.train.batches import PromptBatch
    from vlgrpo.train.rollout import finish_rollout, score_rewards, step_slots

    sync_weights(run, step, clock)
    slots, items = step_slots(run, step)
    if any(it.videos for it in items):
        raise TrainingError(f"step {step + 1}: train.rollout.engine vllm does not take video prompts yet; "
                            f"use engine: hf for data with videos")
    mdir, dc = run.paths.manifest.parent, run.cfg.data
    rendered = prompt_encoding.render_prompts(run.processor, items, mdir, dc.min_pixels, dc.max_pixels,
                                              images=P.step_images(items, mdir, run.tc, step, slots))
    enc = prompt_encoding.encode_rendered(run.processor, rendered, dc.min_pixels, dc.max_pixels)
    prompts = PromptBatch.from_encoded(enc, [len(it.images) for it in items], [0] * len(items)).to(run.device)
    clock.lap("encode")
    seed = int(P.step_generator(run.tc.seed, step, slots[0], 0).initial_seed() % (2 ** 31))
    outputs = run.engine.generate([r[0] for r in rendered], [r[1] for r in rendered], run.sampling, seed,
                                  (dc.min_pixels, dc.max_pixels))
    completions, sampler_logp = to_completions(outputs, run.sampling)
    clock.lap("generate")
    local_r = score_rewards(run, step, items, completions).to(run.device)
    extra = {"time/sync_push_s": run.engine.sync_s}
    return finish_rollout(run, prompts, completions.to(run.device), local_r, clock, extra, sampler_logp)
