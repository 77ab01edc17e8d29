"""Pipeline overheads: no-op ``dvc repro``, Prefect (+ MLflow) cost per stage, validate rows/s, evaluation items/s.

    .venv/bin/python -m tests.benchmarks.bench_pipeline [--repeats 3] [--validate-rows 20000] [--eval-items 200]
                                                        [--json out.json]

Not a pytest test (timings are not asserted); ``make bench`` runs it. What it does:

1. A throwaway copy of the project with tiny params (``tests.project.make_project``), one full ``vlgrpo repro``
   (timed, for reference), then the no-op ``dvc repro`` (every stage up to date) and the no-op ``vlgrpo repro``
   (the same under an MLflow parent run and the project lock), ``--repeats`` times each, medians.
2. Orchestration overhead per stage, for ``data`` and ``validate``: the stage command (``vlgrpo data``: Prefect
   flow + task, MLflow stage run, report) against a plain Python process that calls the core function directly
   (``build_dataset`` / ``validate_file``) and times the work inside. Overhead = stage command wall − plain
   process wall; the two are run alternately. Also the floor any flow pays: a trivial ``@flow`` in a fresh
   process (temporary Prefect server included) minus ``import prefect``.
3. ``validate`` rows/s on a ``--validate-rows`` manifest (``bench_validate.make_manifest``).
4. Evaluation items/s on ``--eval-items`` items (``bench_evaluate.main``).
5. DVC cache growth per run: ``.dvc/cache`` bytes added by the first run, the no-op runs and one re-training run.

Prints a table, last line ``noop_dvc_repro_s=<median>``.
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

from tests.project import BIN, make_project, project_env

DIRECT = {
    # the stage's work, called directly; prints the seconds spent inside the call
    "data": ("import time, tasks; from vlgrpo.config import load_config; from vlgrpo.data.build import "
             "build_dataset; cfg = load_config('params.yaml'); t = time.perf_counter(); "
             "build_dataset(cfg, '.'); print('WORK', time.perf_counter() - t)"),
    "validate": ("import time, tasks; from pathlib import Path; from vlgrpo.config import load_config; "
                 "from vlgrpo.validation import validate_file; cfg = load_config('params.yaml'); "
                 "t = time.perf_counter(); r = validate_file(Path('data/manifest.jsonl'), cfg, "
                 "Path('reports/validate_direct.json'), Path('reports/validate_direct_docs')); "
                 "assert r.ok; print('WORK', time.perf_counter() - t)"),
}
TRIVIAL_FLOW = ("import tasks; from prefect import flow\n@flow(name='bench-noop')\ndef f():\n    return 1\n"
                "assert f() == 1")


def timed(cmd: list[str], root: Path, timeout: float = 1800) -> tuple[float, str]:
    """Wall seconds of ``cmd`` run in ``root`` (the project's environment) and its stdout; fails loudly."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=project_env(root), capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode} in {root}\n--- stdout\n{p.stdout[-3000:]}\n"
                           f"--- stderr\n{p.stderr[-5000:]}")
    return dt, p.stdout


def work_seconds(stdout: str) -> float:
    return float(next(ln.split()[1] for ln in stdout.splitlines() if ln.startswith("WORK ")))


def pipeline_overheads(tmp: Path, repeats: int) -> dict:
    py = str(BIN / "python")
    root = make_project(tmp / "proj", model_name="vlgrpo-bench")
    out: dict = {}
    out["full_repro_s"], _ = timed([str(BIN / "vlgrpo"), "repro"], root)
    print(f"full vlgrpo repro (tiny params): {out['full_repro_s']:.1f}s", flush=True)
    cache_first = _cache_bytes(root)

    noop_dvc, noop_vlgrpo = [], []
    for _ in range(repeats):                                   # alternately, so load shifts hit both
        dt, so = timed([str(BIN / "dvc"), "repro"], root)
        if "Running stage" in so:
            raise RuntimeError(f"no-op dvc repro ran a stage:\n{so[-2000:]}")
        noop_dvc.append(dt)
        noop_vlgrpo.append(timed([str(BIN / "vlgrpo"), "repro"], root)[0])
    out["noop_dvc_repro_s"] = statistics.median(noop_dvc)
    out["noop_vlgrpo_repro_s"] = statistics.median(noop_vlgrpo)
    print(f"no-op dvc repro {noop_dvc}, no-op vlgrpo repro {noop_vlgrpo}", flush=True)
    out["dvc_cache_growth"] = dvc_cache_growth(root, cache_first)

    stages = {}
    for stage, code in DIRECT.items():
        flow_s, direct_s, work_s = [], [], []
        for _ in range(repeats):
            flow_s.append(timed([str(BIN / "vlgrpo"), stage], root)[0])
            dt, so = timed([py, "-c", code], root)
            direct_s.append(dt)
            work_s.append(work_seconds(so))
        f, d, w = statistics.median(flow_s), statistics.median(direct_s), statistics.median(work_s)
        stages[stage] = {"stage_command_s": f, "direct_process_s": d, "work_s": w, "overhead_s": f - d}
        print(f"{stage}: stage command {flow_s}, direct process {direct_s}, work {work_s}", flush=True)
    out["stages"] = stages

    flow_s, imp_s = [], []
    for _ in range(repeats):
        flow_s.append(timed([py, "-c", TRIVIAL_FLOW], root)[0])
        imp_s.append(timed([py, "-c", "import tasks, prefect"], root)[0])
    out["trivial_flow_s"] = statistics.median(flow_s)
    out["import_prefect_s"] = statistics.median(imp_s)
    return out


