"""The train and pilot stages launch their own processes (``train.launch``), in the pipeline.

One tiny project (git + DVC) with ``train.launch.num_processes: 2``, driven by `vlgrpo repro`: the pilot and
train stages run as 2 gloo CPU processes started by the stage through accelerate's launcher, and the run
registers a candidate. Against it, in the same project:

- the manual launch (``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m vlgrpo.train``)
  gives the same weights (within the DDP test's bound) and metrics, and the stage's MLflow run holds them;
- faults: rank 1 raises (the stage fails with that error), rank 1 hangs and the stage gets SIGTERM (every
  launched process ends with it), then rank 1 is SIGKILLed (the stage fails naming rank 1); each time the
  other rank is stopped (the subprocess timeout bounds it: a hang fails the test), no final model is
  written, and the next run resumes from the last complete checkpoint to the same result;
- the FSDP2 config through the stage shards the policy and gives the same result;
- two "machines" on loopback (two launches with ``num_machines: 2``, machine ranks 0 and 1, one process
  each) give the same result as one machine with two processes.
"""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.project import BIN, make_project, project_env, run

pytestmark = pytest.mark.slow
VLGRPO = str(BIN / "vlgrpo")
REPO = Path(__file__).resolve().parents[2]
STEPS = 3
FAULT_PLUGIN = '''
import os, signal
from vlgrpo.rewards import register

_calls = [0]

@register("fault")
def fault(prompts, completions, **columns):
    """0 for every completion; on rank 1, at its VLGRPO_TEST_FAULT_AT-th call: raise, hang, or SIGKILL itself."""
    _calls[0] += 1
    mode = os.environ.get("VLGRPO_TEST_FAULT")
    if mode and os.environ.get("RANK") == "1" and _calls[0] == int(os.environ["VLGRPO_TEST_FAULT_AT"]):
        if mode == "raise":
            raise RuntimeError("injected fault on rank 1")
        if mode == "hang":
            open(os.environ["VLGRPO_TEST_FAULT_MARK"], "w").close()
            signal.pause()
        os.kill(os.getpid(), signal.SIGKILL)
    return [0.0] * len(completions)
'''


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _assert_same_run(rows_a, rows_b, weights_a: Path, weights_b: Path):
    """Metrics and weights of two 2-process runs agree (the DDP test's bound on the weights)."""
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(rows_a, rows_b):
        for k in ("reward", "reward_std", "completions/mean_length"):
            assert ra[k] == rb[k], (ra["step"], k)
        for k in ("loss", "kl", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    w1, w2 = load_file(weights_a), load_file(weights_b)
    assert sorted(w1) == sorted(w2)
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 5e-4, k


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = {"evaluate": {"min_improvement": -1.0},
              "train": {"max_steps": STEPS, "save_steps": 1, "mixed_precision": "no",
                        "launch": {"num_processes": 2}}}
    root = make_project(tmp_path_factory.mktemp("launch") / "proj", params=params, model_name="vlgrpo-launch")
    p = run([VLGRPO, "repro"], root, timeout=1500)
    return root, p


@pytest.fixture(scope="module")
def manual(project):
    """The same training launched by hand (``accelerate launch ... -m vlgrpo.train``): what every stage run of
    this module is compared with. A fixture, so no test depends on another having run first."""
    root, _ = project
    port = str(_free_port())
    run([str(BIN / "accelerate"), "launch", "--config_file", str(root / "configs/accelerate/cpu_2proc.yaml"),
         "--main_process_port", port, "-m", "vlgrpo.train", "params.yaml", "models/manual", "reports/manual.jsonl"],
        root, timeout=900)
    return _rows(root / "reports/manual.jsonl"), root / "models/manual/model.safetensors"


def test_repro_with_two_processes_registers_and_equals_the_manual_launch(project, manual):
    root, p = project
    train = json.loads((root / "reports/train.json").read_text())
    assert train["num_processes"] == 2 and train["finished"] and train["steps"] == STEPS
    assert json.loads((root / "reports/pilot.json").read_text())["train_summary"]["num_processes"] == 2
    assert "--num_processes 2" in (root / "reports/train_launch.log").read_text()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert "candidate" in client.get_registered_model("vlgrpo-launch").aliases

    stage_rows, (manual_rows, manual_weights) = _rows(root / "reports/train_metrics.jsonl"), manual
    _assert_same_run(stage_rows, manual_rows, root / "models/candidate/model.safetensors", manual_weights)
    # the stage's MLflow run holds the main process's metrics, each step once
    for key in ("loss", "reward"):
        history = sorted(client.get_metric_history(train["mlflow_run_id"], key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, STEPS + 1))
        assert [m.value for m in history] == pytest.approx([r[key] for r in stage_rows], rel=1e-6)


def _fault_params(root: Path) -> Path:
    """params.yaml plus a reward of weight 0 that injects faults (so the run's numbers are the stage's)."""
    (root / "fault.py").write_text(FAULT_PLUGIN)
    cfg = yaml.safe_load((root / "params.yaml").read_text())
    cfg["rewards"]["plugins"] = [*cfg["rewards"].get("plugins", []), "fault.py"]
    cfg["rewards"]["weights"] = {**cfg["rewards"]["weights"], "fault": 0.0}
    cfg["train"]["out_dir"] = "models/faulty"
    (root / "fault.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "fault.yaml"


def test_a_failing_rank_fails_the_stage_with_its_error_and_the_rerun_resumes(project, manual):
    root, _ = project
    params = str(_fault_params(root))
    out = root / "models/faulty"
    (root / "reports/train_metrics.jsonl").unlink()
    train = [VLGRPO, "--params", params, "train", "--force"]

    # 1) rank 1 raises in step 2: the stage fails with rank 1's error; step 1's checkpoint stays
    p = run(train, root, timeout=300, check=False, VLGRPO_TEST_FAULT="raise", VLGRPO_TEST_FAULT_AT="2")
    said = p.stdout + p.stderr
    assert p.returncode != 0 and "injected fault on rank 1" in said and "rank 1 failed" in said, said[-3000:]
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("step-")) == ["step-1"]
    assert not (out / "model.safetensors").exists()

    # 2) rank 1 hangs in step 2 and the stage gets SIGTERM (what Prefect's cancellation sends the flow's
    #    process): the stage ends and takes every launched process with it
    mark = root / "hang.mark"
    proc = subprocess.Popen(train, cwd=root, env=project_env(root, VLGRPO_TEST_FAULT="hang", VLGRPO_TEST_FAULT_AT="1",
                                                          VLGRPO_TEST_FAULT_MARK=str(mark)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3000):
            if mark.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert mark.exists(), "rank 1 never reached the hang"
        assert any(_pids_running_in(root))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    for _ in range(300):                    # the stage waits for its group; a few more seconds at most
        if not any(_pids_running_in(root)):
            break
        time.sleep(0.1)
    assert not any(_pids_running_in(root)), "a launched process outlived the stopped stage"
    assert not (out / "model.safetensors").exists()

    # 3) rank 1 SIGKILLed in its second step after resuming (step 3): the stage fails naming rank 1 and how
    p = run(train, root, timeout=300, check=False, VLGRPO_TEST_FAULT="kill", VLGRPO_TEST_FAULT_AT="2")
    said = p.stdout + p.stderr
    assert p.returncode != 0 and "rank 1 failed" in said and "SIGKILL" in said, said[-3000:]
    assert "step-2" in {d.name for d in (out / "checkpoints").iterdir()}
    assert not (out / "model.safetensors").exists()
    assert not any(_pids_running_in(root)), "a launched process outlived the failed stage"

    # 4) no fault: resumes from step 2 and ends where the uninterrupted stage did
    run(train, root, timeout=600)
    report = json.loads((root / "reports/train.json").read_text())
    assert report["resumed_from"] == 2 and report["finished"] and report["num_processes"] == 2
    _assert_same_run(manual[0], _rows(root / "reports/train_metrics.jsonl"),
                     manual[1], out / "model.safetensors")


def test_two_machines_on_loopback_equal_one_machine_with_two_processes(project, manual, monkeypatch):
    import dataclasses

    from tasks.launch import launched_grpo
    from vlgrpo.config import LaunchConfig, load_config
    from vlgrpo.train.paths import RunPaths

    root, _ = project
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(root / "params.yaml")
    port = _free_port()
    paths = RunPaths.under(root, "data/manifest.jsonl", "models/base", "models/two-machines", "reports/tm.jsonl")
    results, errors = {}, {}

    def machine(rank: int):
        launch = LaunchConfig(num_processes=2, num_machines=2, machine_rank=rank, main_process_ip="127.0.0.1",
                              main_process_port=port)
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, launch=launch))
        try:
            results[rank] = launched_grpo(c, paths, f"machine{rank}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    threads = [threading.Thread(target=machine, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert results[0]["num_processes"] == 2 and results[0]["finished"] and results[1]["machine_rank"] == 1
    log1 = (root / "reports/machine1_launch.log").read_text()
    assert "--num_machines 2 --machine_rank 1" in log1
    _assert_same_run(manual[0], _rows(root / "reports/tm.jsonl"),
                     manual[1], root / "models/two-machines/model.safetensors")


def _free_port() -> int:
    from vlgrpo.train.launch import free_port

    return free_port()


def _pids_running_in(root: Path):
    """Live processes whose command line names this project's fault params (the launched ranks)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if "vlgrpo.train" in cmd and str(root) in cmd and state != "Z":
                yield int(d.name)


def test_the_stage_with_the_fsdp2_config_shards_and_equals_the_manual_launch(project, manual):
    import dataclasses

    from tasks.launch import launched_grpo
    from vlgrpo.config import LaunchConfig, load_config
    from vlgrpo.train.paths import RunPaths

    root, _ = project
    cfg = load_config(root / "params.yaml")
    launch = LaunchConfig(num_processes=2, config="configs/accelerate/fsdp2.yaml")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, launch=launch))
    paths = RunPaths.under(root, "data/manifest.jsonl", "models/base", "models/fsdp2", "reports/fsdp2.jsonl")
    summary = launched_grpo(cfg, paths, "fsdp2")
    assert summary["sharding"] == "fsdp2" and summary["num_processes"] == 2 and summary["finished"]
    assert "--config_file" in (root / "reports/fsdp2_launch.log").read_text()
    _assert_same_run(manual[0], _rows(root / "reports/fsdp2.jsonl"),
                     manual[1], root / "models/fsdp2/model.safetensors")
