"""The `vlgrpo` command: one subcommand per stage, plus the whole pipeline, promotion and serving.

    vlgrpo --help
    vlgrpo data | validate | base | pilot | train [--force] | evaluate | register
    vlgrpo validate --data FILE [--report FILE]   # check any dataset file, anywhere (no project needed)
    vlgrpo pipeline            # every stage in one Prefect flow run
    vlgrpo repro [dvc args]    # `dvc repro` under one MLflow parent run and the project lock (make pipeline)
    vlgrpo promote --version N --reason "..."
    vlgrpo serve               # serve the scheduled `pipeline` deployment (needs PREFECT_API_URL)
    vlgrpo where               # where the results are
    vlgrpo check               # only the pre-flight check of params.yaml and what it names

Each stage subcommand runs that stage's Prefect flow (flows/<stage>.py). Exit status: 0 on success,
1 when the stage fails or refuses (the reason is printed once, without a traceback; the Prefect run is
marked Failed with it), 2 on a usage error. A real crash prints its full traceback.

Every command first runs the pre-flight check (tasks/preflight.py: keys, types, values, reward names, plugin
files, data and model paths) and stops with all the problems listed, before Prefect, MLflow or a stage starts.

With PREFECT_API_URL unset, `repro` and `pipeline` start one temporary Prefect server for the whole run and
hand it to every stage; a stage command run alone starts its own, as Prefect does. Either way one execution
is one `pipeline @ <commit>` flow run with the stages' runs inside it (flows/lineage.py). Modules are imported
where a command needs them, so each stage pays only for what it uses.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

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
    p.add_argument("--params", help="params file (default: params.yaml); its folder is the project root")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage, text in STAGE_HELP.items():
        sp = sub.add_parser(stage, help=text, description=text)
        if stage == "validate":
            sp.add_argument("--data", help="check this file instead (manifest, ms-swift JSONL, COCO captions "
                            "JSON or Flickr30k Karpathy JSON), anywhere: params.yaml if present (or --params), "
                            "else the defaults; no Prefect or MLflow run. Without --data: the pipeline stage "
                            "on the data stage's manifest")
            sp.add_argument("--report", help="where to write the JSON report (default: reports/validate.json; "
                            "with --data: <FILE name>.validation.json in the current folder)")
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
    sub.add_parser("check", help="check params.yaml and what it names (rewards, plugins, paths); nothing runs",
                   description="The pre-flight check every command runs first, alone: every problem of the "
                   "params file at once (keys, types, values, reward names, plugin files, data and model "
                   "paths). Exit status 0 when there is none, 1 otherwise.")
    return p


def _run(args: argparse.Namespace) -> object:
    params = args.params or "params.yaml"
    cmd = args.command
    if cmd == "validate" and args.data:
        return check_data(args.params, args.data, args.report)
    # A stage runs as a subflow of `vlgrpo repro`'s pipeline flow run when it runs under one (flows/lineage.py).
    if cmd == "data":
        from flows.data import data_flow
        return _stage(data_flow, params=params)
    if cmd == "validate":
        from flows.validate import validate_flow
        return _stage(validate_flow, params=params, data=args.data, report=args.report)
    if cmd == "base":
        from flows.base import base_flow
        return _stage(base_flow, params=params)
    if cmd == "pilot":
        from flows.pilot import pilot_flow
        return _stage(pilot_flow, params=params)
    if cmd == "train":
        from flows.train import train_flow
        return _stage(train_flow, params=params, force=args.force)
    if cmd == "evaluate":
        from flows.evaluate import evaluate_flow
        return _stage(evaluate_flow, params=params)
    if cmd == "register":
        from flows.register import register_flow
        return _stage(register_flow, params=params)
    if cmd == "pipeline":
        from flows.pipeline import pipeline_flow
        from prefect import tags

        from flows.lineage import pipeline_tags

        with one_prefect_server(), tags(*pipeline_tags(params)):
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
    if cmd == "check":
        print(f"{params}: ok (keys, values, rewards, plugins, paths)")
        return None
    raise AssertionError(cmd)


def _stage(stage_flow: object, **parameters: object) -> object:
    from flows.lineage import run_stage

    return run_stage(stage_flow, **parameters)


def repro(params: str, dvc_args: list[str]) -> int:
    """`dvc repro` as one pipeline execution: the `pipeline` flow run (flows/repro.py) with its stages inside,
    under the project lock. When every stage is up to date no Prefect server is started: the MLflow parent
    run still records the (empty) execution."""
    from tasks.common import load
    from vlgrpo.io import project_lock

    cfg, root = load(params)
    with project_lock(root, "dvc repro"):
        if _would_run(root, dvc_args):
            from prefect import tags

            from flows.lineage import pipeline_tags
            from flows.repro import repro_flow

            with one_prefect_server(), tags(*pipeline_tags(params)):
                repro_flow(params, dvc_args)   # a failed stage raises FailedRun: main() prints its reason
        else:
            from flows.dvc_run import dvc_repro
            from tasks.tracking import pipeline_run

            with pipeline_run(cfg, root):
                rc = dvc_repro(root, dvc_args)
                if rc != 0:
                    raise SystemExit(f"dvc repro failed (exit {rc}); earlier outputs and the registry are "
                                     "unchanged")
    where(params)
    return 0


_temporary_prefect = False  # whether this process ran a temporary Prefect server (gone once the run ends)
TEMPORARY_SERVER_UI = "http://127.0.0.1:4200"  # where `prefect server start` serves the UI by default


@contextlib.contextmanager
def one_prefect_server() -> Iterator[None]:
    """One temporary Prefect server for a whole run, when no server is configured (PREFECT_API_URL unset).

    Without it every stage process of `dvc repro` starts and stops a temporary server of its own (~5-10 s
    each on 2 cores). This is the same server Prefect would start (its SubprocessASGIServer, SQLite under
    PREFECT_HOME); the stages find it through PREFECT_API_URL, in this process and in child processes.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    global _temporary_prefect
    server = SubprocessASGIServer()
    server.start()
    # The server is gone once the run ends; its runs stay in PREFECT_HOME's database, where `prefect server
    # start` shows them on its default address. Links to the runs (the MLflow tag prefect.flow_run_url,
    # Prefect's own "View at") point there, unless the user set a UI address.
    ui = os.environ.get("PREFECT_UI_URL") or TEMPORARY_SERVER_UI
    saved_ui = os.environ.get("PREFECT_UI_URL")
    os.environ["PREFECT_API_URL"], os.environ["PREFECT_UI_URL"] = server.api_url, ui
    _temporary_prefect = True
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ui}):
            yield
    finally:
        _send_prefect_logs()  # before the server goes: what is still queued would fail to send after
        os.environ.pop("PREFECT_API_URL", None)
        if saved_ui is None:
            os.environ.pop("PREFECT_UI_URL", None)
        else:
            os.environ["PREFECT_UI_URL"] = saved_ui
        server.stop()


