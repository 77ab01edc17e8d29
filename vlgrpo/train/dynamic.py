"""Dynamic sampling (DAPO; ``train.dynamic_sampling``): the update only sees groups whose rewards differ.

A group whose G rewards all tie has advantage 0 for every completion, so it costs a share of the update
and teaches nothing. Each round samples G completions for a batch of prompts, scores them, and keeps the
groups whose rewards differ. While some process has fewer than its share of prompts_per_step such groups
and rounds remain (``train.max_resample_rounds``), another round draws fresh prompts. The step then
updates on the first informative groups in sampling order. When the rounds run out, tied groups fill the
rest, so the batch size, and with it the loss normalisers, never change.

Round 0 is the step's usual prompts, so a step whose groups all differ is exactly the step without dynamic
sampling. Round r >= 1 draws prompts_per_step train prompts uniformly at random with a generator keyed by
(seed, step, r). Its prompt slots (the keys of the sampling and augmentation generators) are
r * prompts_per_step + k. Every draw is therefore a function of (seed, step) alone, and a resumed run
replays it exactly. With ``train.resample_temperature`` the extra rounds sample at that temperature: a
hotter round finds right answers on prompts where every completion at ``train.temperature`` ties wrong.
With several processes, each process fills its share from its own candidates, and the decision to draw
another round is taken together (any process short -> all draw).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlgrpo.algo import grpo
from vlgrpo.train.rollout import encode_step, finish_rollout, sample, score_rewards, step_slots
from vlgrpo.train.state import Completions, Rollout, Run, StepClock


@dataclass(eq=False)
class Group:
    """One prompt's G sampled completions and their rewards (this process)."""
    item: Any
    slot: int
    ids: torch.Tensor        # (G, C)
    mask: torch.Tensor       # (G, C)
    terminated: torch.Tensor  # (G,)
    rewards: torch.Tensor    # (G, K) NaN for None


def round_prompts(run: Run, step: int, r: int) -> tuple[list[int], list[Any]]:
    """This process's prompt slots and items of round ``r`` of 0-based ``step``."""
    if r == 0:
        return step_slots(run, step)
    P, n = run.tc.prompts_per_step, run.local_prompts
    rng = np.random.default_rng([run.tc.seed, step, r, 7907])
    idx = rng.choice(len(run.items), size=P, replace=len(run.items) < P)
    ks = range(run.rank * n, (run.rank + 1) * n)
    return [r * P + k for k in ks], [run.items[int(idx[k])] for k in ks]


def sample_round(run: Run, step: int, r: int) -> list[Group]:
    """Round ``r``: encode its prompts, sample G completions each, score them → one Group per prompt."""
    slots, items = round_prompts(run, step, r)
    prompts = encode_step(run, step, slots, items)
    spec = run.sampling
    if r > 0 and run.tc.resample_temperature is not None:
        spec = dataclasses.replace(spec, temperature=run.tc.resample_temperature)
    completions = sample(run, prompts, step, slots, spec)
    rewards = score_rewards(run, step, items, completions)
    ids, mask, term = completions.ids, completions.mask, completions.terminated
    G = run.tc.num_generations
    return [Group(it, k, ids[j * G:(j + 1) * G], mask[j * G:(j + 1) * G], term[j * G:(j + 1) * G],
                  rewards[j * G:(j + 1) * G]) for j, (it, k) in enumerate(zip(items, slots))]


def _stack(groups: list[Group], pad_id: int) -> tuple[Completions, torch.Tensor]:
    """The groups' completions right-padded to a common length → (completions, rewards)."""
    C = max(g.ids.shape[1] for g in groups)
    ids = torch.cat([F.pad(g.ids, (0, C - g.ids.shape[1]), value=pad_id) for g in groups])
    mask = torch.cat([F.pad(g.mask, (0, C - g.mask.shape[1]), value=0) for g in groups])
    return Completions(ids, mask, torch.cat([g.terminated for g in groups])), torch.cat([g.rewards for g in groups])


def informative_rollout(run: Run, step: int, clock: StepClock) -> Rollout:
    """Rounds of sampling until this step has its prompts_per_step informative groups (or the rounds run
    out), then advantages and log-probs as in the plain rollout (:func:`vlgrpo.train.rollout.finish_rollout`)
    → the Rollout, its ``extra`` holding the metrics ``dynamic/resample_rounds`` (rounds after the first),
    ``dynamic/groups_sampled`` and ``dynamic/frac_dropped`` (tied groups left out / groups sampled), over
    all processes. The dynamic-sampling strategy of ``Run.rollout_fn``."""
    n, G, acc = run.local_prompts, run.tc.num_generations, run.accelerator
    weights = run.rewards.weight_tensor()
    informative: list[Group] = []
    tied: list[Group] = []
    rounds = 0
    for r in range(run.tc.max_resample_rounds + 1):
        rounds = r
        for g in sample_round(run, step, r):
            signal = bool(grpo.informative_groups(grpo.total_rewards(g.rewards, weights), G)[0])
            (informative if signal else tied).append(g)
        short = torch.tensor([float(len(informative) < n)], device=run.device)
        if float(acc.reduce(short, "sum")) == 0.0:     # every process has its share: stop together
            break
    chosen = (informative + tied)[:n]
    clock.lap("generate")
    prompts = encode_step(run, step, [g.slot for g in chosen], [g.item for g in chosen])  # same images
    clock.lap("encode")
    completions, rewards = _stack(chosen, run.sampling.pad_id)
    left_out = len(tied) - max(0, len(chosen) - len(informative))       # tied groups not used
    counts = acc.reduce(torch.tensor([len(informative) + len(tied), left_out], dtype=torch.float32,
                                     device=run.device), "sum").cpu().tolist()
    extra = {"dynamic/resample_rounds": float(rounds), "dynamic/groups_sampled": counts[0],
             "dynamic/frac_dropped": counts[1] / counts[0]}
    return finish_rollout(run, prompts, completions.to(run.device), rewards.to(run.device), clock, extra)
