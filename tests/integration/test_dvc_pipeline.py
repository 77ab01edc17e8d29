"""The whole pipeline through `dvc repro` in a fresh project: stages, MLflow runs, registry, caching, failure.

One real project (git + DVC, tiny params) is driven through the life a user gives it:
first run → what it looks like in the Prefect and MLflow UIs (real servers, headless Chromium) → push/pull in
a fresh clone → no-op repro → a learning-rate change re-runs only what depends on it → an experiment → a stage
that fails on a changed limit must leave outputs and the registry untouched.
"""
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.browser import Shots, artifacts_folder, chromium, images_loaded
from tests.project import BIN, make_project, run
from tests.servers import mlflow_server, prefect_server

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
    assert len(train.data.tags["mlflow.source.git.commit"]) == 40 and train.data.tags["data_md5"] != "unknown"
    history = client.get_metric_history(train.info.run_id, "reward")
    assert [m.step for m in history] == [1, 2, 3]  # every step forwarded, none twice


def test_first_run_prints_no_warning(project):
    # Users read a warning as a problem: a default run prints none that they cannot act on (DVC's "is empty"
    # for a dependency file, MLflow's type-hint notes, library deprecations in our own calls).
    _, p = project
    warned = [line for line in (p.stdout + p.stderr).splitlines() if "warning" in line.lower()]
    assert warned == [], "\n".join(warned[:20])


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact file path of the run (recursively)."""
    out = set()
    for f in client.list_artifacts(run_id, path or None):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_mlflow_shows_the_execution_report_and_registered_model(project, tmp_path):
    """What a user opens in the MLflow UI after the first run, read through MLflow's API."""
    import re

    import mlflow

    from tasks.registry import model_id_of

    root, _ = project
    client = _client(root)
    exp = client.get_experiment_by_name("vlgrpo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"   # the classic runs view
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("vlgrpo.stage") == "pipeline")
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    evaluation = json.loads((root / "reports/evaluate.json").read_text())

    # The parent run: every param, the headline results of the execution, the stages, the report.
    assert parent.data.params["train.learning_rate"] == "0.001" and parent.data.params["data.num_train"] == "32"
    m = parent.data.metrics
    assert m["test.candidate.accuracy"] == evaluation["candidate"]["accuracy"]
    assert m["test.base.accuracy"] == evaluation["base"]["accuracy"] and m["decision.promote"] == 1.0
    assert parent.data.tags["vlgrpo.decision"].startswith("promote")
    assert parent.data.tags["vlgrpo.registered_model"] == "models:/vlgrpo-dvc-test/1"
    assert parent.data.tags["vlgrpo.stages_run"].split(",") == STAGES
    assert "reports/evaluate.html" in _artifacts(client, parent.info.run_id)

    # Stage runs: MLflow's commit tag, their own params only, summaries without one-point curves.
    for r in [parent, *stages.values()]:
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40, r.info.run_name
    assert "train.learning_rate" not in stages["data"].data.params and "data.num_train" in stages["data"].data.params
    assert "data.num_train" not in stages["train"].data.params
    # (MLflow adds the pyfunc's model_config, min_pixels / max_pixels, to the run that logs the model)
    own = {k for k in stages["register"].data.params if "." in k}
    assert own and own < set(parent.data.params) and not any(k.startswith("train.") for k in own)
    train_metrics = stages["train"].data.metrics
    assert not any(k.startswith("final.") for k in train_metrics) and train_metrics["steps"] == 3.0
    assert "watch" in json.loads((root / "reports/train.json").read_text())
    assert train_metrics["watch.flagged"] in (0.0, 1.0)

    # The evaluate run: the HTML report with its pictures inside, the markdown whose image links resolve
    # among the run's artifacts, and the samples as a table.
    ev = stages["evaluate"].info.run_id
    files = _artifacts(client, ev)
    assert {"reports/evaluate.html", "reports/evaluate.md", "plots/train_curve.png",
            "evaluation/samples.json"} <= files
    md = Path(client.download_artifacts(ev, "reports/evaluate.md", str(tmp_path))).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert any(link.startswith("evaluate_assets/") for link in links)
    for link in links:
        assert str(Path("reports", link)).replace("reports/../", "") in files, link
    page = Path(client.download_artifacts(ev, "reports/evaluate.html", str(tmp_path))).read_text()
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == len(links) and all(s.startswith("data:image/png;base64,") for s in srcs)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    table = client.load_table(exp.experiment_id, "evaluation/samples.json", run_ids=[ev])
    assert len(table) == evaluation["n_items"]
    assert {"image", "question", "reference", "base_answer", "candidate_answer"} <= set(table.columns)

    # The validate run holds the Great Expectations data docs.
    assert "data_docs/index.html" in _artifacts(client, stages["validate"].info.run_id)

    # The registered version, as MLflow 3 shows a registered model: linked to its logged model (signature,
    # example), sourced from the train run (which lists the model), described, with the test metrics.
    mv = client.get_model_version("vlgrpo-dvc-test", "1")
    assert mv.run_id == stages["train"].info.run_id
    assert mv.tags["vlgrpo.register_run_id"] == stages["register"].info.run_id
    accuracy = evaluation["candidate"]["accuracy"]
    assert mv.tags["evaluate.test_accuracy"] == f"{accuracy:.6g}"
    assert f"Test accuracy: {accuracy:.3f}" in mv.description and "Decision: promote" in mv.description
    model_id = model_id_of(mv)
    logged = client.get_logged_model(model_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "vlgrpo-dvc-test", "version": "1"}]
    assert {x.key: x.value for x in logged.metrics}["test_accuracy"] == accuracy
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.signature is not None and info.saved_input_example_info is not None
    outputs = client.get_run(stages["train"].info.run_id).outputs
    assert model_id in {o.model_id for o in outputs.model_outputs}