def _send_prefect_logs() -> None:
    from prefect.logging.handlers import APILogHandler

    try:
        APILogHandler().flush()
    except Exception:  # noqa: BLE001 - losing a last log line must not fail a finished run
        pass


def check_data(params: str | None, data: str, report: str | None) -> dict:
    """`vlgrpo validate --data FILE`: check one dataset file anywhere, with no project, Prefect or MLflow run.

    Config: ``--params`` if given, else ./params.yaml if there is one, else the defaults. Exit status as the
    stage's: 0 valid, 1 invalid or unreadable (one line, no traceback).
    """
    from tasks.common import StageFailed
    from vlgrpo.config import Config, load_config
    from vlgrpo.data.validation import format_summary, validate_file

    if params is None and not Path("params.yaml").exists():
        cfg, source = Config(), "the defaults (no params.yaml here)"
    else:
        cfg, source = load_config(params or "params.yaml"), params or "params.yaml"
    data_path = Path(data)
    report_file = Path(report) if report else Path(f"{data_path.name}.validation.json")
    docs = report_file.with_name(report_file.stem + "_docs")
    try:
        result = validate_file(data_path, cfg, report_path=report_file, data_docs_dir=docs)
    except ValueError as e:  # the readers' channel for a missing or malformed document; names the file
        raise StageFailed(str(e)) from None
    print(format_summary(result), file=sys.stderr)
    print(f"checked with {source}; report {report_file.resolve()}", file=sys.stderr)
    if not result.ok:
        raise StageFailed(f"{data} is not valid: {result.error_rows} of {result.rows} rows with errors, "
                          f"expectations {'passed' if result.suite_success else 'FAILED'}")
    return {"ok": True, "report": str(report_file)}


