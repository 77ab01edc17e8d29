"""A reward sees the same arguments in a training step, the pilot's val reward, in-training evaluation and the
evaluate stage: the same names, the same prompt representation, the same columns of an item, token ids that
belong to the completion."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from tests.tiny_setup import tiny_project, tiny_train_cfg
from vlgrpo.data.manifest import read_manifest, write_manifest
from vlgrpo.eval.evaluate import evaluate_models
from vlgrpo.model.loading import load_model
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths

# Takes an extra manifest column ("answer") by name, like a TRL reward; writes every call down.
RECORDER = textwrap.dedent('''
    import json
    from pathlib import Path

    LOG = Path(__file__).with_name("calls.jsonl")

    def recorder(completions, answer, prompts, completion_ids, trainer_state, **columns):
        with open(LOG, "a", encoding="utf-8") as f:
            for i, c in enumerate(completions):
                f.write(json.dumps({"prompt": prompts[i], "completion": c, "answer": answer[i],
                                    "ids": completion_ids[i], "step": trainer_state.global_step,
                                    "names": sorted(["completions", "answer", "prompts", "completion_ids",
                                                     "trainer_state", *columns]),
                                    "columns": {k: v[i] for k, v in columns.items()}}) + "\\n")
        return [0.5] * len(completions)
''')


def calls(root, start):
    lines = (root / "calls.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[start:]], len(lines)


@pytest.mark.slow        # one GRPO step with evaluation, a pilot val reward and an evaluate stage: ~40 s
def test_a_reward_sees_the_same_inputs_in_training_pilot_in_training_eval_and_evaluate(tmp_path):
    from tasks.grpo import val_reward_task

    cfg = tiny_train_cfg(tmp_path, {"recorder": 1.0}, num_val=2, max_steps=1, eval_steps=1)
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, bootstrap=100))
    root = tiny_project(tmp_path, cfg, RECORDER)
    manifest = root / "data/manifest.jsonl"
    items = read_manifest(manifest)
    for it in items:
        it.extra["answer"] = it.solution
    write_manifest(manifest, items)
    by_id = {it.id: it for it in items}

    train_grpo(cfg, RunPaths.under(root, "data/manifest.jsonl", "models/base", "out/run", "reports/run.jsonl"),
               progress=False)
    got, n = calls(root, 0)
    train = [c for c in got if by_id[c["columns"]["id"]].split == "train"]
    in_training_eval = [c for c in got if by_id[c["columns"]["id"]].split == "val"]
    val_reward_task.fn(cfg, root, manifest, root / "out/run", max_items=2)
    pilot, n = calls(root, n)
    loader = lambda: load_model(root / "out/run")  # noqa: E731
    evaluate_models(cfg, manifest, {"base": loader, "candidate": loader}, progress=False, root=root)
    evaluate, _ = calls(root, n)

    phases = {"train": train, "in-training eval": in_training_eval, "pilot val": pilot, "evaluate": evaluate}
    assert all(phases.values()), {k: len(v) for k, v in phases.items()}
    names = {k: {tuple(c["names"]) for c in v} for k, v in phases.items()}
    assert len(set().union(*names.values())) == 1, names
    for phase, records in phases.items():
        for c in records:
            it = by_id[c["columns"]["id"]]
            assert c["prompt"] == it.text, phase                       # one prompt representation everywhere
            assert c["answer"] == it.solution, phase                   # the extra column, by name
            expected = {k: v for k, v in it.columns().items() if k != "answer"}
            expected.update(terminated=c["columns"]["terminated"], completion_length=len(c["ids"]))
            assert c["columns"] == json.loads(json.dumps(expected)), phase
            assert c["ids"] and all(isinstance(t, int) for t in c["ids"]), phase
    # the same val item in the pilot's val reward and in in-training evaluation: the same item arguments
    strip = lambda c: {"prompt": c["prompt"], "answer": c["answer"],  # noqa: E731
                       "columns": {k: v for k, v in c["columns"].items() if k not in ("terminated",
                                                                                       "completion_length")}}
    val_ids = {c["columns"]["id"] for c in in_training_eval}
    assert val_ids and val_ids <= {c["columns"]["id"] for c in pilot}
    for vid in val_ids:
        assert strip(next(c for c in pilot if c["columns"]["id"] == vid)) == \
            strip(next(c for c in in_training_eval if c["columns"]["id"] == vid))
    # trainer_state: the step being trained, the steps done at in-training evaluation
    assert {c["step"] for c in train} == {0} and {c["step"] for c in in_training_eval} == {1}
