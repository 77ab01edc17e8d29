"""Two training runs side by side on one CPU: how much each slows down against running alone.

    .venv/bin/python -m tests.benchmarks.bench_side_by_side [--steps 5] [--precision auto|no|bf16]
        [--policies PASSIVE,ACTIVE] [--json out.json]

Not a pytest test (timings are not asserted). Set-up: one tiny project (the default synthetic data with 64 train
items, the default tiny Qwen2.5-VL, not warm-started) and the shipped ``train`` settings (the pilot's: 8 prompts
x 8 completions a step, micro-batches of 32); each run is its own process (``--worker``), as two `vlgrpo`
commands would be. For each OpenMP wait policy in ``--policies`` (``OMP_WAIT_POLICY`` of the workers; PASSIVE
is what vlgrpo sets unless the environment says otherwise): one run alone, then two at once. A run's figure
is its median step time (``step_time_s`` of the metrics stream) over the steps after the first.

Prints one line per policy and, last, ``side_by_side_ratio=<slowest of the pair / alone>`` for the first policy
(the issue's target: at most ~2.5 on a 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _config(steps: int, precision: str):
    from vlgrpo.config import config_from_dict

    return config_from_dict({"data": {"num_train": 64, "num_val": 8, "num_test": 8},
                             "train": {"max_steps": steps, "mixed_precision": precision, "save_steps": 1000,
                                       "save_total_limit": 1, "warmup_ratio": 0.0}})


def build_project(root: Path) -> None:
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.model import loading, tiny_model

    cfg = _config(1, "no")
    build_dataset(cfg, root)
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base")


def worker(root: Path, tag: str, steps: int, precision: str) -> None:
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths

    out = root / "models" / tag
    metrics = root / "reports" / f"{tag}.metrics.jsonl"
    paths = RunPaths.under(root, root / "data/manifest.jsonl", root / "models/base", out, metrics)
    summary = train_grpo(_config(steps, precision), paths, progress=False)
    rows = [json.loads(line) for line in paths.metrics_path.read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in rows[1:]] or [r["step_time_s"] for r in rows]
    print(json.dumps({"tag": tag, "median_step_s": statistics.median(times), "steps_s": times,
                      "mixed_precision": summary["mixed_precision"]}))


def _spawn(root: Path, tag: str, args: argparse.Namespace, policy: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tests.benchmarks.bench_side_by_side", "--worker", str(root),
                             "--tag", tag, "--steps", str(args.steps), "--precision", args.precision],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"worker failed (exit {p.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--policies", default="PASSIVE,ACTIVE", help="OMP_WAIT_POLICY values to compare")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="solo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.tag, args.steps, args.precision)
    print(f"cpu: {_cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlgrpo-bench-") as tmp:
        root = Path(tmp)
        build_project(root)
        for policy in args.policies.split(","):
            t0 = time.perf_counter()
            solo = _result(_spawn(root, f"solo-{policy}", args, policy))
            pair = [_spawn(root, f"pair{i}-{policy}", args, policy) for i in (1, 2)]
            side = [_result(p) for p in pair]
            ratio = max(s["median_step_s"] for s in side) / solo["median_step_s"]
            print(f"  steps (s): alone {solo['steps_s']}, side by side {[s['steps_s'] for s in side]}")
            pair_s = [s["median_step_s"] for s in side]
            results[policy] = {"solo_step_s": solo["median_step_s"], "pair_step_s": pair_s, "ratio": ratio,
                               "mixed_precision": solo["mixed_precision"]}
            shown = ", ".join(f"{t:.2f}" for t in pair_s)
            print(f"OMP_WAIT_POLICY={policy:7s} precision {solo['mixed_precision']}: alone "
                  f"{solo['median_step_s']:.2f} s/step, side by side {shown} s/step, ratio {ratio:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    first = results[args.policies.split(",")[0]]
    print(f"side_by_side_ratio={first['ratio']:.2f}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
