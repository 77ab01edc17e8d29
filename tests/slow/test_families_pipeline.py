"""All seven stages for every Qwen-VL family, each loaded only through ``base.model: <path>``.

The checkpoints come from tests/families.py (real config classes, hub on-disk layout). One tiny project per
family (3 GRPO steps), all six pipelines in ONE process so the Prefect / MLflow start-up is paid once.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.families import FAMILIES, build_family
from tests.project import make_project, project_env
from tests.settings import tuned_data

pytestmark = pytest.mark.slow
STAGES = ["data", "validate", "base", "pilot", "train", "evaluate", "register"]

# Each project starts from the environment a fresh process would have. (mlflow.set_tracking_uri exports the
# URI to MLFLOW_TRACKING_URI, which once made later projects log into the first one's store; tasks.tracking
# now undoes that export - tests/unit/test_tracking_uri.py - and this keeps the driver independent of it.)
DRIVER = """
import os, sys
from flows.pipeline import pipeline_flow
for params in sys.argv[1:]:
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(k, None)
    print("PIPELINE", params, pipeline_flow(params), flush=True)
"""


def test_every_family_runs_data_to_register_from_a_checkpoint_path(tmp_path):
    from mlflow.tracking import MlflowClient

    from vlgrpo.data.synthetic import generate

    texts = [t for it, _ in generate(tuned_data(num_train=64, num_val=0, num_test=0))
             for t in (it.question, it.solution)]
    ckpts, roots = {}, {}
    for fam in FAMILIES:
        ckpts[fam] = build_family(fam, texts, tmp_path / "checkpoints" / fam)
        roots[fam] = make_project(tmp_path / f"proj_{fam}", params={"base": {"model": str(ckpts[fam])}},
                                  model_name=f"fam-{fam}")
    p = subprocess.run([sys.executable, "-c", DRIVER, *(str(r / "params.yaml") for r in roots.values())],
                       cwd=tmp_path, env=project_env(tmp_path), capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    for fam, root in roots.items():
        rep = {s: json.loads((root / "reports" / f"{s}.json").read_text()) for s in STAGES}
        assert rep["base"]["model"] == str(ckpts[fam]) and rep["base"]["steps"] == 0   # loaded, not built
        assert rep["validate"]["ok"] and rep["validate"]["tokenizer"] == str(ckpts[fam])
        assert rep["train"]["finished"] and rep["train"]["steps"] == 3
        assert json.loads((root / "models/candidate/config.json").read_text())["model_type"] == fam
        assert rep["evaluate"]["n_items"] == 12 and "accuracy" in rep["evaluate"]["candidate"]
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mv = client.get_model_version_by_alias(f"fam-{fam}", "candidate")
        assert rep["register"]["version"] == str(mv.version) == "1" and mv.status == "READY"
