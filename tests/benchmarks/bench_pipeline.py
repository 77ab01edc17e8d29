"""Pipeline overheads: per-stage cost of a whole run (this code vs a peer checkout), no-op ``dvc repro``, rates.

    .venv/bin/python -m tests.benchmarks.bench_pipeline [--compare DIR] [--default-params] [--repeats 3]
        [--skip-rates] [--skip-cache-growth] [--validate-rows 20000] [--eval-items 200] [--json out.json]

Not a pytest test (timings are not asserted); ``make bench`` runs it. What it does:

1. Per-stage overhead of a whole ``vlgrpo repro`` (tiny params, ``tests.project.make_project``), for this
   checkout and, with ``--compare DIR``, for another checkout of the project (e.g. ``git clone -b main``),
   run alternately so that load shifts hit both. Each project is built by its own checkout's code, and the
   commands run with ``PYTHONPATH`` at that checkout. The output is read line by line as it arrives: a stage's
   wall time runs from dvc's ``Running stage`` line to the next one; its flow time from Prefect's ``Beginning
   flow run`` to ``Finished in state``; **overhead = stage wall - flow time** (process start, imports, Prefect
   server start/stop, process exit, dvc's hashing). ``setup`` is the time before the first stage. Each stage
   also gets the **CPU seconds** (user + system) of the whole process tree over the same span - the stage
   process, dvc and the run's Prefect server - which depend far less on what else loads the machine than wall
   times do; the last stage's span and the total come from ``wait4`` on the finished tree.
2. With ``--default-params``: the whole default pipeline (``vlgrpo repro`` on the shipped params.yaml, what
   ``make pipeline`` runs), once per checkout, alternately; wall time and the results (they must agree).
3. No-op ``dvc repro`` (every stage up to date) and no-op ``vlgrpo repro``, ``--repeats`` times, medians.
4. Unless ``--skip-rates``: the data/validate stage command against a plain process calling the core directly,
   the floor of a trivial ``@flow`` (temporary server vs a running one), validate rows/s, evaluation items/s.
5. Unless ``--skip-cache-growth``: DVC cache growth per run: ``.dvc/cache`` bytes added by the first run, the
   no-op runs and one re-training run (``train.seed`` + 1).

Prints tables, last line ``noop_dvc_repro_s=<median>``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import resource
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from tests.project import BIN, ROOT, project_env
from tests.settings import tuned_config

STAGES = ["data", "validate", "base", "pilot", "train", "evaluate", "register"]
DIRECT = {
    # the stage's work, called directly; prints the seconds spent inside the call
    "data": ("import time, tasks; from vlgrpo.config import load_config; from vlgrpo.data.build import "
             "build_dataset; cfg = load_config('params.yaml'); t = time.perf_counter(); "
             "build_dataset(cfg, '.'); print('WORK', time.perf_counter() - t)"),
    "validate": ("import time, tasks; from pathlib import Path; from vlgrpo.config import load_config; "
                 "from vlgrpo.data.validation import validate_file; cfg = load_config('params.yaml'); "
                 "t = time.perf_counter(); r = validate_file(Path('data/manifest.jsonl'), cfg, "
                 "Path('reports/validate_direct.json'), Path('reports/validate_direct_docs')); "
                 "assert r.ok; print('WORK', time.perf_counter() - t)"),
}
TRIVIAL_FLOW = ("import tasks; from prefect import flow\n@flow(name='bench-noop')\ndef f():\n    return 1\n"
                "assert f() == 1")
MAKE_PROJECT = ("import json, sys; from pathlib import Path; from tests.project import make_project; "
                "make_project(Path(sys.argv[1]), params=json.loads(sys.argv[2]), model_name='vlgrpo-bench')")
RUNNING = re.compile(r"^Running stage '([\w-]+)'")
FLOW_BEGIN = re.compile(r"Beginning flow run '[^']+' for flow '([\w-]+)'")
FLOW_END = re.compile(r"Flow run '[^']+' - Finished in state")


def tree_env(tree: Path, root: Path, **extra: str) -> dict[str, str]:
    """The project's environment with ``tree``'s code first on the path, output unbuffered."""
    return project_env(root, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", **extra)


def make_tree_project(tree: Path, dest: Path, default_params: bool) -> Path:
    """A throwaway project built by ``tree``'s own tests.project (tiny params, or the shipped ones)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BIN / "python"), "-c", MAKE_PROJECT, str(dest), "{}"], cwd=tree,
                   env=tree_env(tree, tree), check=True, capture_output=True, text=True)
    if default_params:
        cfg = yaml.safe_load((tree / "params.yaml").read_text())
        cfg.setdefault("register", {})["model_name"] = "vlgrpo-bench"
        (dest / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children (and theirs) so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds used so far by ``proc`` and every process below it, finished ones included.

    A process's own user + system time plus its ``children_*`` times (the finished children it waited for,
    with their own descendants) over ``proc`` and each live descendant: a finished stage process is counted
    in dvc's ``children_*``, a live one by itself. Only processes nobody waited for (daemons) are missed.
    """
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # ended between the listing and the read: its parent counts it once reaped
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def timed(cmd: list[str], root: Path, env: dict[str, str] | None = None, timeout: float = 3600,
          cpu: list[float] | None = None) -> tuple[float, str]:
    """Wall seconds of ``cmd`` run in ``root`` and its stdout; fails loudly. Appends its process tree's CPU
    seconds to ``cpu`` when given."""
    t0, c0 = time.perf_counter(), children_cpu()
    p = subprocess.run(cmd, cwd=root, env=env or project_env(root), capture_output=True, text=True,
                       timeout=timeout)
    dt = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(children_cpu() - c0)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode} in {root}\n--- stdout\n{p.stdout[-3000:]}\n"
                           f"--- stderr\n{p.stderr[-5000:]}")
    return dt, p.stdout


def staged_repro(tree: Path, root: Path, log: Path) -> dict:
    """One ``vlgrpo repro`` with ``tree``'s code: per stage the wall time, flow time, overhead and the CPU
    seconds of the whole process tree (the stage process, dvc, the run's Prefect server) from its output."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "vlgrpo"), "repro"], cwd=root, env=tree_env(tree, root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    ps = psutil.Process(proc.pid)
    marks: list[tuple[str, float, float]] = []  # stage, wall seconds since start, tree CPU seconds so far
    flows: dict[str, list[float]] = {}
    current = None
    with open(log, "w", encoding="utf-8") as out:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            out.write(f"{now:9.3f} {line}")
            if m := RUNNING.match(line):
                marks.append((m.group(1), now, tree_cpu(ps)))
            elif m := FLOW_BEGIN.search(line):
                current = m.group(1)
                flows[current] = [now, now]
            elif FLOW_END.search(line) and current in flows:
                flows[current][1] = now
    # wait4: the exit status and the CPU of the whole finished tree (repro and everything it waited for)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    total, total_cpu = time.perf_counter() - t0, ru.ru_utime + ru.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"vlgrpo repro ({tree}) exited {proc.returncode}; see {log}")
    stages = {}
    for k, (name, start, cpu) in enumerate(marks):
        end, end_cpu = (marks[k + 1][1], marks[k + 1][2]) if k + 1 < len(marks) else (total, total_cpu)
        flow = flows.get(name, [start, start])
        stages[name] = {"wall_s": end - start, "flow_s": flow[1] - flow[0],
                        "overhead_s": (end - start) - (flow[1] - flow[0]), "cpu_s": end_cpu - cpu}
    return {"total_s": total, "total_cpu_s": total_cpu, "setup_s": marks[0][1] if marks else total,
            "setup_cpu_s": marks[0][2] if marks else total_cpu, "stages": stages, "results": results(root),
            "loadavg": [load0[0], os.getloadavg()[0]]}


def results(root: Path) -> dict:
    """The numbers a run produces, to check that two code versions give the same results."""
    def rep(stage: str) -> dict:
        path = root / "reports" / f"{stage}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    ev, tr, pi = rep("evaluate"), rep("train"), rep("pilot")
    acc = {m: ev.get(m, {}).get("accuracy") for m in ("base", "candidate")}
    return {"pilot_passed": pi.get("passed"), "train_steps": tr.get("steps"),
            "train_last_reward": _last_reward(root / "reports" / "train_metrics.jsonl"),
            "test_accuracy": acc, "promote": ev.get("decision", {}).get("promote")}


def _last_reward(metrics: Path) -> float | None:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1]).get("reward") if lines else None