def _would_run(root: Path, dvc_args: list[str]) -> bool:
    """Whether `dvc repro` may run a stage (so a Prefect server is worth starting); False only when a plain
    repro finds every stage up to date. A wrong guess costs time, never correctness: a stage that finds no
    server starts its own."""
    if dvc_args:
        return True
    import json

    from flows.dvc_run import dvc_executable

    p = subprocess.run([dvc_executable(), "status", "--json"], cwd=root, capture_output=True, text=True)
    try:
        return p.returncode != 0 or json.loads(p.stdout or "{}") != {}
    except ValueError:
        return True


def promote_cmd(params: str | None, version: str, reason: str, name: str | None) -> dict:
    from tasks.common import load
    from tasks.register import promote_by_hand

    cfg, root = load(params or "params.yaml")
    out = promote_by_hand(cfg, root, name or cfg.register.model_name, str(version), reason)
    print(f"champion -> version {version} ({reason})")
    return out


def where(params: str) -> None:
    from tasks.common import load
    from tasks.tracking import tracking_uri

    cfg, root = load(params or "params.yaml")
    uri = tracking_uri(root)
    print("\nResults:")
    docs = [("data docs", "reports/validate_docs/index.html")] if cfg.validate.data_docs else []
    for label, rel in [("reports", "reports/"), ("evaluation report", "reports/evaluate.html"), *docs,
                       ("plots", "plots/"), ("candidate model", cfg.train.out_dir)]:
        print(f"  {label:18s} {root / rel}")
    if uri.startswith(("http://", "https://")):
        print(f"  {'MLflow UI':18s} {uri}")
    else:
        print(f"  {'MLflow UI':18s} mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    api = os.environ.get("PREFECT_API_URL")
    if api and not _temporary_prefect:
        print(f"  {'Prefect UI':18s} {api.rstrip('/').removesuffix('/api')}   (flow run `pipeline @ <commit>`)")
    else:
        # A temporary server keeps its runs in PREFECT_HOME's database; a server started later shows them.
        print(f"  {'Prefect UI':18s} prefect server start   (then {TEMPORARY_SERVER_UI}, flow run "
              "`pipeline @ <commit>`)")
    print(f"  {'champion':18s} models:/{cfg.register.model_name}@champion")


def _one_line(e: BaseException) -> str:
    # YAML parser messages span lines (with a caret line); an error is one line, its parts kept.
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.common import EXPECTED
    from tasks.preflight import PreflightFailed, preflight

    try:
        if not (args.command == "validate" and args.data):  # a file anywhere: no project to check
            preflight(args.params or "params.yaml")
        _run(args)
    except PreflightFailed as e:  # one line per problem
        print(f"vlgrpo {args.command}: error: {e}", file=sys.stderr)
        return 1
    except EXPECTED as e:  # raised outside a flow (config, lock, a standalone check)
        print(f"vlgrpo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        prefect_errors = sys.modules.get("prefect.exceptions")  # imported only if a flow ran
        if prefect_errors is None or not isinstance(e, prefect_errors.FailedRun):
            raise  # a real crash: full traceback
        # A flow ended Failed with an expected reason (tasks.common.expected_failures): print it once.
        print(f"vlgrpo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlgrpo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
