"""The whole pipeline through `dvc repro` in a fresh project: stages, MLflow runs, registry, caching, failure.

One real project (git + DVC, tiny params) is driven through the life a user gives it:
first run → push/pull in a fresh clone → no-op repro → a learning-rate change re-runs only what depends on
it → an experiment → a stage that fails on a changed limit must leave outputs and the registry untouched.
"""
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.project import BIN, make_project, run

pytestmark = pytest.mark.integration
STAGES = ["data", "validate", "base", "pilot", "train", "evaluate", "register"]


def _md5_tree(path: Path) -> str:
    h = hashlib.md5()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("vlgrpo-dvc-test").aliases.items()}


def _set_params(root: Path, section: str, key: str, value) -> None:
    cfg = yaml.safe_load((root / "params.yaml").read_text())
    cfg[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _ran(stdout: str) -> list[str]:
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # min_improvement -1: the tiny 3-step candidate is promoted on the first run, exercising promotion.
    root = make_project(tmp_path_factory.mktemp("dvcproj") / "proj",
                        params={"evaluate": {"min_improvement": -1.0}}, model_name="vlgrpo-dvc-test")
    # The run's temporary Prefect server keeps its runs under this PREFECT_HOME; `ui_servers` serves them.
    p = run([str(BIN / "vlgrpo"), "repro"], root, timeout=1500, PREFECT_HOME=str(root.parent / "prefect-home"))
    return root, p


def test_first_run_runs_every_stage_registers_and_promotes(project):
    root, p = project
    assert _ran(p.stdout) == STAGES
    for stage in STAGES:
        assert (root / "reports" / f"{stage}.json").is_file(), stage
    assert "models:/vlgrpo-dvc-test@champion" in p.stdout and "mlflow ui --backend-store-uri" in p.stdout
    client = _client(root)
    assert _aliases(client) == {"candidate": "1", "champion": "1"}
    tags = client.get_model_version("vlgrpo-dvc-test", "1").tags
    assert tags["promotion.by"] == "vlgrpo register (should_promote)" and tags["promotion.reason"]

    # One parent run for the execution, one nested run per stage, each with provenance tags and params.
    exp = client.get_experiment_by_name("vlgrpo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vlgrpo.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    train = next(r for r in children if r.info.run_name == "train")
    assert train.data.params["train.learning_rate"] == "0.001"
    assert len(train.data.tags["git_commit"]) == 40 and train.data.tags["data_md5"] != "unknown"
    history = client.get_metric_history(train.info.run_id, "reward")
    assert [m.step for m in history] == [1, 2, 3]  # every step forwarded, none twice


def test_push_then_pull_in_a_fresh_clone_restores_data_and_models(project, tmp_path):
    root, _ = project
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e"]
    subprocess.run(["git", "add", "dvc.lock", "reports"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "run"], cwd=root, check=True)
    run([str(BIN / "dvc"), "push"], root)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    run([str(BIN / "dvc"), "pull"], clone)
    for rel in ("data/manifest.jsonl", "data/cache", "models/base", "models/candidate"):
        a, b = root / rel, clone / rel
        assert (a.read_bytes() == b.read_bytes()) if a.is_file() else (_md5_tree(a) == _md5_tree(b)), rel


def test_second_repro_runs_nothing(project):
    root, _ = project
    t0 = time.perf_counter()
    p = run([str(BIN / "dvc"), "repro"], root)
    elapsed = time.perf_counter() - t0
    print(f"no-op dvc repro: {elapsed:.2f}s")
    assert _ran(p.stdout) == []
    assert all(f"Stage '{s}' didn't change" in p.stdout for s in STAGES)


def test_learning_rate_change_invalidates_only_train(project):
    """Only train's params changed (not the pilot's); the real cascade to evaluate/register is the next
    test's `dvc exp run`, which must re-run exactly train -> evaluate -> register."""
    root, _ = project
    params = (root / "params.yaml").read_text()
    try:
        _set_params(root, "train", "learning_rate", 0.0005)
        status = json.loads(run([str(BIN / "dvc"), "status", "--json"], root).stdout)
        assert list(status) == ["train"]
        assert status["train"] == [{"changed deps": {"params.yaml": {"train": "modified"}}}]
    finally:
        (root / "params.yaml").write_text(params)


def test_experiment_run_with_a_set_param(project):
    root, _ = project
    p = run([str(BIN / "dvc"), "exp", "run", "-S", "train.learning_rate=0.002"], root, timeout=1200)
    assert _ran(p.stdout) == ["train", "evaluate", "register"]
    show = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], root).stdout)
    assert "0.002" in json.dumps(show)
    # The experiment registered a second version; the champion moves only if it beat version 1.
    client = _client(root)
    versions = client.search_model_versions("name='vlgrpo-dvc-test'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert _aliases(client)["candidate"] == "2"


def test_failed_stage_leaves_outputs_and_registry_untouched(project):
    """train.max_prompt_tokens is the one prompt-length limit: the data stage's row checks (the same checks as
    validate's) drop prompts over it, so dvc re-runs `data` first; with every prompt too long it fails, and
    nothing after it runs or changes."""
    root, _ = project
    client = _client(root)
    before_models = {d: _md5_tree(root / "models" / d) for d in ("base", "candidate")}
    before_manifest = (root / "data" / "manifest.jsonl").read_bytes()
    stages = ("validate", "train", "evaluate", "register")
    before_reports = {s: (root / "reports" / f"{s}.json").read_bytes() for s in stages}
    before_versions = sorted(str(v.version) for v in client.search_model_versions("name='vlgrpo-dvc-test'"))
    before_aliases = _aliases(client)
    params = (root / "params.yaml").read_text()
    try:
        _set_params(root, "train", "max_prompt_tokens", 10)  # every prompt is now too long
        p = run([str(BIN / "vlgrpo"), "repro"], root, check=False)
    finally:
        (root / "params.yaml").write_text(params)
    out = p.stderr + p.stdout
    assert p.returncode != 0
    assert "no valid rows" in out and "train.max_prompt_tokens=10" in out, out[-3000:]
    assert _ran(p.stdout) == ["data"]
    assert (root / "data" / "manifest.jsonl").read_bytes() == before_manifest
    assert "Traceback" not in out  # invalid data is an expected failure, not a crash
    assert {d: _md5_tree(root / "models" / d) for d in ("base", "candidate")} == before_models
    assert {s: (root / "reports" / f"{s}.json").read_bytes() for s in stages} == before_reports
    assert sorted(str(v.version) for v in client.search_model_versions("name='vlgrpo-dvc-test'")) == before_versions
    assert _aliases(client) == before_aliases
    # The pipeline's parent run is marked FAILED.
    runs = client.search_runs([client.get_experiment_by_name("vlgrpo").experiment_id],
                              "tags.`vlgrpo.stage` = 'pipeline'", order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FAILED"
