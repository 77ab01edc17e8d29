"""Evaluation during training (``train.eval_steps``) and the best checkpoint by val reward (``train.keep_best``).

Every ``eval_steps`` steps and after the last one, the main process answers the val split greedily and scores
it with the evaluate stage's rewards: ``eval/accuracy`` and ``eval/reward`` go into that step's metrics row
(and from there to MLflow). Greedy decoding draws no random numbers and changes no weight, so evaluating does
not change the run: a run with evaluation trains exactly like one without.

With ``keep_best`` the policy of the evaluation with the highest ``eval/reward`` is kept in
``out_dir/checkpoints/best`` (weights + ``best.json``, written atomically; a later evaluation must beat it
strictly), and the final model in ``out_dir`` is that policy instead of the last one. The folder lives beside
the step checkpoints, so it survives a resume and is dropped with them when the run's settings change.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlgrpo.io import atomic_dir
from vlgrpo.train import checkpoint as ckpt
from vlgrpo.train.state import Run

BEST_DIR = "best"
BEST_FILE = "best.json"


def due(run: Run, step: int) -> bool:
    """Is there an evaluation after 0-based ``step``?"""
    every = run.tc.eval_steps
    return every is not None and ((step + 1) % every == 0 or step + 1 == run.tc.max_steps)


def evaluate_policy(run: Run, step: int = 0) -> dict[str, Any]:
    """Greedy accuracy and mean reward of the current policy on the val split (``eval/*`` metrics) after
    ``step`` optimizer steps (the rewards' ``trainer_state.global_step``)."""
    from vlgrpo.eval import evaluate as E
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.rewards import RewardState, setup_rewards

    items = read_manifest(run.paths.manifest, split="val")
    if not items:
        raise ValueError(f"{run.paths.manifest}: train.eval_steps needs val items (data.num_val / "
                         f"data.val_fraction)")
    if run.eval_rewards is None:
        run.eval_rewards = setup_rewards(E.reward_names(run.cfg),
                                         E.reward_context(run.cfg, run.paths.root, run.paths.manifest.parent, items))
    policy = run.policy
    try:
        return E.val_metrics(policy, run.processor, items, run.paths.manifest.parent, run.cfg, run.eval_rewards,
                             trainer_state=RewardState(step, run.tc.max_steps))
    finally:
        policy.train()


def best_dir(run: Run) -> Path:
    return run.paths.out_dir / ckpt.CHECKPOINT_DIR / BEST_DIR


def best_record(run: Run) -> dict[str, Any] | None:
    """The kept best evaluation (``step``, ``eval/reward``, ``eval/accuracy``), or None."""
    try:
        return json.loads((best_dir(run) / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def keep_if_best(run: Run, step: int, metrics: dict[str, Any]) -> bool:
    """Keep the policy as the best one when its ``eval/reward`` beats the kept one; True when it did."""
    from safetensors.torch import save_model

    best = best_record(run)
    if best is not None and best["step"] != step + 1 and metrics["eval/reward"] <= best["eval/reward"]:
        return False
    record = {"step": step + 1, "eval/reward": metrics["eval/reward"], "eval/accuracy": metrics["eval/accuracy"]}
    with atomic_dir(best_dir(run)) as tmp:
        save_model(run.policy, str(tmp / "model.safetensors"))
        (tmp / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return True


def after_step(run: Run, step: int, row: dict[str, Any]) -> None:
    """Evaluate after 0-based ``step`` when due (main process only; the others wait): add the ``eval/*``
    metrics to ``row`` and keep the policy when it is the best so far."""
    if not due(run, step):
        return
    acc = run.accelerator
    if acc.is_main_process:
        metrics = evaluate_policy(run, step + 1)
        row.update(metrics)
        if run.tc.keep_best:
            row["eval/is_best"] = float(keep_if_best(run, step, metrics))
    acc.wait_for_everyone()


def load_best(run: Run) -> dict[str, Any] | None:
    """With keep_best: put the best policy's weights into the policy (before the final save) → its record."""
    from safetensors.torch import load_model

    best = best_record(run) if run.tc.keep_best else None
    if best is not None:
        load_model(run.policy, str(best_dir(run) / "model.safetensors"))
    return best