# ------------------------------------------------------------------ the first run as the two UIs show it


@pytest.fixture(scope="module")
def ui_servers(project, tmp_path_factory):
    """The MLflow UI on the project's store and the Prefect UI on the database the run's temporary server
    wrote to: what a user opens after `vlgrpo repro` (`vlgrpo where` names both)."""
    root, _ = project
    tmp = tmp_path_factory.mktemp("uis")
    with mlflow_server(tmp, f"sqlite:///{root / 'mlflow.db'}") as ml, \
            prefect_server(tmp, ui=True, home=root.parent / "prefect-home") as pf:
        yield ml.url, pf.url


def _api(url: str, path: str, body: dict | None = None):
    import urllib.request

    req = urllib.request.Request(f"{url}/{path}", data=json.dumps(body or {}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _prefect_tree(api: str) -> tuple[dict, list[dict]]:
    """The `pipeline @ <commit>` flow run of the first repro and the flow runs of its stages (via the
    tracking task runs in the parent, as the UI finds them)."""
    parents = _api(api, "flow_runs/filter", {"flow_runs": {"name": {"like_": "pipeline @ "}}})
    assert len(parents) == 1, [p["name"] for p in parents]
    parent = parents[0]
    trackers = _api(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [parent["id"]]}}})
    child_ids = [t["state"]["state_details"]["child_flow_run_id"] for t in trackers]
    children = _api(api, "flow_runs/filter", {"flow_runs": {"id": {"any_": [c for c in child_ids if c]}}})
    return parent, children


