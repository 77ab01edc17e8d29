"""`vlgrpo repro` with ``train.rollout.engine: vllm``: the whole pipeline to a registered candidate, the pilot
and the train stage each sampling their rollouts on a real vLLM engine (.venv-vllm, from `make vllm-env`).

One tiny project (git + DVC; 2 pilot steps, 3 train steps). Each of the two stages starts its own engine
once and stops it when it ends: afterwards exactly two engine logs exist (one start each) and no engine
process of the project is left.
"""
import json
from pathlib import Path

import pytest

from tests.project import BIN, make_project, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv-vllm/bin/python"
ENGINE = {"engine": "vllm", "vllm": {"python": str(PYTHON), "dtype": "float32", "max_model_len": 512}}


def engine_processes(root: Path) -> list[int]:
    """Pids of live engine servers loading a model of this project."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "vllm_server.py" in cmd and str(root) in cmd:
            pids.append(int(proc.name))
    return pids


def test_repro_on_the_vllm_engine_registers_a_candidate(tmp_path):
    from mlflow.tracking import MlflowClient

    if not PYTHON.exists():
        pytest.fail(f"the vLLM engine environment is missing ({PYTHON}): build it with `make vllm-env` "
                    f"(`make test` does)")
    # fewer items than the other project tests: the stages around the two engine runs cost what they must
    params = {"data": {"num_train": 16, "num_val": 4, "num_test": 4}, "train": {"rollout": ENGINE}}
    root = make_project(tmp_path / "proj", params=params, model_name="vlgrpo-vllm")
    tmp = tmp_path / "tmp"          # the engines' logs land here, one folder per engine started
    tmp.mkdir()
    p = run([str(BIN / "vlgrpo"), "repro"], root, timeout=1500, TMPDIR=str(tmp))
    assert "models:/vlgrpo-vllm@" in p.stdout

    reports = {s: json.loads((root / "reports" / f"{s}.json").read_text()) for s in ("pilot", "train", "register")}
    assert reports["train"]["finished"] and reports["train"]["steps"] == 3
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("vlgrpo-vllm", "candidate")
    assert reports["register"]["version"] == str(mv.version) == "1" and mv.status == "READY"

    # the rollouts came from the engine: its sync and sampler-mismatch metrics are logged every train step
    runs = client.search_runs([client.get_experiment_by_name("vlgrpo").experiment_id])
    train_run = next(r for r in runs if r.info.run_name == "train")
    for key in ("mismatch/logp_diff_mean", "time/sync_push_s"):
        assert [m.step for m in client.get_metric_history(train_run.info.run_id, key)] == [1, 2, 3], key

    # one engine per stage (pilot, train), each started once, and none left running
    logs = sorted(tmp.glob("vlgrpo-vllm-*/server.log"))
    assert len(logs) == 2, logs
    for log in logs:
        assert log.read_text(errors="replace").count("vllm_server: serving") == 1, log
    assert engine_processes(root) == []