def _cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / ".dvc" / "cache").rglob("*") if p.is_file())


def dvc_cache_growth(root: Path, first: int) -> dict:
    """Bytes the DVC cache (``.dvc/cache``) gains per pipeline run: the first run (``first``), the no-op runs
    since, and one run that re-trains (``train.seed`` + 1: a new candidate with its checkpoints, bounded by
    ``train.save_total_limit``, and a new evaluation); disk use grows by about that much per training run."""
    import yaml

    noop = _cache_bytes(root) - first
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["seed"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _cache_bytes(root)
    timed([str(BIN / "vlgrpo"), "repro"], root)
    growth = {"first_run_bytes": first, "noop_runs_bytes": noop, "retrain_run_bytes": _cache_bytes(root) - before}
    print(f"DVC cache growth: first run {first / 1e6:.2f} MB, no-op runs {noop / 1e6:.2f} MB, a re-training run "
          f"{growth['retrain_run_bytes'] / 1e6:.2f} MB", flush=True)
    return growth


def validate_rate(tmp: Path, rows: int) -> dict:
    from tests.benchmarks.bench_validate import make_manifest
    from vlgrpo.config import Config
    from vlgrpo.validation import validate_file

    manifest = make_manifest(tmp / "validate", rows, max(1, min(500, rows // 20)))
    import great_expectations  # noqa: F401  (one-off import, not per-row work)

    t0 = time.perf_counter()
    res = validate_file(manifest, Config(), tmp / "validate" / "report.json", tmp / "validate" / "docs")
    dt = time.perf_counter() - t0
    if not (res.ok and res.valid_rows == rows):
        raise RuntimeError(f"validate benchmark: expected {rows} valid rows, got {res.counts}")
    return {"rows": rows, "seconds": dt, "rows_per_s": rows / dt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--validate-rows", type=int, default=20_000)
    ap.add_argument("--eval-items", type=int, default=200)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        res["validate"] = validate_rate(tmp, args.validate_rows)
        from tests.benchmarks import bench_evaluate
        res["evaluate"] = bench_evaluate.main(["--items", str(args.eval_items)])
        res["pipeline"] = pipeline_overheads(tmp, args.repeats)
    res["wall_s"] = time.perf_counter() - t_start
    res["loadavg_start"], res["loadavg_end"] = load0, os.getloadavg()
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"noop_dvc_repro_s={res['pipeline']['noop_dvc_repro_s']:.2f}")
    return res


def report(r: dict) -> str:
    p, v, e = r["pipeline"], r["validate"], r["evaluate"]
    g = p["dvc_cache_growth"]
    lines = [f"{os.cpu_count()} cores; load avg {r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} "
             f"at end; wall {r['wall_s']:.0f}s", "",
             "| measurement | value |", "|---|---|",
             f"| full `vlgrpo repro`, tiny params (7 stages) | {p['full_repro_s']:.1f} s |",
             f"| no-op `dvc repro` (all stages up to date) | {p['noop_dvc_repro_s']:.2f} s |",
             f"| no-op `vlgrpo repro` (+ MLflow parent run, lock) | {p['noop_vlgrpo_repro_s']:.2f} s |"]
    for stage, s in p["stages"].items():
        lines += [f"| `vlgrpo {stage}` (Prefect flow + MLflow run) | {s['stage_command_s']:.2f} s |",
                  f"| {stage}: plain process calling the core directly | {s['direct_process_s']:.2f} s "
                  f"(work inside {s['work_s']:.2f} s) |",
                  f"| **{stage}: orchestration overhead** (stage command − plain process) | "
                  f"**{s['overhead_s']:.2f} s** |"]
    lines += [f"| trivial `@flow` in a fresh process (temporary Prefect server) | {p['trivial_flow_s']:.2f} s |",
              f"| `import prefect` alone | {p['import_prefect_s']:.2f} s |",
              f"| **Prefect floor per flow run** (trivial flow − import) | "
              f"**{p['trivial_flow_s'] - p['import_prefect_s']:.2f} s** |",
              f"| DVC cache growth: first run / no-op runs / a re-training run | "
              f"{g['first_run_bytes'] / 1e6:.2f} / {g['noop_runs_bytes'] / 1e6:.2f} / "
              f"{g['retrain_run_bytes'] / 1e6:.2f} MB |",
              f"| validate ({v['rows']} rows, cached images) | {v['rows_per_s']:.0f} rows/s |",
              f"| evaluation ({e['items']} items, untrained tiny model: full-length answers) | "
              f"{e['items_per_s']:.2f} items/s |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
