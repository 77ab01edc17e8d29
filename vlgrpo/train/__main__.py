"""``python -m vlgrpo.train [params.yaml [out_dir [metrics]]]``: the train section on the default paths.

Two CPU processes (gloo):

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m vlgrpo.train params.yaml
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from vlgrpo.config import load_config
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv[0] if argv else "params.yaml")
    out = argv[1] if len(argv) > 1 else cfg.train.out_dir
    metrics = argv[2] if len(argv) > 2 else "reports/train_metrics.jsonl"
    paths = RunPaths.under(".", Path(cfg.data.out_dir) / "manifest.jsonl", cfg.base.out_dir, out, metrics)
    summary = train_grpo(cfg, paths)
    if int(os.environ.get("RANK", "0")) == 0:          # one summary line, from the main process
        print(json.dumps({k: v for k, v in summary.items() if k != "final"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
