"""Numerical faults and failing rewards.

* A reward plugin that turns NaN at step 3, run through the real `vlgrpo pipeline`: the run stops with an
  error naming the step and the reward, the last good checkpoint (step-2) stays loadable, no candidate
  model is published, evaluate and register never run and nothing is registered in MLflow.
* A reward that raises: the error names the reward and the item; with ``rewards.on_error: skip`` the item
  scores None and training goes on to the end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.project import run
from tests.reliability.conftest import VLGRPO, update_params
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.checkpoint import STATE_FILE, latest_checkpoint
from vlgrpo.train.data_order import step_prompt_indices

pytestmark = pytest.mark.reliability

NAN_PLUGIN = '''
from vlgrpo.rewards import register

CALLS = [0]

@register("rel_nan_at_step3")
def rel_nan_at_step3(prompts, completions, **columns):
    # One call per GRPO step in the train stage: steps 1-2 score normally, step 3 yields NaN.
    CALLS[0] += 1
    return [float("nan") if CALLS[0] == 3 else 0.5 for _ in completions]
'''

FRAGILE_PLUGIN = '''
from vlgrpo.rewards import register

@register("rel_fragile")
def rel_fragile(prompts, completions, task, **columns):
    # Cannot score counting questions (e.g. a parser that breaks on them); scores the rest.
    if any(t == "count" for t in task):
        raise ValueError("cannot parse a count answer")
    return [1.0 if c else 0.0 for c in completions]
'''


def test_nan_reward_stops_pipeline_keeps_checkpoint_registers_nothing(project, cli_env):
    (project / "nan_plugin.py").write_text(NAN_PLUGIN)
    update_params(project, rewards={"weights": {"accuracy": 1.0, "rel_nan_at_step3": 0.5},
                                    "plugins": ["nan_plugin.py"]})
    p = run([VLGRPO, "pipeline", "--force-train"], project, timeout=900, check=False, **cli_env)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "step 3: reward 'rel_nan_at_step3' returned nan for item syn-train-" in out, out[-3000:]

    # The last good checkpoint stays and loads; nothing after it was published.
    candidate = project / "models/candidate"
    assert latest_checkpoint(candidate).name == "step-2"
    state = json.loads((candidate / "checkpoints/step-2" / STATE_FILE).read_text())
    assert state["step"] == 2
    assert not (candidate / "model.safetensors").exists()
    for stage in ("train", "evaluate", "register"):
        assert not (project / f"reports/{stage}.json").exists(), stage
    steps = [json.loads(x)["step"] for x in (project / "reports/train_metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    # MLflow: the pipeline and train runs are FAILED; the registry is empty.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("vlgrpo").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["pipeline"] == "FAILED" and status["train"] == "FAILED", status
    assert "evaluate" not in status and "register" not in status
    assert client.search_registered_models() == []


def _first_failing_item(root: Path) -> tuple[int, str]:
    """(step, item id) of the first counting question the trainer meets, in its own prompt order."""
    from vlgrpo.config import load_config
    from vlgrpo.data.manifest import read_manifest

    cfg = load_config(root / "params.yaml")
    items = read_manifest(root / "data/manifest.jsonl", split="train")
    for step in range(cfg.train.max_steps):
        for i in step_prompt_indices(step, cfg.train.prompts_per_step, len(items), cfg.train.seed):
            if items[i].task == "count":
                return step + 1, items[i].id
    raise AssertionError("no counting question in the run: the test would prove nothing")


def _train(root: Path, out: str) -> dict:
    from vlgrpo.config import load_config

    cfg = load_config(root / "params.yaml")
    return train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", out,
                        f"reports/{Path(out).name}.jsonl"), progress=False)


@pytest.fixture(scope="module")
def fragile_plugin(tmp_path_factory) -> Path:
    # One file for every test in this process: the registry refuses a second function under the same name.
    plugin = tmp_path_factory.mktemp("plugins") / "fragile_plugin.py"
    plugin.write_text(FRAGILE_PLUGIN)
    return plugin


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_raising_reward_names_reward_and_item_or_is_skipped(project, fragile_plugin, on_error):
    plugin = fragile_plugin
    update_params(project, rewards={"weights": {"accuracy": 1.0, "rel_fragile": 1.0}, "plugins": [str(plugin)],
                                    "on_error": on_error})
    step, item = _first_failing_item(project)
    if on_error == "raise":
        with pytest.raises(TrainingError) as e:
            _train(project, "models/fragile")
        assert str(e.value).startswith(f"step {step}: reward 'rel_fragile' failed on item {item}: "
                                       f"ValueError: cannot parse a count answer"), str(e.value)
        assert not (project / "models/fragile/model.safetensors").exists()
        return
    s = _train(project, "models/fragile")
    assert s["finished"] and s["steps"] == 4
    rows = [json.loads(x) for x in (project / "reports/fragile.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # The step with the counting question still has a finite rel_fragile mean over the items it could score.
    from vlgrpo.config import load_config
    from vlgrpo.data.manifest import read_manifest

    cfg = load_config(project / "params.yaml")
    items = read_manifest(project / "data/manifest.jsonl", split="train")
    mixed = [s for s in range(4) if {items[i].task == "count" for i in
                                     step_prompt_indices(s, cfg.train.prompts_per_step, len(items), 0)}
             == {True, False}]
    assert mixed, "no step mixes counting and other questions: the test would prove nothing"
    for s in mixed:
        v = rows[s]["rewards/rel_fragile/mean"]
        assert isinstance(v, float) and math.isfinite(v), v          # not None, and not NaN either
    assert (project / "models/fragile/model.safetensors").exists()


@pytest.mark.parametrize("fault", ["loss", "grad_norm"])
def test_non_finite_loss_or_grad_norm_stops_the_run_before_the_optimizer_steps(project, fault):
    """A NaN/inf loss or gradient norm at step 2 (injected into the real policy: NaN hidden states at the
    head's input in the training forward, or an inf gradient) stops the run with an error naming the step and the quantity; the optimizer
    never steps on it (the weights are still step-1's), step-1's checkpoint and metrics row stay, and no
    model is published."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from vlgrpo.config import load_config
    from vlgrpo.train.loop import train
    from vlgrpo.train.setup import setup

    cfg = load_config(project / "params.yaml")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3, save_steps=1))
    paths = RunPaths.under(project, "data/manifest.jsonl", "models/base", "models/faulty", "reports/faulty.jsonl")
    run_ = setup(cfg, paths)
    step_one_logged = paths.metrics_path.exists     # the fault hits from step 2 on
    if fault == "loss":
        # the training forward feeds the final norm's output (the head's input) to the chunked head +
        # log-softmax (vlgrpo.algo.logprobs), so NaN there makes every completion logit NaN
        def nan_hidden(module, _inputs, hidden):
            return hidden * float("nan") if module.training and step_one_logged() else hidden
        run_.policy.model.language_model.norm.register_forward_hook(nan_hidden)
    else:
        run_.policy.lm_head.weight.register_hook(lambda g: g * float("inf") if step_one_logged() else g)
    with pytest.raises(TrainingError, match=rf"^step 2: {fault} is (nan|inf) \(not finite\)"):
        train(run_, progress=False)
    assert [json.loads(x)["step"] for x in paths.metrics_path.read_text().splitlines()] == [1]
    assert latest_checkpoint(paths.out_dir).name == "step-1"
    saved = load_file(paths.out_dir / "checkpoints/step-1/model.safetensors")
    weights = run_.policy.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    assert not (paths.out_dir / "model.safetensors").exists()