def compare_runs(trees: dict[str, Path], tmp: Path, repeats: int, default_params: bool) -> dict:
    """Alternate whole runs of each tree (tiny params ``repeats`` times, or the default params once)."""
    kind = "default" if default_params else "tiny"
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    for i in range(1 if default_params else repeats):
        for label, tree in (trees.items() if i % 2 == 0 else reversed(trees.items())):
            root = make_tree_project(tree, tmp / f"{kind}-{label}-{i}" / "proj", default_params)
            r = staged_repro(tree, root, tmp / f"{kind}-{label}-{i}.log")
            runs[label].append(r)
            print(f"{kind} params, {label} ({tree}), load {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f}: "
                  f"vlgrpo repro {r['total_s']:.1f}s wall, {r['total_cpu_s']:.1f}s CPU; setup {r['setup_s']:.1f}s "
                  f"({r['setup_cpu_s']:.1f}s CPU); " + ", ".join(
                      f"{n} {v['wall_s']:.1f}s (overhead {v['overhead_s']:.1f}s, CPU {v['cpu_s']:.1f}s)"
                      for n, v in r["stages"].items()), flush=True)
    out = {}
    for label, rs in runs.items():
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        out[label] = {**{k: med(lambda r, k=k: r[k]) for k in ("total_s", "total_cpu_s", "setup_s", "setup_cpu_s")},
                      "stages": {s: {k: med(lambda r, s=s, k=k: r["stages"][s][k])
                                     for k in ("wall_s", "flow_s", "overhead_s", "cpu_s")} for s in STAGES},
                      "loadavg": [r["loadavg"] for r in rs],
                      "results": rs[-1]["results"], "root": str(tmp / f"{kind}-{label}-{len(rs) - 1}" / "proj")}
    return out


