"""Learning curves with and without dynamic sampling (``train.dynamic_sampling``) on the default task.

    python -m tests.benchmarks.bench_dynamic_sampling --seeds 0 1 2 [--out curves.json] [--max-steps N]

For each ``train.seed``, trains the default ``params.yaml`` run twice (dynamic sampling off / on, checkpoints
every 10 steps) in a fresh project under a temp folder (data and base stage first, shared by all runs), then
scores every 10th checkpoint greedily on the test split. It prints test accuracy by step, the groups sampled
(dynamic sampling samples more) and the first step at 0.99 or more. This is not part of ``make bench``: it takes
about 15 minutes per seed on 2 CPU cores. The results are in docs/features.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def prepare(root: Path):
    """Data + base stage of the default params in ``root`` → the config."""
    from vlgrpo.base import run_base
    from vlgrpo.config import load_config
    from vlgrpo.data.build import build_dataset

    cfg = load_config(REPO / "params.yaml")
    build_dataset(cfg, root)
    run_base(cfg, root, root / "data/manifest.jsonl", progress=False)
    return cfg


def curve(cfg, root: Path, seed: int, dynamic: bool, max_steps: int) -> list[dict]:
    """Train one variant; test accuracy (and groups sampled so far) of every 10th checkpoint."""
    from safetensors.torch import load_model

    from vlgrpo import evaluate as E
    from vlgrpo import modeling
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.train import RunPaths, train_grpo

    name = f"{'dynamic' if dynamic else 'plain'}_s{seed}"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dynamic_sampling=dynamic, seed=seed,
                                                            save_steps=10, max_steps=max_steps))
    train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", f"out/{name}",
                                   f"reports/{name}.jsonl"), progress=False)
    rows = [json.loads(line) for line in (root / f"reports/{name}.jsonl").read_text().splitlines()]
    test = read_manifest(root / "data/manifest.jsonl", split="test")
    fns = E.resolve_reward_fns(cfg, root, root / "data")
    model, proc = modeling.load_model(root / "models/base")
    out = []
    for step in range(10, cfg.train.max_steps + 1, 10):
        load_model(model, str(root / f"out/{name}/checkpoints/step-{step}/model.safetensors"))
        acc = E.val_metrics(model, proc, test, root / "data", cfg, fns)["eval/accuracy"]
        sampled = sum(r.get("dynamic/groups_sampled", cfg.train.prompts_per_step) for r in rows if r["step"] <= step)
        out.append({"step": step, "test_accuracy": acc, "groups_sampled": sampled})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="shorter runs (default: params.yaml's)")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlgrpo-dyn-") as tmp:
        root = Path(tmp)
        cfg = prepare(root)
        steps = args.max_steps or cfg.train.max_steps
        for seed in args.seeds:
            for dynamic in (False, True):
                results[f"{'dynamic' if dynamic else 'plain'}_s{seed}"] = curve(cfg, root, seed, dynamic, steps)
    for name, c in results.items():
        first = next((p["step"] for p in c if p["test_accuracy"] >= 0.99), None)
        print(f"{name:12s} first step >= 0.99: {first}  final {c[-1]['test_accuracy']:.3f}  "
              f"groups sampled {c[-1]['groups_sampled']:.0f}")
        print("   ", " ".join(f"{p['test_accuracy']:.3f}" for p in c))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
