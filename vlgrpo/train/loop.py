"""The GRPO training loop: set-up, then per step one rollout, one update, one metrics row, a checkpoint."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from vlgrpo.config import Config
from vlgrpo.eval import gates
from vlgrpo.train import checkpoint as ckpt
from vlgrpo.train import periodic_eval, sharding
from vlgrpo.train.metrics import append_row, metrics_row, run_summary
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.setup import setup
from vlgrpo.train.state import Run, StepClock
from vlgrpo.train.update import update


def save_step(run: Run, step: int, reward: float | None = None) -> None:
    """Checkpoint after 0-based ``step`` when it is a ``train.save_steps`` multiple or the last step (written
    by the main process; every process waits for it), then drop those beyond ``train.save_total_limit``.
    ``reward`` (the step's mean reward) is recorded for ``train.keep_best_checkpoint``."""
    tc = run.tc
    if (step + 1) % tc.save_steps and step + 1 != tc.max_steps:
        return
    run.accelerator.wait_for_everyone()
    main = run.accelerator.is_main_process
    gathered = None
    if run.sharded:       # every process takes part in gathering the shards; the main one writes them
        weights = sharding.gather_weights(run.policy, main)
        opt = sharding.full_optimizer_state(run.optimizer, main)
        gathered = ckpt.Gathered(weights, opt) if main else None
    if main:
        state = {"step": step + 1, "seed": tc.seed, "num_items": len(run.items),
                 "data_order": {"seed": tc.seed, "prompts_per_step": tc.prompts_per_step,
                                "next_slot": (step + 1) * tc.prompts_per_step},
                 "train_config": dataclasses.asdict(tc), "fingerprint": run.fingerprint, "reward": reward}
        path = run.paths.out_dir / ckpt.CHECKPOINT_DIR / f"step-{step + 1}"
        ckpt.save_checkpoint(path, run.policy, run.optimizer, run.scheduler, state,
                             reference=run.checkpointed_reference, gathered=gathered)
        ckpt.rotate_checkpoints(run.paths.out_dir, tc.save_total_limit, tc.keep_best_checkpoint, path)
    run.accelerator.wait_for_everyone()


def train(run: Run, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train a set-up ``run`` from ``run.start_step`` to ``train.max_steps`` → the run summary.

    Each step: one rollout, one update, one metrics row (appended to ``metrics_path`` by the main process),
    a checkpoint every ``train.save_steps``. ``stop_after``: stop (as if killed) after that many steps of this
    call - checkpoints written so far stay. A finished run writes the final model to ``out_dir``.

    ``train.watch`` is checked on the rows of this call after every step (``gates.watch``; the rows are
    reduced over processes, so every process sees the same flags); a flag named in ``train.watch.stop_on``
    ends the run there, and the final model is the best one kept (``_stopped_model``). The summary's
    ``watch`` holds the flags, the stop and which model was kept.
    """
    from tqdm.auto import tqdm

    tc, main = run.tc, run.accelerator.is_main_process
    history: list[dict[str, Any]] = []
    stopped: dict[str, Any] | None = None
    t_run = time.perf_counter()
    bar = tqdm(total=tc.max_steps, initial=run.start_step, desc="grpo", dynamic_ncols=True,
               disable=not (progress and main))
    try:
        for step in range(run.start_step, tc.max_steps):
            if stop_after is not None and len(history) >= stop_after:
                break
            clock = StepClock()
            ro = run.rollout_fn(run, step, clock)         # plain or dynamic sampling, chosen at set-up
            upd = update(run, ro.batch, step)
            clock.lap("update")
            row = metrics_row(run, step, ro, upd, clock)
            periodic_eval.after_step(run, step, row)          # train.eval_steps / keep_best
            if main:
                append_row(run.paths.metrics_path, row)
            history.append(row)
            bar.update(1)
            bar.set_postfix(step=step + 1, reward=f"{row['reward']:.3f}", refresh=False)
            save_step(run, step, row.get("reward"))
            if tc.watch.stop_on:
                stopped = gates.stop_reason(gates.watch(history, tc.watch), tc.watch)
                if stopped is not None:
                    stopped["at_step"] = step + 1
                    break
    finally:
        bar.close()
        if run.engine is not None:        # the engine server this run started goes with it
            run.engine.close()
    summary = run_summary(run, history, len(history), time.perf_counter() - t_run)
    summary["watch"] = {"flags": gates.watch(history, tc.watch), "stopped": stopped}
    if summary["finished"]:
        summary["best"] = periodic_eval.load_best(run)    # keep_best: the final model is the best one
    elif stopped is not None:
        summary["watch"]["final_model"] = _stopped_model(run, stopped)
        summary["best"] = periodic_eval.best_record(run) if tc.keep_best else None
    done = summary["finished"] or stopped is not None
    weights = sharding.gather_weights(run.policy, main) if (done and run.sharded) else None
    if done and main:
        ckpt.save_final(run.policy, run.processor, run.paths.out_dir, weights)
    run.accelerator.wait_for_everyone()
    summary["wall_s"] = time.perf_counter() - t_run
    return summary


def _stopped_model(run: Run, stopped: dict[str, Any]) -> str:
    """Put the model a stopped run keeps into the policy → what it is: the ``keep_best`` policy (best val
    reward), else the newest checkpoint saved before the flagged stretch began, else the policy at the stop."""
    if run.tc.keep_best and periodic_eval.load_best(run) is not None:
        best = periodic_eval.best_record(run) or {}
        return f"the best by val reward (train.keep_best, step {best.get('step')})"
    before = [p for p in ckpt.complete_checkpoints(run.paths.out_dir)
              if int(p.name.split("-")[-1]) < stopped["first_step"]]
    if before:
        path = max(before, key=lambda p: int(p.name.split("-")[-1]))
        ckpt.load_checkpoint(path, run.policy, run.optimizer, run.scheduler, sharded=run.sharded)
        return f"checkpoint {path.name} (the newest before the flagged stretch from step {stopped['first_step']})"
    return f"the policy at the stop (step {stopped['at_step']}: no checkpoint before step {stopped['first_step']})"


def train_grpo(cfg: Config, paths: RunPaths, progress: bool = True, stop_after: int | None = None
               ) -> dict[str, Any]:
    """GRPO-train the policy in ``paths.init_model_dir`` on the manifest's train split with ``cfg.train``:
    ``train(setup(cfg, paths), ...)``.

    Resumes from the newest complete checkpoint in ``out_dir/checkpoints``. Returns a summary dict (steps,
    wall time, throughput, ``final``: the last metrics row). The final model goes to ``out_dir``
    (atomically, the checkpoints kept inside it).
    """
    return train(setup(cfg, paths), progress=progress, stop_after=stop_after)