def noop_repro(tree: Path, root: Path, repeats: int) -> dict:
    noop_dvc, noop_vlgrpo, cpu_dvc, cpu_vlgrpo = [], [], [], []
    env = tree_env(tree, root)
    load0 = os.getloadavg()[0]
    for _ in range(repeats):  # alternately, so load shifts hit both
        dt, so = timed([str(BIN / "dvc"), "repro"], root, env, cpu=cpu_dvc)
        if "Running stage" in so:
            raise RuntimeError(f"no-op dvc repro ran a stage:\n{so[-2000:]}")
        noop_dvc.append(dt)
        noop_vlgrpo.append(timed([str(BIN / "vlgrpo"), "repro"], root, env, cpu=cpu_vlgrpo)[0])
    load = [load0, os.getloadavg()[0]]
    print(f"no-op (load {load[0]:.1f} -> {load[1]:.1f}): dvc repro {noop_dvc} s wall, {cpu_dvc} s CPU; "
          f"vlgrpo repro {noop_vlgrpo} s wall, {cpu_vlgrpo} s CPU", flush=True)
    med = statistics.median
    return {"noop_dvc_repro_s": med(noop_dvc), "noop_vlgrpo_repro_s": med(noop_vlgrpo),
            "noop_dvc_repro_cpu_s": med(cpu_dvc), "noop_vlgrpo_repro_cpu_s": med(cpu_vlgrpo), "loadavg": load}


def work_seconds(stdout: str) -> float:
    return float(next(ln.split()[1] for ln in stdout.splitlines() if ln.startswith("WORK ")))


