"""Full disks: a real (tmpfs) filesystem fills up under a checkpoint save, a report write and an MLflow
artifact upload. Each fails with one line naming the folder and the space needed; what was there before
(the last checkpoint, the last report, the registry) is intact; once space is freed, running again finishes:
under training, `vlgrpo repro` resumes from the last checkpoint and ends with the weights, metrics, evaluation
and registry of an undisturbed run.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.project import run
from tests.reliability.conftest import (REPO, REPRO_TIMEOUT, VLGRPO, fill_disk, repro_project, spawn, tmpfs_at,
                                        wait_for)
from tests.reliability.repro_results import assert_same_as_undisturbed
from tests.reliability.slow_training import SLOW

pytestmark = pytest.mark.reliability


def _hidden_tmp(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


def test_full_disk_at_checkpoint_save_keeps_the_last_checkpoint_and_repro_resumes_to_the_same_weights(
        undisturbed_repro, tmp_path, cli_env):
    from vlgrpo.train.checkpoint import complete_checkpoints, latest_checkpoint

    project = repro_project(tmp_path / "proj")
    candidate = project / "models/candidate"
    with tmpfs_at(project / "models", 64) as disk:
        log = tmp_path / "repro.log"
        # Slowed (a second a step, the same numbers): the disk fills between step-2's checkpoint and step-4's.
        proc = spawn([VLGRPO, "repro"], project, log, **SLOW, **cli_env)
        try:
            wait_for(lambda: latest_checkpoint(candidate) is not None, REPRO_TIMEOUT, proc, log, poll=0.02)
            filler = fill_disk(disk, leave_bytes=256 * 1024)     # step-4's checkpoint will not fit
            rc = proc.wait(REPRO_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = log.read_text(errors="replace")
        assert rc == 1, out[-4000:]
        # The train stage's own one line (then DVC's and `vlgrpo repro`'s, naming the failed stage).
        step2 = candidate / "checkpoints/step-2"
        one = rf"^vlgrpo train: error: \[Errno 28\] no space left on device in {re.escape(str(step2.parent))}: " \
              rf"writing step-4 needs about (\d+\.\d) MB and 0\.\d MB is free; free at least \d+\.\d MB there " \
              r"and run it again \(earlier results are unchanged\)$"
        m = re.search(one, out, re.MULTILINE)
        assert m, out[-4000:]
        assert abs(float(m.group(1)) * 1e6 - sum(f.stat().st_size for f in step2.iterdir())) < 1e5
        # The last good checkpoint is whole; nothing half-written is left; no final model was published, and
        # DVC recorded nothing of the failed stage.
        assert [p.name for p in complete_checkpoints(candidate)] == ["step-2"]
        load_file(step2 / "model.safetensors")
        assert not _hidden_tmp(disk) and not (candidate / "model.safetensors").exists()
        assert "train" not in yaml.safe_load((project / "dvc.lock").read_text())["stages"]

        filler.unlink()                                          # space is freed: the pipeline resumes
        run([VLGRPO, "repro"], project, timeout=REPRO_TIMEOUT, **cli_env)
        # From step-2, to the weights, metrics, evaluation and registry of the undisturbed run.
        assert_same_as_undisturbed(project, undisturbed_repro)


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
