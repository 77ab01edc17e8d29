"""params.yaml, the config classes and dvc.yaml's `params:` lists cannot drift apart.

* every key of the config is documented on its class (field by field) and present in params.yaml;
* every entry of a stage's `params:` in dvc.yaml names a config section or key that exists;
* every key a stage reads is listed under that stage's `params:` (else `dvc repro` would not re-run the stage
  when it changes). What a stage reads is *recorded*: each stage's core calls (the ones its flow makes) run
  on a tiny project with the config classes reporting every field read outside config.py / dataclasses.
* no key is dead: each is read somewhere outside config.py.
* the register stage (MLflow calls only, nothing to record on a tiny project) lists every ``cfg.<section>.<key>``
  its flow and task modules name.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import yaml

from vlgrpo import config as C

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {C.DataConfig: "data", C.SyntheticConfig: "data.synthetic", C.ValidateConfig: "validate",
            C.BaseConfig: "base", C.TinyModelConfig: "base.tiny", C.RewardsConfig: "rewards",
            C.PilotConfig: "pilot", C.TrainConfig: "train", C.LoraConfig: "train.lora", C.LaunchConfig: "train.launch",
            C.EvaluateConfig: "evaluate", C.RegisterConfig: "register"}
# Paths a flow builds from these keys are the stage's deps / outs in dvc.yaml (tracked as files there).
PATH_KEYS = {"data.out_dir", "base.out_dir", "train.out_dir"}
# Deliberate: the pilot probes the full run's settings, not its length, output or learning rate (its
# remedies are relative, so a lower rate later is what they apply to); pilot.overrides sets max_steps/subset.
NOT_PILOT_DEPS = {"train.max_steps", "train.learning_rate", "train.save_steps", "train.subset",
                  # which checkpoints stay on disk changes no result
                  "train.save_total_limit", "train.keep_best_checkpoint"}
# Keys the flows themselves read (the core calls below do not see them).
FLOW_READS = {"train": {"pilot.auto_adjust"}, "evaluate": {"register.model_name"}}


def _keys(cls, prefix: str):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name in ("synthetic", "tiny", "lora", "launch"):   # sections
            continue
        yield f"{prefix}.{f.name}", f.name, cls


def all_keys():
    return [k for cls, prefix in SECTIONS.items() for k in _keys(cls, prefix)]


def test_every_key_is_documented_on_its_class_and_in_params_yaml():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, name, cls in all_keys():
        assert re.search(rf"\b{name}\b", cls.__doc__ or ""), f"{dotted}: not documented on {cls.__name__}"
        node = raw
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"{dotted}: missing from params.yaml"
            node = node[part]


def test_no_key_is_dead():
    code = "\n".join(p.read_text() for d in ("vlgrpo", "tasks", "flows") for p in (REPO / d).rglob("*.py")
                     if p.name != "config.py")
    dead = [dotted for dotted, name, _ in all_keys() if not re.search(rf"\.{name}\b", code)]
    assert not dead, f"keys never read outside config.py: {dead}"


def _dvc_params() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [p for p in st.get("params", []) if isinstance(p, str)] for name, st in stages.items()}


def _exists(dotted: str) -> bool:
    node = C.Config()
    for part in dotted.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        else:
            return False
    return True


def test_every_dvc_params_entry_exists():
    for stage, entries in _dvc_params().items():
        for e in entries:
            assert _exists(e), f"dvc.yaml stage {stage!r} lists {e!r}, which is not a config key"


def _covered(key: str, entries: list[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    """stage -> the config keys its core calls read, on a tiny project."""
    from vlgrpo.train.warm_start import run_base
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.eval.evaluate import evaluate_models, mean_sampled_reward
    from vlgrpo.eval.gates import pilot_passed
    from vlgrpo.model.loading import load_model
    from vlgrpo.eval.report import write_evaluation_outputs
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths
    from vlgrpo.data.validation import validate_file

    root = tmp_path_factory.mktemp("drift")
    cfg = C.config_from_dict({
        "data": {"num_train": 8, "num_val": 4, "num_test": 4},
        "validate": {"data_docs": False},
        "base": {"warmup_steps": 1, "batch_size": 4},
        "pilot": {"overrides": {"max_steps": 1}},
        "train": {"max_steps": 1, "prompts_per_step": 2, "num_generations": 2, "micro_batch_size": 2,
                  "max_completion_length": 2, "mixed_precision": "no", "beta": 0.04},
        "evaluate": {"bootstrap": 100, "batch_size": 4, "samples_k": 2, "max_items": 4}})
    manifest = root / "data/manifest.jsonl"
    log: set[str] = set()
    stage_runs = {
        "data": lambda: build_dataset(cfg, root),
        "validate": lambda: validate_file(manifest, cfg, root / "reports/validate.json"),
        "base": lambda: run_base(cfg, root, manifest, progress=False),
        "pilot": lambda: _pilot(cfg, root, manifest, train_grpo, RunPaths, pilot_passed, mean_sampled_reward,
                                load_model, read_manifest),
        "train": lambda: train_grpo(cfg, RunPaths.under(root, manifest, cfg.base.out_dir, cfg.train.out_dir,
                                                        "reports/train_metrics.jsonl"), progress=False),
        "evaluate": lambda: write_evaluation_outputs(
            evaluate_models(cfg, manifest, {"base": lambda: load_model(root / "models/base"),
                                            "candidate": lambda: load_model(root / "models/candidate")},
                            progress=False, root=root), root, manifest, n_samples=cfg.evaluate.report_samples),
    }
    out = {}
    with _recording(log):
        for stage, call in stage_runs.items():
            log.clear()
            call()
            out[stage] = set(log)
    return out


def _pilot(cfg, root, manifest, train_grpo, RunPaths, pilot_passed, mean_sampled_reward, load_model,
           read_manifest):
    """The pilot flow's core calls: the pilot run, the val reward of its policy, the gate."""
    import json

    pilot_cfg = cfg.pilot.train_config(cfg.train)
    paths = RunPaths.under(root, manifest, cfg.base.out_dir, "pilot-model", "reports/pilot_metrics.jsonl")
    train_grpo(dataclasses.replace(cfg, train=pilot_cfg), paths, progress=False)
    from vlgrpo.eval.evaluate import reward_names
    from vlgrpo.rewards import RewardContext, setup_rewards

    model, proc = load_model(paths.out_dir)
    run_cfg = dataclasses.replace(cfg, train=pilot_cfg)
    rewards = setup_rewards(reward_names(run_cfg), RewardContext.from_config(run_cfg, root, manifest.parent))
    val = mean_sampled_reward(model, proc, read_manifest(manifest, split="val")[:2], manifest.parent, run_cfg,
                              rewards=rewards)
    rows = [json.loads(x) for x in paths.metrics_path.read_text().splitlines()]
    pilot_passed(rows, cfg.pilot, cfg.train, full_steps=cfg.train.max_steps, val_reward=val,
                 reward_weights=cfg.rewards.weights)


