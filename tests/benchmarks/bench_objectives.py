"""Learning curves of the policy losses and advantage estimators on the default task.

    python -m tests.benchmarks.bench_objectives --seeds 0 1 2 [--jobs 2] [--max-steps 60] [--out curves.json]
        [--arms grpo rloo grpo_ni2 cispo_ni2 sapo_ni2] [--target 0.99]

Each arm is the default ``params.yaml`` run with a few ``train.*`` keys changed (``ARMS``), trained once per
``train.seed`` on the same warm-started base (data and base stage once, in a temp folder), with test accuracy
from the trainer's greedy evaluation every 10 steps on the 200 test items (the harness of
``bench_dynamic_sampling``: the test split is labelled ``val`` for the in-training evaluation, the training
itself is untouched). A run stops at its first evaluation >= ``--target``.

The losses are compared with two updates per rollout (``num_iterations: 2``, the ``*_ni2`` arms): with one
update the policy has not moved when the loss is taken, so the importance ratio is exactly 1 and cispo's
gradient is dapo's, sapo's grpo's (tests/unit/test_objectives_trl.py) - nothing to compare. The estimators
(grpo vs rloo) are compared at the default ``num_iterations: 1``. Runs go ``--jobs`` at a time, one thread
each. Not part of ``make bench`` (minutes per run on 2 CPU cores). The results are in docs/features.md.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from tests.benchmarks.bench_dynamic_sampling import _write, curve, first_step, prepare

ARMS: dict[str, dict] = {
    "grpo": {},                                               # the default: loss grpo, estimator grpo
    "rloo": {"advantage_estimator": "rloo"},
    "grpo_ni2": {"num_iterations": 2},
    "cispo_ni2": {"num_iterations": 2, "loss_type": "cispo", "epsilon_low": 1.0, "epsilon_high": 4.0},
    "sapo_ni2": {"num_iterations": 2, "loss_type": "sapo"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one process, one thread each)")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    ap.add_argument("--out", type=Path, default=None, help="JSON of the curves, rewritten after each run")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vlgrpo-obj-") as tmp:
        root = Path(tmp)
        prepare(root)
        import torch
        base = hashlib.sha256((root / "models/base/model.safetensors").read_bytes()).hexdigest()[:16]
        print(f"base model sha256 {base} (warm start on {torch.get_num_threads()} threads)", flush=True)
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futs = {pool.submit(curve, root, s, False, args.max_steps, args.target, ARMS[a], f"{a}_s{s}"): f"{a}_s{s}"
                    for s in args.seeds for a in args.arms}
            for fut in as_completed(futs):
                results[futs[fut]] = fut.result()
                print(futs[fut], "done", flush=True)
                _write(args.out, {"base": base, "max_steps": args.max_steps, "curves": results})
    print(f"\narm        seed  steps to 0.9 / 0.95 / {args.target}   last test accuracy (step)")
    for a in args.arms:
        for s in args.seeds:
            c = results[f"{a}_s{s}"]
            firsts = [first_step(c, lv) for lv in (0.9, 0.95, args.target)]
            print(f"{a:10s} {s:4d}  {' / '.join('-' if f is None else str(f) for f in firsts):22s}"
                  f"  {c[-1]['test_accuracy']:.3f} ({c[-1]['step']})")
            print("      ", " ".join(f"{p['test_accuracy']:.3f}" for p in c))
        best = [max(p["test_accuracy"] for p in results[f"{a}_s{s}"]) for s in args.seeds]
        print(f"{a:10s} mean best test accuracy {statistics.mean(best):.3f} (per seed {best})")


if __name__ == "__main__":
    main()
