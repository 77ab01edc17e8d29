"""Evaluation throughput on the tiny default Qwen2.5-VL.

    python -m tests.benchmarks.bench_evaluate [--items 1000] [--threads 2] [--batch-size N]

Generates ``--items`` synthetic test items (default params.yaml data knobs), builds the tiny default model,
and times :func:`vlgrpo.eval.evaluate.evaluate_models` on one model: batched greedy decoding, every reward,
bootstrap intervals. Target (issue 4): 1,000 items in <= 2 minutes on 2 cores, i.e. >= 8.33 items/s.

The freshly built model is untrained, so it never emits <|im_end|> and always generates the full
``train.max_completion_length`` tokens: the worst case (a warm-started model stops after ~2 tokens).
Data generation and the model build are not timed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from tests.settings import tuned_config

TARGET_ITEMS = 1000
TARGET_SECONDS = 120.0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=TARGET_ITEMS)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is 2 cores)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: evaluate.batch_size")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    from vlgrpo.config import load_config
    from vlgrpo.data.manifest import write_manifest
    from vlgrpo.data.synthetic import generate
    from vlgrpo.eval.evaluate import evaluate_models
    from vlgrpo.model.tiny_model import build_tiny

    torch.set_num_threads(args.threads)
    cfg = load_config(args.params) if Path(args.params).exists() else tuned_config({})
    ev = dataclasses.replace(cfg.evaluate, max_items=None, samples_k=0,
                             batch_size=args.batch_size or cfg.evaluate.batch_size)
    cfg = dataclasses.replace(cfg, evaluate=ev)
    data_cfg = dataclasses.replace(cfg.data, num_train=1, num_val=0, num_test=args.items)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        items = []
        for it, img in generate(data_cfg):
            if it.split != "test":
                continue
            rel = f"img/{it.id}.png"
            img.save(root / rel)
            it.images = [rel]
            items.append(it)
        write_manifest(root / "manifest.jsonl", items)
        model, processor = build_tiny([t for it in items for t in (it.question, it.solution)],
                                      cfg.base.tiny, seed=0)
        t0 = time.perf_counter()
        res = evaluate_models(cfg, root / "manifest.jsonl", {"candidate": lambda: (model, processor)},
                              progress=True, root=root)
        secs = time.perf_counter() - t0

    n = res["n_items"]
    ips = n / secs
    target_ips = TARGET_ITEMS / TARGET_SECONDS
    out = {"items": n, "seconds": round(secs, 2), "items_per_s": round(ips, 2),
           "target_items_per_s": round(target_ips, 2), "ratio_vs_target": round(ips / target_ips, 2),
           "threads": torch.get_num_threads(), "batch_size": cfg.evaluate.batch_size,
           "max_new_tokens": cfg.evaluate.max_new_tokens or cfg.train.max_completion_length,
           "mean_completion_tokens": round(res["candidate"]["completion_length"], 2)}
    for k, v in out.items():
        print(f"{k}: {v}")
    return out


if __name__ == "__main__":
    main()
