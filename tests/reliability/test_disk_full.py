"""Full disks: a real (tmpfs) filesystem fills up under a checkpoint save, a report write and an MLflow
artifact upload. Each fails with one line naming the folder and the space needed; what was there before
(the last checkpoint, the last report, the registry) is intact; once space is freed, the same command
finishes - training resumes and ends with the weights and metrics of an undisturbed run.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.project import run
from tests.reliability.conftest import (REPO, VLGRPO, fill_disk, spawn, tmpfs_at, update_params, wait_for)
from tests.reliability.test_killed_training import _metrics
from tests.reliability.test_mlflow_outage import SLOW_PLUGIN

pytestmark = pytest.mark.reliability
SLOW = {"rewards": {"weights": {"accuracy": 1.0, "rel_slow": 0.1}, "plugins": ["slow_plugin.py"]},
        "train": {"max_steps": 4, "save_steps": 2, "save_total_limit": None}}


def _slow_project(root: Path) -> Path:
    (root / "slow_plugin.py").write_text(SLOW_PLUGIN)
    update_params(root, **SLOW)
    return root


def _hidden_tmp(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


def test_full_disk_at_checkpoint_save_keeps_the_last_checkpoint_and_resumes_to_the_same_weights(
        ready_project, tmp_path, cli_env, monkeypatch):
    from vlgrpo.config import load_config
    from vlgrpo.train import RunPaths, train_grpo
    from vlgrpo.train.checkpoint import complete_checkpoints, latest_checkpoint

    # The undisturbed run, same settings, on an ordinary disk.
    ref = _slow_project(shutil.copytree(ready_project, tmp_path / "ref"))
    monkeypatch.chdir(ref)                                 # the reward plugin path is the project's
    s = train_grpo(load_config(ref / "params.yaml"), RunPaths.under(
        ref, "data/manifest.jsonl", "models/base", "models/candidate", "reports/train_metrics.jsonl"),
        progress=False)
    assert s["finished"] and s["resumed_from"] is None

    project = _slow_project(shutil.copytree(ready_project, tmp_path / "proj",
                                            ignore=shutil.ignore_patterns("models")))
    candidate = project / "models/candidate"
    with tmpfs_at(project / "models", 64) as disk:
        shutil.copytree(ready_project / "models/base", disk / "base")
        log = tmp_path / "train.log"
        proc = spawn([VLGRPO, "train", "--force"], project, log, **cli_env)
        try:
            wait_for(lambda: latest_checkpoint(candidate) is not None, 600, proc, log, poll=0.02)
            filler = fill_disk(disk, leave_bytes=256 * 1024)     # step-4's checkpoint will not fit
            rc = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = log.read_text(errors="replace").strip().splitlines()
        assert rc == 1, "\n".join(err[-40:])
        step2 = candidate / "checkpoints/step-2"
        one = rf"vlgrpo train: error: \[Errno 28\] no space left on device in {re.escape(str(step2.parent))}: " \
              rf"writing step-4 needs about (\d+\.\d) MB and 0\.\d MB is free; free at least \d+\.\d MB there"
        m = re.match(one, err[-1])
        assert m, err[-1]
        assert abs(float(m.group(1)) * 1e6 - sum(f.stat().st_size for f in step2.iterdir())) < 1e5
        # The last good checkpoint is whole; nothing half-written is left; no final model was published.
        assert [p.name for p in complete_checkpoints(candidate)] == ["step-2"]
        load_file(step2 / "model.safetensors")
        assert not _hidden_tmp(disk) and not (candidate / "model.safetensors").exists()

        filler.unlink()                                          # space is freed: the stage resumes
        run([VLGRPO, "train", "--force"], project, timeout=600, **cli_env)
        report = json.loads((project / "reports/train.json").read_text())
        assert report["resumed_from"] == 2 and report["finished"] and report["steps"] == 4
        assert _metrics(project / "reports/train_metrics.jsonl") == \
            _metrics(ref / "reports/train_metrics.jsonl")
        got = load_file(candidate / "model.safetensors")
        want = load_file(ref / "models/candidate/model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_full_disk_at_report_write_keeps_the_last_report(tmp_path):
    from tasks.common import read_report, write_report
    from vlgrpo.io import DiskFull

    with tmpfs_at(tmp_path / "proj", 1) as root:
        write_report(root, "evaluate", {"accuracy": 0.5, "rows": list(range(10))})
        before = (root / "reports/evaluate.json").read_bytes()
        filler = fill_disk(root)
        new = {"accuracy": 0.75, "rows": list(range(2000))}
        size = len((json.dumps(new, indent=2) + "\n").encode())
        with pytest.raises(DiskFull) as e:
            write_report(root, "evaluate", new)
        assert str(e.value) == (
            f"[Errno 28] no space left on device in {root / 'reports'}: writing evaluate.json needs exactly "
            f"{size / 1e6:.1f} MB and 0.0 MB is free; free at least {size / 1e6:.1f} MB there and run it "
            f"again (earlier results are unchanged)")
        assert (root / "reports/evaluate.json").read_bytes() == before
        assert not _hidden_tmp(root)
        filler.unlink()
        write_report(root, "evaluate", new)
        assert read_report(root, "evaluate") == new


def test_full_disk_in_mlflow_artifact_store_registers_nothing_until_space_is_freed(project, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.registry import register_candidate
    from tasks.tracking import setup
    from vlgrpo.io import DiskFull

    for pkg in ("tasks", "vlgrpo"):                       # logged with the model, as by the register stage
        shutil.copytree(REPO / pkg, project / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    candidate = shutil.copytree(project / "models/base", project / "models/candidate")
    name = "vlgrpo-rel-disk"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with tmpfs_at(project / "mlartifacts", 16) as store:
        try:
            exp = setup(project, "vlgrpo")                # the default local store: artifacts in mlartifacts/
            client = MlflowClient()
            with mlflow.start_run(experiment_id=exp) as r:
                filler = fill_disk(store)
                with pytest.raises(DiskFull, match=rf"^\[Errno 28\] no space left on device in {store}/\S+: "
                                   r"writing model needs about \d+\.\d MB and 0\.0 MB is free"):
                    register_candidate(client, name, project, candidate, r.info.run_id, {}, (3136, 12544))
                assert client.search_model_versions(f"name='{name}'") == []
                filler.unlink()
                version, reused = register_candidate(client, name, project, candidate, r.info.run_id, {},
                                                     (3136, 12544))
            assert (version, reused) == ("1", False)
            assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
            assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"candidate": "1"}
        finally:
            mlflow.end_run()
            mlflow.set_tracking_uri(prev[0])
            mlflow.set_registry_uri(prev[1])
