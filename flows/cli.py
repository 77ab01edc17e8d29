"""The `vlgrpo` command: one subcommand per stage, plus the whole pipeline, promotion and serving.

    vlgrpo --help
    vlgrpo data | validate [--data FILE] [--report FILE] | base | pilot | train [--force] | evaluate | register
    vlgrpo pipeline            # every stage in one Prefect flow run
    vlgrpo repro [dvc args]    # `dvc repro` under one MLflow parent run and the project lock (make pipeline)
    vlgrpo promote --version N --reason "..."
    vlgrpo serve               # serve the scheduled `pipeline` deployment (needs PREFECT_API_URL)
    vlgrpo where               # where the results are

Each stage subcommand runs that stage's Prefect flow (flows/<stage>.py). Exit status: 0 on success,
1 when the stage fails or refuses (the reason is printed), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import tasks  # noqa: F401  (offline tool defaults before anything heavy is imported)

STAGE_HELP = {
    "data": "build data/manifest.jsonl and the normalised image cache (params: data)",
    "validate": "check a manifest or raw dataset file with Great Expectations + row checks (params: validate)",
    "base": "load the base Qwen-VL, or build + warm-start the tiny offline one (params: base)",
    "pilot": "small GRPO run that gates the full run; writes reports/pilot.json (params: pilot, train)",
    "train": "full GRPO run from models/base to models/candidate (params: train, rewards)",
    "evaluate": "base vs candidate vs champion on held-out data; promotion decision (params: evaluate)",
    "register": "log the candidate to the MLflow registry; move `champion` if evaluate said so",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlgrpo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GRPO-tune Qwen-VL models: data -> validate -> base -> pilot -> train -> evaluate -> "
                    "register.\nEvery knob lives in params.yaml; results go to reports/, models/, plots/ and "
                    "MLflow.",
        epilog="Examples:\n  vlgrpo validate --data my_dataset.jsonl --report /tmp/check.json\n"
               "  vlgrpo repro            # what `make pipeline` runs\n"
               "  vlgrpo promote --version 3 --reason 'manual review passed'")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s); its folder "
                   "is the project root")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage, text in STAGE_HELP.items():
        sp = sub.add_parser(stage, help=text, description=text)
        if stage == "validate":
            sp.add_argument("--data", help="manifest, ms-swift JSONL, COCO captions JSON or Flickr30k "
                            "Karpathy JSON (default: the data stage's manifest)")
            sp.add_argument("--report", help="where to write the JSON report (default: reports/validate.json)")
        if stage == "train":
            sp.add_argument("--force", action="store_true",
                            help="train even though the pilot did not pass (recorded in the report and MLflow)")
    sp = sub.add_parser("pipeline", help="run every stage in one Prefect flow (no DVC caching)")
    sp.add_argument("--force-train", action="store_true", help="skip the pilot gate (recorded)")
    sp = sub.add_parser("repro", help="`dvc repro` under one MLflow parent run and the project lock",
                        description="Run `dvc repro` (only stages whose inputs changed) as one pipeline "
                        "execution. Extra arguments go to dvc repro.")
    sp.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments passed to `dvc repro`")
    sp = sub.add_parser("promote", help="move the `champion` alias to a registered version by hand")
    sp.add_argument("--version", required=True, help="registered model version to promote")
    sp.add_argument("--reason", required=True, help="why (recorded as a version tag)")
    sp.add_argument("--name", help="registered model name (default: params register.model_name)")
    sp = sub.add_parser("serve", help="serve the scheduled `pipeline` deployment (flow.serve)")
    sp.add_argument("--cron", help="cron schedule (default: the one in prefect.yaml)")
    sp.add_argument("--name", default="scheduled", help="deployment name (default: %(default)s)")
    sub.add_parser("where", help="print where the reports, models and MLflow UI are")
    return p


def _run(args: argparse.Namespace) -> object:
    params = args.params
    cmd = args.command
    if cmd == "data":
        from flows.data import data_flow
        return data_flow(params)
    if cmd == "validate":
        from flows.validate import validate_flow
        return validate_flow(params, data=args.data, report=args.report)
    if cmd == "base":
        from flows.base import base_flow
        return base_flow(params)
    if cmd == "pilot":
        from flows.pilot import pilot_flow
        return pilot_flow(params)
    if cmd == "train":
        from flows.train import train_flow
        return train_flow(params, force=args.force)
    if cmd == "evaluate":
        from flows.evaluate import evaluate_flow
        return evaluate_flow(params)
    if cmd == "register":
        from flows.register import register_flow
        return register_flow(params)
    if cmd == "pipeline":
        from flows.pipeline import pipeline_flow
        out = pipeline_flow(params, force_train=args.force_train)
        where(params)
        return out
    if cmd == "repro":
        return repro(params, args.dvc_args)
    if cmd == "promote":
        return promote_cmd(params, args.version, args.reason, args.name)
    if cmd == "serve":
        from flows.serve import serve
        return serve(params, name=args.name, cron=args.cron)
    if cmd == "where":
        return where(params)
    raise AssertionError(cmd)


def repro(params: str, dvc_args: list[str]) -> int:
    from tasks.common import load
    from tasks.tracking import pipeline_run
    from vlgrpo.io import project_lock

    cfg, root = load(params)
    with project_lock(root, "dvc repro"), pipeline_run(cfg, root):
        # The child stages see VLGRPO_PARENT_RUN_ID and nest their runs under this one.
        rc = subprocess.run([_dvc(), "repro", *dvc_args], cwd=root, env=os.environ.copy()).returncode
        if rc != 0:
            raise SystemExit(f"dvc repro failed (exit {rc}); earlier outputs and the registry are unchanged")
    where(params)
    return rc


def _dvc() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def promote_cmd(params: str, version: str, reason: str, name: str | None) -> dict:
    from mlflow.tracking import MlflowClient

    from tasks.common import load
    from tasks.registry import promote
    from tasks.tracking import setup

    cfg, root = load(params)
    setup(root, cfg.register.experiment)
    out = promote(MlflowClient(), name or cfg.register.model_name, str(version), reason, by=None)
    print(f"champion -> version {version} ({reason})")
    return out


def where(params: str) -> None:
    from tasks.common import load
    from tasks.tracking import tracking_uri

    cfg, root = load(params)
    uri = tracking_uri(root)
    print("\nResults:")
    for label, rel in [("reports", "reports/"), ("evaluation report", "reports/evaluate.md"),
                       ("plots", "plots/"), ("candidate model", cfg.train.out_dir)]:
        print(f"  {label:18s} {root / rel}")
    print(f"  {'MLflow UI':18s} mlflow ui --backend-store-uri {uri}")
    print(f"  {'champion':18s} models:/{cfg.register.model_name}@champion")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.common import StageFailed
    from vlgrpo.config import ConfigError
    from vlgrpo.data.images import CorruptCacheFile
    from vlgrpo.io import ContentMismatch, DiskFull, LockBusy

    try:
        _run(args)
    except (StageFailed, ConfigError, LockBusy, DiskFull, ContentMismatch, CorruptCacheFile) as e:
        print(f"vlgrpo {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlgrpo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