def stage_vs_direct(root: Path, repeats: int) -> dict:
    """Orchestration overhead of one stage command run alone, against a plain process doing the same work."""
    py = str(BIN / "python")
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
    flow_s, served_s, imp_s = [], [], []
    from tests.servers import prefect_server

    with prefect_server(root.parent / "prefect-bench") as srv:
        for _ in range(repeats):
            flow_s.append(timed([py, "-c", TRIVIAL_FLOW], root)[0])
            served_s.append(timed([py, "-c", TRIVIAL_FLOW], root, project_env(root, PREFECT_API_URL=srv.url))[0])
            imp_s.append(timed([py, "-c", "import tasks, prefect"], root)[0])
    return {"stages": stages, "trivial_flow_s": statistics.median(flow_s),
            "trivial_flow_served_s": statistics.median(served_s), "import_prefect_s": statistics.median(imp_s)}


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
    from vlgrpo.data.validation import validate_file

    manifest = make_manifest(tmp / "validate", rows, max(1, min(500, rows // 20)))
    import great_expectations  # noqa: F401  (one-off import, not per-row work)

    t0 = time.perf_counter()
    res = validate_file(manifest, tuned_config(), tmp / "validate" / "report.json", tmp / "validate" / "docs")
    dt = time.perf_counter() - t0
    if not (res.ok and res.valid_rows == rows):
        raise RuntimeError(f"validate benchmark: expected {rows} valid rows, got {res.counts}")
    return {"rows": rows, "seconds": dt, "rows_per_s": rows / dt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=Path, help="another checkout of the project to measure alternately "
                    "(e.g. `git clone -q -b main <repo> /tmp/main`)")
    ap.add_argument("--default-params", action="store_true", help="also run the whole default pipeline "
                    "(what `make pipeline` runs) once per checkout")
    ap.add_argument("--skip-tiny", action="store_true", help="skip the tiny-params runs (with --default-params)")
    ap.add_argument("--this-first", action="store_true", help="start each alternation with this checkout "
                    "(run once each way to balance a load that drifts)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-rates", action="store_true", help="skip the stage-vs-direct, validate and "
                    "evaluation measurements")
    ap.add_argument("--skip-cache-growth", action="store_true", help="skip the DVC cache growth measurement "
                    "(it re-trains once)")
    ap.add_argument("--validate-rows", type=int, default=20_000)
    ap.add_argument("--eval-items", type=int, default=200)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    trees = {"this": ROOT}
    if args.compare:
        trees = {"peer": args.compare.resolve(), "this": ROOT}
        if args.this_first:
            trees = {"this": ROOT, "peer": args.compare.resolve()}

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    res: dict = {"trees": {k: str(v) for k, v in trees.items()}}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        if not (args.skip_tiny and args.default_params):
            res["tiny"] = compare_runs(trees, tmp, args.repeats, default_params=False)
        if args.default_params:
            res["default"] = compare_runs(trees, tmp, 1, default_params=True)
        this_root = Path(res.get("tiny", res.get("default"))["this"]["root"])
        cache_first = _cache_bytes(this_root)
        res["noop"], res["noop_root"] = noop_repro(ROOT, this_root, args.repeats), str(this_root)
        if not args.skip_cache_growth:
            res["dvc_cache_growth"] = dvc_cache_growth(this_root, cache_first)
        if not args.skip_rates:
            res["direct"] = stage_vs_direct(this_root, args.repeats)
            res["validate"] = validate_rate(tmp, args.validate_rows)
            from tests.benchmarks import bench_evaluate
            res["evaluate"] = bench_evaluate.main(["--items", str(args.eval_items)])
    res["wall_s"] = time.perf_counter() - t_start
    res["loadavg_start"], res["loadavg_end"] = load0, os.getloadavg()
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"noop_dvc_repro_s={res['noop']['noop_dvc_repro_s']:.2f}")
    return res


def _stage_table(runs: dict, title: str) -> list[str]:
    labels = list(runs)
    cols = ("wall", "overhead", "CPU")
    head = " | ".join(f"{lb} {c}" for lb in labels for c in cols)
    lines = [f"{title}", "", f"| stage | {head} |", "|---|" + "---|" * (len(cols) * len(labels))]
    lines.append("| setup (before the first stage) | " + " | ".join(
        f"{runs[lb]['setup_s']:.1f} s | - | {runs[lb]['setup_cpu_s']:.1f} s" for lb in labels) + " |")
    for s in STAGES:
        lines.append(f"| {s} | " + " | ".join(
            f"{runs[lb]['stages'][s]['wall_s']:.1f} s | {runs[lb]['stages'][s]['overhead_s']:.1f} s | "
            f"{runs[lb]['stages'][s]['cpu_s']:.1f} s" for lb in labels) + " |")
    lines.append("| **whole `vlgrpo repro`** | " + " | ".join(
        f"**{runs[lb]['total_s']:.1f} s** | **{sum(v['overhead_s'] for v in runs[lb]['stages'].values()):.1f} s**"
        f" | **{runs[lb]['total_cpu_s']:.1f} s**" for lb in labels) + " |")
    lines += ["", "1-minute load average at the start and end of each run: " + "; ".join(
        f"{lb} " + ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in runs[lb]["loadavg"]) for lb in labels)]
    lines += ["", "results: " + "; ".join(f"{lb}: {json.dumps(runs[lb]['results'])}" for lb in labels)]
    return lines


def report(r: dict) -> str:
    lines = [f"{os.cpu_count()} cores; load avg {r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} "
             f"at end; wall {r['wall_s']:.0f}s; checkouts {r['trees']}", ""]
    if "tiny" in r:
        lines += _stage_table(r["tiny"], "Tiny params (median per stage; overhead = stage wall - flow time)")
    if "default" in r:
        lines += [""] + _stage_table(r["default"], "Default params (`make pipeline`), one run each")
    n = r["noop"]
    lines += ["", f"no-op runs in {r['noop_root']} (load {n['loadavg'][0]:.1f} -> {n['loadavg'][1]:.1f})", "",
              "| measurement | value |", "|---|---|",
              f"| no-op `dvc repro` (all stages up to date) | {n['noop_dvc_repro_s']:.2f} s "
              f"({n['noop_dvc_repro_cpu_s']:.2f} s CPU) |",
              f"| no-op `vlgrpo repro` (+ MLflow parent run, lock) | {n['noop_vlgrpo_repro_s']:.2f} s "
              f"({n['noop_vlgrpo_repro_cpu_s']:.2f} s CPU) |"]
    if g := r.get("dvc_cache_growth"):
        lines += [f"| DVC cache growth: first run / no-op runs / a re-training run | "
                  f"{g['first_run_bytes'] / 1e6:.2f} / {g['noop_runs_bytes'] / 1e6:.2f} / "
                  f"{g['retrain_run_bytes'] / 1e6:.2f} MB |"]
    if "direct" in r:
        d, v, e = r["direct"], r["validate"], r["evaluate"]
        for stage, s in d["stages"].items():
            lines += [f"| `vlgrpo {stage}` run alone (own temporary Prefect server) | {s['stage_command_s']:.2f} s |",
                      f"| {stage}: plain process calling the core directly | {s['direct_process_s']:.2f} s "
                      f"(work inside {s['work_s']:.2f} s) |",
                      f"| **{stage}: orchestration overhead** (stage command − plain process) | "
                      f"**{s['overhead_s']:.2f} s** |"]
        lines += [f"| trivial `@flow` in a fresh process (temporary Prefect server) | {d['trivial_flow_s']:.2f} s |",
                  f"| trivial `@flow` in a fresh process (running server, PREFECT_API_URL set) | "
                  f"{d['trivial_flow_served_s']:.2f} s |",
                  f"| `import prefect` alone | {d['import_prefect_s']:.2f} s |",
                  f"| validate ({v['rows']} rows, cached images) | {v['rows_per_s']:.0f} rows/s |",
                  f"| evaluation ({e['items']} items, untrained tiny model: full-length answers) | "
                  f"{e['items_per_s']:.2f} items/s |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
