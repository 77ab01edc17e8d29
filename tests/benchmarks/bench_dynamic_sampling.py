"""Learning curves with and without dynamic sampling (``train.dynamic_sampling``) on the default task.

    python -m tests.benchmarks.bench_dynamic_sampling --seeds 0 1 2 3 4 [--jobs 2] [--out curves.json]
        [--target 0.99] [--full] [--max-steps N] [--train KEY=VALUE ...]

For each ``train.seed``, trains the default ``params.yaml`` run twice (dynamic sampling off / on) in one
project under a temp folder (data and base stage first, shared by all runs). Test accuracy comes from the
trainer's own in-training evaluation (``train.eval_steps: 10``, greedy): the runs read a copy of the
manifest in which the test split is labelled ``val`` (and the real val split is not), so ``eval/accuracy``
is the accuracy on the 200 test items. The train split and its order are untouched, and evaluating draws no
random numbers, so the training itself is the default run's.

A run stops once its test accuracy reaches ``--target`` (default 0.99): the state is kept in memory and
trained in chunks of ``eval_steps`` steps, so stopping early changes nothing before the stop. ``--full``
trains every run to ``max_steps``. Runs go ``--jobs`` at a time, each in its own process with one thread.
It prints test accuracy by step, the groups sampled (dynamic sampling samples more) and the first step at
each of 0.9 / 0.95 / ``--target``. Not part of ``make bench`` (tens of minutes per seed on 2 CPU cores).
The results are in docs/features.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
EVAL_EVERY = 10
EVAL_MANIFEST = "data/manifest_test_as_val.jsonl"


def prepare(root: Path):
    """Data + base stage of the default params in ``root``, and the manifest whose ``val`` is the test split
    → the config."""
    from vlgrpo.train.warm_start import run_base
    from vlgrpo.config import load_config
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest, write_manifest

    cfg = load_config(REPO / "params.yaml")
    build_dataset(cfg, root)
    run_base(cfg, root, root / "data/manifest.jsonl", progress=False)
    relabel = {"val": "heldout_val", "test": "val"}
    items = [dataclasses.replace(it, split=relabel.get(it.split, it.split))
             for it in read_manifest(root / "data/manifest.jsonl")]
    write_manifest(root / EVAL_MANIFEST, items)
    return cfg


def curve(root: Path, seed: int, dynamic: bool, max_steps: int | None, target: float | None,
          overrides: dict | None = None, name: str | None = None) -> list[dict]:
    """Train one variant (one thread), evaluating on the test split every EVAL_EVERY steps, until
    ``max_steps`` or (``target`` not None) the first evaluation at ``target`` or more → the evaluations:
    step, test accuracy, groups sampled so far. ``overrides``: ``train.*`` values for both variants;
    ``name``: the run's folder and metrics file (default ``plain_s<seed>`` / ``dynamic_s<seed>``)."""
    import torch

    from vlgrpo.config import load_config
    from vlgrpo.train.paths import RunPaths
    from vlgrpo.train.loop import train
    from vlgrpo.train.setup import setup

    torch.set_num_threads(1)
    cfg = load_config(REPO / "params.yaml")
    steps = max_steps or cfg.train.max_steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, **(overrides or {}), dynamic_sampling=dynamic, seed=seed, max_steps=steps,
        eval_steps=EVAL_EVERY, save_steps=steps))         # no checkpoints on the way: state stays in memory
    name = name or f"{'dynamic' if dynamic else 'plain'}_s{seed}"
    metrics = root / f"reports/{name}.jsonl"
    run = setup(cfg, RunPaths.under(root, EVAL_MANIFEST, "models/base", f"out/{name}", metrics))
    out, sampled = [], 0.0
    while run.start_step < steps:
        train(run, progress=False, stop_after=EVAL_EVERY)
        run.start_step = min(run.start_step + EVAL_EVERY, steps)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        sampled = sum(r.get("dynamic/groups_sampled", cfg.train.prompts_per_step) for r in rows)
        acc = rows[-1]["eval/accuracy"]
        out.append({"step": rows[-1]["step"], "test_accuracy": acc, "groups_sampled": sampled})
        if target is not None and acc >= target:
            break
    return out


def first_step(c: list[dict], level: float) -> int | None:
    return next((p["step"] for p in c if p["test_accuracy"] >= level), None)


def _write(path: Path | None, results: dict) -> None:
    if path is not None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one process, one thread each)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of the curves, rewritten after each run")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--full", action="store_true", help="train every run to max_steps (no stop at target)")
    ap.add_argument("--max-steps", type=int, default=None, help="shorter runs (default: params.yaml's)")
    ap.add_argument("--arms", nargs="+", choices=["plain", "dynamic"], default=["plain", "dynamic"],
                    help="train only these arms (the plain arm does not depend on --train keys of dynamic "
                         "sampling: on the same base, its curves can come from an earlier run's --out)")
    ap.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE",
                    help="train.* values for both variants, e.g. epsilon_high=0.28 (YAML values)")
    args = ap.parse_args()
    overrides = {}
    for kv in args.train:
        key, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--train {kv!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vlgrpo-dyn-") as tmp:
        root = Path(tmp)
        prepare(root)
        # The warm start's result depends on torch's thread count (a different reduction order), and every
        # curve after it on the base: name the base, so runs on the same base can be compared.
        import torch
        base = hashlib.sha256((root / "models/base/model.safetensors").read_bytes()).hexdigest()[:16]
        print(f"base model sha256 {base} (warm start on {torch.get_num_threads()} threads)", flush=True)
        stop = None if args.full else args.target
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            runs = [(s, d) for s in args.seeds for d in (False, True) if ("dynamic" if d else "plain") in args.arms]
            futs = {pool.submit(curve, root, s, d, args.max_steps, stop, overrides):
                    f"{'dynamic' if d else 'plain'}_s{s}" for s, d in runs}
            for fut in as_completed(futs):
                results[futs[fut]] = fut.result()
                print(futs[fut], "done", flush=True)
                _write(args.out, results)
    levels = (0.9, 0.95, args.target)
    for name in sorted(results):
        c = results[name]
        print(f"{name:12s} first step >= {levels}: {[first_step(c, lv) for lv in levels]}  "
              f"last {c[-1]['test_accuracy']:.3f} at {c[-1]['step']}  groups sampled {c[-1]['groups_sampled']:.0f}")
        print("   ", " ".join(f"{p['test_accuracy']:.3f}" for p in c))
    if len(args.arms) == 2:
        summarise(results, args.seeds, args.target)


def summarise(results: dict[str, list[dict]], seeds: list[int], target: float) -> None:
    """Steps to ``target`` per arm, the median over all seeds (a run that never got there counts as slower
    than any that did: ``inf``), and the seed-by-seed count of which arm got there first."""
    firsts = {dyn: [first_step(results[f"{dyn}_s{s}"], target) for s in seeds] for dyn in ("plain", "dynamic")}
    steps = {dyn: [math.inf if f is None else f for f in fs] for dyn, fs in firsts.items()}
    for dyn, fs in firsts.items():
        print(f"{dyn}: reached {target} on {sum(f is not None for f in fs)}/{len(fs)} seeds, steps {fs}, "
              f"median over all seeds {statistics.median(steps[dyn])}")
    pairs = list(zip(steps["plain"], steps["dynamic"]))
    on, off = sum(d < p for p, d in pairs), sum(p < d for p, d in pairs)
    print(f"first to {target}: dynamic on {on} seeds, plain on {off}, tie or neither on {len(pairs) - on - off}")

if __name__ == "__main__":
    main()
