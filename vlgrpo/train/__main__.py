"""``python -m vlgrpo.train [params.yaml [out_dir [metrics]]]``: the train section on the default paths.

Two CPU processes (gloo), launched by hand:

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m vlgrpo.train params.yaml

The train and pilot stages start the same module themselves when ``train.launch`` asks for several
processes (vlgrpo.train.launch builds that command); they name every path explicitly: ``--root``,
``--manifest``, ``--init`` (starting model), ``--out``, ``--metrics``, plus ``--no-progress`` and
``--summary`` (a JSON file the main process writes the run's summary to, atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from vlgrpo.config import load_config
from vlgrpo.io import atomic_write_json
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlgrpo.train", description="GRPO with params.yaml's train section")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.add_argument("out_dir", nargs="?", default=None, help="default: train.out_dir")
    p.add_argument("metrics_pos", nargs="?", default=None, metavar="metrics",
                   help="default: reports/train_metrics.jsonl")
    p.add_argument("--root", default=".", help="project root the other paths are taken under")
    p.add_argument("--manifest", default=None, help="default: <data.out_dir>/manifest.jsonl")
    p.add_argument("--init", default=None, help="starting model folder or hub id (default: base.out_dir)")
    p.add_argument("--out", default=None, help="same as out_dir")
    p.add_argument("--metrics", default=None, help="same as metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the stage shows its own)")
    p.add_argument("--summary", default=None, help="write the run's summary (JSON) here, main process only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(a.params)
    out = a.out or a.out_dir or cfg.train.out_dir
    metrics = a.metrics or a.metrics_pos or "reports/train_metrics.jsonl"
    manifest = a.manifest or Path(cfg.data.out_dir) / "manifest.jsonl"
    paths = RunPaths.under(a.root, manifest, a.init or cfg.base.out_dir, out, metrics)
    summary = train_grpo(cfg, paths, progress=not a.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:          # one summary, from the main process
        if a.summary:
            atomic_write_json(Path(a.summary), summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "final"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