class _recording:
    """Make every config section report ``section.field`` reads made outside config.py and dataclasses."""

    def __init__(self, log: set[str]):
        self.log = log

    def __enter__(self):
        log = self.log
        for cls, prefix in SECTIONS.items():
            names = {f.name for f in dataclasses.fields(cls)}

            def getattribute(obj, name, _prefix=prefix, _names=names):
                if name in _names:
                    caller = sys._getframe(1).f_code.co_filename
                    if not caller.endswith(("config.py", "dataclasses.py")):
                        log.add(f"{_prefix}.{name}")
                return object.__getattribute__(obj, name)

            cls.__getattribute__ = getattribute
        return self

    def __exit__(self, *exc):
        for cls in SECTIONS:
            del cls.__getattribute__


@pytest.mark.parametrize("stage", ["data", "validate", "base", "pilot", "train", "evaluate"])
def test_every_key_a_stage_reads_is_listed_under_its_dvc_params(reads, stage):
    listed = _dvc_params()[stage]
    read = (reads[stage] | FLOW_READS.get(stage, set())) - PATH_KEYS
    if stage == "pilot":
        read -= NOT_PILOT_DEPS
    missing = sorted(k for k in read if not _covered(k, listed))
    assert not missing, f"dvc.yaml stage {stage!r} reads {missing} but does not list them under params:"
    assert read, "nothing recorded: the test would prove nothing"


REGISTER_MODULES = ("flows/register.py", "tasks/register.py")


def test_every_key_the_register_stage_names_is_listed_under_its_dvc_params():
    named = {m for p in REGISTER_MODULES
             for m in re.findall(r"\bcfg\.([a-z_]+\.[a-z_]+)\b", (REPO / p).read_text())}
    named = {k for k in named if _exists(k)} - PATH_KEYS
    assert {"register.model_name", "data.min_pixels"} <= named, named     # the scan sees the task's reads
    missing = sorted(k for k in named if not _covered(k, _dvc_params()["register"]))
    assert not missing, f"dvc.yaml stage 'register' reads {missing} but does not list them under params:"