def test_prefect_one_pipeline_run_with_its_stages_and_links_to_mlflow(project, ui_servers):
    root, _ = project
    _, api = ui_servers
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    parent, children = _prefect_tree(api)
    assert parent["name"] == f"pipeline @ {commit}" and parent["state_type"] == "COMPLETED"
    assert sorted(c["name"] for c in children) == sorted(f"{s} @ {commit}" for s in STAGES)
    assert all(c["parent_task_run_id"] and c["state_type"] == "COMPLETED" for c in children)
    assert all({"vlgrpo", f"commit:{commit}"} <= set(r["tags"]) for r in [parent, *children])

    # Both ways: each MLflow run names its Prefect flow run, each flow run links to its MLflow run.
    client = _client(root)
    exp = client.get_experiment_by_name("vlgrpo")
    mlruns = {r.data.tags["prefect.flow_run_id"]: r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("prefect.flow_run_id")}
    by_id = {r["id"]: r for r in [parent, *children]}
    assert set(mlruns) == set(by_id)
    artifacts = _api(api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": list(by_id)}}})
    links = {a["flow_run_id"]: a["data"] for a in artifacts if a["key"] == "mlflow-run"}
    for fr_id, mlrun in mlruns.items():
        assert mlrun.info.run_name == by_id[fr_id]["name"].split(" @ ")[0]
        assert mlrun.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{fr_id}")
        assert f"/#/experiments/{exp.experiment_id}/runs/{mlrun.info.run_id})" in links[fr_id], fr_id

    # The stages' result artifacts carry their numbers, read from the stage reports.
    by_key = {a["key"]: a for a in artifacts}
    validation = json.loads((root / "reports" / "validate.json").read_text())
    passed = sum(e["success"] for e in validation["expectations"])
    summary = {r["what"]: r["value"] for r in json.loads(by_key["validation-summary"]["data"])}
    assert summary["rows checked"] == validation["rows"] and summary["valid rows"] == validation["valid_rows"]
    assert summary["expectations passed"] == f"{passed}/{len(validation['expectations'])}"
    assert f"| expectations passed | {passed}/{len(validation['expectations'])} |" in by_key["validate-result"]["data"]
    assert "validate_docs/index.html" in by_key["validate-result"]["data"]
    steps = [json.loads(line) for line in (root / "reports" / "train_metrics.jsonl").read_text().splitlines()]
    table = {r["metric"]: r for r in json.loads(by_key["train-metrics"]["data"])}
    assert table["reward"]["steps"] == len(steps) and table["reward"]["last"] == pytest.approx(steps[-1]["reward"])
    data = json.loads((root / "reports" / "data.json").read_text())
    assert f"| rows | {data['rows']} |" in by_key["data-result"]["data"]
    assert "| val accuracy |" in by_key["base-result"]["data"]
    assert "| model | models:/vlgrpo-dvc-test/1 |" in by_key["register-result"]["data"]
    assert by_key["mlflow-model-version"]["data"].endswith("/#/models/vlgrpo-dvc-test/versions/1)")
    assert f"| stages run | {', '.join(STAGES)} |" in by_key["pipeline-result"]["data"]


@pytest.fixture(scope="module")
def browser(ui_servers):
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return Shots(artifacts_folder(tmp_path_factory))


@pytest.fixture
def page(browser, shots, request):
    """A fresh page; when the test fails, the page as it was is kept as ``FAILED-<test>.png``."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        shots.keep(pg, f"FAILED-{request.node.name}")
    pg.close()


def test_browser_prefect_pipeline_run_lists_its_stages(project, ui_servers, page, shots):
    _, api = ui_servers
    parent, _ = _prefect_tree(api)
    page.goto(f"{api.removesuffix('/api')}/runs/flow-run/{parent['id']}")
    page.get_by_text("Subflow Runs", exact=True).first.click()
    for stage in STAGES:  # each stage's run, by name, in the parent's list of subflow runs
        page.get_by_text(parent["name"].replace("pipeline", stage), exact=True).first.wait_for(timeout=60_000)
    assert page.get_by_text("7 Flow runs").count() == 1
    shots.keep(page, "prefect-pipeline-run")


def _run_of(root: Path, stage: str):
    client = _client(root)
    exp = client.get_experiment_by_name("vlgrpo")
    return next(r for r in client.search_runs([exp.experiment_id], f"tags.`vlgrpo.stage` = '{stage}'"))


def test_browser_mlflow_registered_model_shows_version_and_aliases(project, ui_servers, page, shots):
    ml, _ = ui_servers
    page.goto(f"{ml}/#/models/vlgrpo-dvc-test")
    page.get_by_text("Version 1", exact=True).first.wait_for(timeout=60_000)
    for alias in ("@ champion", "@ candidate"):
        assert page.get_by_text(alias, exact=True).count() >= 1, alias
    shots.keep(page, "mlflow-registered-model")


def test_browser_mlflow_evaluate_plots_load(project, ui_servers, page, shots):
    root, _ = project
    ml, _ = ui_servers
    ev = _run_of(root, "evaluate")
    page.goto(f"{ml}/#/experiments/{ev.info.experiment_id}/runs/{ev.info.run_id}/artifacts/plots/train_curve.png")
    page.locator("img[src^='blob:']").first.wait_for(timeout=60_000)
    page.wait_for_function("Array.from(document.querySelectorAll(\"img[src^='blob:']\"))"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
    shots.keep(page, "mlflow-evaluate-plot")


def _html_report_loads(page, shots, ml: str, run, name: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"{ml}")
    html = [a.path for d in ("", "reports") for a in client.list_artifacts(run.info.run_id, d or None)
            if a.path.endswith(".html")]
    assert html, f"no HTML report among the {run.info.run_name} run's artifacts"
    page.goto(f"{ml}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/{html[0]}")
    page.locator("iframe").first.wait_for(timeout=60_000)
    frame = page.frames[-1]
    frame.wait_for_load_state()
    ok, bad = images_loaded(frame)
    shot = shots.keep(page, name)
    assert ok >= 1 and not bad, f"{ok} pictures loaded, not loaded: {bad} (screenshot {shot})"


def test_browser_mlflow_html_report_shows_its_pictures(project, ui_servers, page, shots):
    root, _ = project
    ml, _ = ui_servers
    _html_report_loads(page, shots, ml, _run_of(root, "evaluate"), "mlflow-evaluate-report")
    _html_report_loads(page, shots, ml, _run_of(root, "pipeline"), "mlflow-pipeline-report")


def test_browser_mlflow_logged_model_page_shows_the_registered_version(project, ui_servers, page, shots):
    root, _ = project
    ml, _ = ui_servers
    client = _client(root)
    exp = client.get_experiment_by_name("vlgrpo")
    mv = client.get_model_version("vlgrpo-dvc-test", "1")
    model_id = getattr(mv, "model_id", None) or mv.source.removeprefix("models:/")
    page.goto(f"{ml}/#/experiments/{exp.experiment_id}/models/{model_id}")
    page.get_by_text("Overview", exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(3000)  # the registered versions arrive in a second request
    shot = shots.keep(page, "mlflow-logged-model")
    assert page.get_by_text("Not registered", exact=True).count() == 0, f"model page says Not registered ({shot})"
    assert page.locator("a[href*='/models/vlgrpo-dvc-test/versions/1']").count() >= 1, shot


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
