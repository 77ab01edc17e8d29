"""One metrics row per step (reduced over processes; TRL's metric names where they exist), the metrics
stream (``reports/<stage>_metrics.jsonl``, one JSON line per step) and the run summary."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from vlgrpo.algo import grpo
from vlgrpo.train.errors import check_finite
from vlgrpo.train.state import Rollout, Run, StepClock, UpdateResult

_MEAN_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "cispo_clip_ratio")


def _reduced_means(run: Run, sums: dict[str, float]) -> dict[str, float]:
    """Sum the update's metric sums over processes → loss per update and the per-token means."""
    keys = sorted(sums)
    red = run.accelerator.reduce(torch.tensor([sums[k] for k in keys], device=run.device), "sum")
    tot = dict(zip(keys, red.cpu().tolist()))
    out = {"loss": tot["loss"] / (run.world * run.tc.num_iterations)}
    for name in _MEAN_METRICS:
        if name + "#sum" in tot:
            out[name] = tot[name + "#sum"] / max(tot[name + "#count"], 1.0)
    return out


def metrics_row(run: Run, step: int, ro: Rollout, update: UpdateResult, clock: StepClock) -> dict[str, Any]:
    """The metrics of 0-based ``step`` from its rollout, its update (metric sums, grad norms) and its clock.
    A non-finite mean reward or loss raises TrainingError."""
    tc, acc, G = run.tc, run.accelerator, run.tc.num_generations
    means = _reduced_means(run, update.sums)
    local_lengths = ro.lengths if ro.lengths is not None else ro.batch.completion_mask.sum(1)
    lengths = acc.gather(local_lengths.float()).cpu()
    clipped = acc.gather((~ro.terminated).float()).cpu()
    prompt_tok = float(acc.gather(ro.batch.prompts.attention_mask.sum().reshape(1).float()).sum())
    dt = clock.total
    row: dict[str, Any] = {
        "step": step + 1,
        "epoch": (step + 1) * tc.prompts_per_step / len(run.items),
        "loss": means.pop("loss"),
        "reward": float(torch.nanmean(ro.total)),
        "reward_std": float(grpo.nan_std(ro.total)),
        "frac_reward_zero_std": grpo.frac_zero_std(ro.group_std),
    }
    for j, n in enumerate(run.rewards.names):
        col = ro.rewards[:, j]
        row[f"rewards/{n}/mean"] = float(torch.nanmean(col)) if (~torch.isnan(col)).any() else None
    row.update(means)
    row.update(ro.extra)
    row.update({
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(clipped.mean()),
        "grad_norm": update.grad_norm,
        "learning_rate": run.scheduler.get_last_lr()[0],
        "samples_per_s": tc.prompts_per_step * G / dt,
        "tokens_per_s": (prompt_tok * G + float(lengths.sum())) / dt,
        "step_time_s": dt,
    })
    # where the step's time went (this process): prompt encoding, sampling, rewards, old-policy / reference
    # scoring, forward+backward+optimizer
    row.update({f"time/{phase}_s": s for phase, s in clock.laps.items()})
    for k in ("reward", "loss"):
        check_finite(step + 1, k, row[k])
    return row


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line to the metrics stream (flushed: the progress display and MLflow tail it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def run_summary(run: Run, history: list[dict[str, Any]], steps_done: int, wall: float) -> dict[str, Any]:
    """What ``train_grpo`` returns: steps, throughput (median step), data counts and the last metrics row."""
    tc = run.tc
    finished = run.start_step + steps_done >= tc.max_steps
    return {
        "steps": run.start_step + steps_done, "max_steps": tc.max_steps, "finished": finished,
        "resumed_from": run.resumed_from, "wall_s": wall,
        "samples_per_s": statistics.median(h["samples_per_s"] for h in history) if history else None,
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in history) if history else None,
        "num_prompts": len(run.items), "dropped_prompts": run.dropped, "num_processes": run.world,
        "mixed_precision": tc.mixed_precision, "shared_work": tc.shared_work, "device": str(run.device),
        "sharding": "fsdp2" if run.sharded else None,
        "final": history[-1] if history else None, "out_dir": str(run.paths.out_dir),
        "metrics_path": str(run.paths.metrics_path),
    }
