"""Rollout speed: the trainer's own generation (``train.rollout.engine: hf``) against a vLLM engine (``vllm``).

    .venv/bin/python -m tests.benchmarks.bench_rollout [--steps 3] [--warmup 1] [--rounds 2] [--wide]
        [--threads 2] [--json out.json]

Not a pytest test (timings are not asserted); ``make bench`` runs it. It needs the engine environment
(``make vllm-env``). The last line printed is ``ratio_vllm_vs_hf=<vllm rollout tokens/s ÷ hf rollout tokens/s>``.

Setup: one synthetic project (``build_dataset``) and one random Qwen2.5-VL built from the real config class
(``tiny_model.build_tiny``): the tiny default (``base.tiny``), or with ``--wide`` the widths of Qwen2.5-VL-0.5B's
language model (hidden 896, 14 heads / 2 KV heads, MLP 4864) with 4 layers and a 2-block vision tower of width
1280 (the vocabulary stays the tokenizer trained on the data, 512). The same settings for both engines: 4
prompts a step x G=8 completions of at most 16 tokens (24 with ``--wide``), temperature 0.7, fp32 (the engine
too), lr 1e-3, one torch thread count. One vLLM server is started once (its start-up is printed, not counted)
and every vllm run connects to it by URL, so each run pays what a step pays: the weight push, the request,
the engine's sampling.

Fairness on a shared machine: ``--rounds`` rounds, each a short run per engine (``--warmup`` + ``--steps``
steps), the order alternating from round to round, so load from other processes hits both alike. Per step
the trainer's own clock gives ``time/generate_s`` (hf: the policy's decoding; vllm: request + engine
sampling), ``time/sync_s`` (vllm: the weight push) and ``step_time_s``. Rollout tokens/s = completion tokens
÷ (generate + sync) seconds, summed over the measured steps of all rounds; step time = the median step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-vllm/bin/python"
PROMPTS_PER_STEP, NUM_GENERATIONS = 4, 8
WIDE = {"hidden_size": 896, "num_hidden_layers": 4, "num_attention_heads": 14, "num_key_value_heads": 2,
        "intermediate_size": 4864, "vision_depth": 2, "vision_hidden_size": 1280, "vision_num_heads": 16}
PLUGIN = '''
from vlgrpo.rewards import register

@register("text_length")
def text_length(prompts, completions, **columns):
    return [min(len(c), 20) / 20.0 for c in completions]
'''


def config(root: Path, wide: bool, steps: int, rollout: dict):
    from tests.settings import tuned_config

    return tuned_config({
        "data": {"num_train": 32, "num_val": 0, "num_test": 0, "seed": 0},
        "base": {"tiny": WIDE if wide else {}},
        "rewards": {"weights": {"text_length": 1.0}, "plugins": [str(root / "plugin.py")]},
        "train": {"max_steps": steps, "prompts_per_step": PROMPTS_PER_STEP, "num_generations": NUM_GENERATIONS,
                  "micro_batch_size": PROMPTS_PER_STEP * NUM_GENERATIONS, "max_completion_length": 24 if wide else 16,
                  "temperature": 0.7, "mixed_precision": "no", "learning_rate": 1e-3, "warmup_ratio": 0.0,
                  "save_steps": 1000, "rollout": rollout}})


def build_project(root: Path, wide: bool) -> Path:
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.model import loading, tiny_model

    (root / "plugin.py").write_text(PLUGIN)
    cfg = config(root, wide, 1, {})
    build_dataset(cfg, root)
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base")
    return root


def one_run(root: Path, engine: str, url: str, wide: bool, steps: int, n: int) -> list[dict]:
    """A fresh short run on ``engine`` → its metrics rows."""
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths

    rollout = {"engine": engine}
    if engine == "vllm":
        rollout["vllm"] = {"python": str(PYTHON), "url": url, "dtype": "float32", "max_model_len": 1024}
    name = f"{engine}-{n}"
    paths = RunPaths.under(root, "data/manifest.jsonl", "models/base", f"out/{name}", f"reports/{name}.jsonl")
    train_grpo(config(root, wide, steps, rollout), paths, progress=False)
    return [json.loads(ln) for ln in (root / f"reports/{name}.jsonl").read_text().splitlines()]


def summarise(rows: list[dict]) -> dict:
    toks = sum(r["completions/mean_length"] * PROMPTS_PER_STEP * NUM_GENERATIONS for r in rows)
    gen = sum(r.get("time/generate_s", 0.0) for r in rows)
    sync = sum(r.get("time/sync_s", 0.0) for r in rows)
    return {"steps": len(rows), "completion_tokens": toks, "generate_s": gen, "sync_s": sync,
            "rollout_tokens_per_s": toks / (gen + sync), "sync_s_per_step": sync / len(rows),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "mismatch": [r["mismatch/logp_diff_mean"] for r in rows if "mismatch/logp_diff_mean" in r]}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps per run not measured")
    ap.add_argument("--rounds", type=int, default=2, help="runs per engine, alternating")
    ap.add_argument("--wide", action="store_true", help="0.5B widths (4 layers) instead of the tiny default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    if not PYTHON.exists():
        raise SystemExit(f"bench_rollout: the engine environment {PYTHON} is missing; build it with `make vllm-env`")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from vlgrpo.config import VllmConfig
    from vlgrpo.train.engine import VllmEngine

    root = build_project(Path(tempfile.mkdtemp(prefix="bench-rollout-")), args.wide)
    t0 = time.perf_counter()
    server = VllmEngine.start(VllmConfig(python=str(PYTHON), dtype="float32", max_model_len=1024),
                              root / "models/base", root, 0)
    startup = time.perf_counter() - t0
    per = {"hf": [], "vllm": []}
    try:
        for r in range(args.rounds):
            for engine in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
                rows = one_run(root, engine, server.url, args.wide, args.warmup + args.steps, r)
                per[engine].extend(rows[args.warmup:])
    finally:
        server.close()
    res = {e: summarise(rows) for e, rows in per.items()}
    ratio = res["vllm"]["rollout_tokens_per_s"] / res["hf"]["rollout_tokens_per_s"]
    step_ratio = res["hf"]["step_time_s"] / res["vllm"]["step_time_s"]
    model = "wide (0.5B widths, 4 layers)" if args.wide else "tiny default"
    print(f"machine: {cpu_model()}, torch threads {args.threads}, model {model}")
    print(f"engine start-up (not counted): {startup:.1f}s; {args.rounds} rounds x ({args.warmup} warm-up + "
          f"{args.steps} measured steps) per engine, alternating")
    print("| engine | rollout tokens/s | generate s/step | sync s/step | step time s (median) |")
    print("|---|---|---|---|---|")
    for e, s in res.items():
        print(f"| {e} | {s['rollout_tokens_per_s']:.0f} | {s['generate_s'] / s['steps']:.3f} | "
              f"{s['sync_s_per_step']:.3f} | {s['step_time_s']:.3f} |")
    m = res["vllm"]["mismatch"]
    if m:
        print(f"vllm mean |log ratio| per measured step: {', '.join(f'{x:.4f}' for x in m)}")
    print(f"step_time_ratio_hf_vs_vllm={step_ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": res, "ratio_vllm_vs_hf": ratio, "startup_s": startup,
                                               "wide": args.wide, "cpu": cpu_model()}, indent=1))
    print(f"ratio_vllm_vs_hf={ratio:.2f}")


if __name__ == "__main__":
    main()
