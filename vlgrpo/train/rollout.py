"""One rollout: this step's prompts → G sampled completions each → rewards → group advantages → the batch
the update consumes (with old-policy / reference log-probs when the maths needs them).

``rollout`` is the plain strategy (the step's prompts, sampled once). The pieces it is made of -
``step_slots``, ``encode_step``, ``sample``, ``score_rewards`` and ``finish_rollout`` - are shared with
dynamic sampling (:mod:`vlgrpo.train.dynamic`), which builds its own strategy from them; set-up picks one
of the two for the run (``Run.rollout_fn``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlgrpo.algo import grpo
from vlgrpo.train import data_order as P
from vlgrpo.train import sharding
from vlgrpo.train.backbone import unwrap
from vlgrpo.train.batches import PromptBatch, StepBatch
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.sampling import SamplingSpec
from vlgrpo.train.scoring import score_batch
from vlgrpo.train.state import Completions, Rollout, Run, StepClock


def reward_tensor(step: int, per_reward: dict[str, list], names: Sequence[str]) -> torch.Tensor:
    """(N, K) with NaN for None; a NaN/inf score is an error naming the step and the reward."""
    cols = []
    for name in names:
        vals = []
        for v in per_reward[name]:
            if v is None:
                vals.append(float("nan"))
                continue
            if not math.isfinite(float(v)):
                raise TrainingError(f"step {step}: reward {name!r} returned {v} (not finite)")
            vals.append(float(v))
        cols.append(vals)
    # contiguous (N, K), like the gathered tensor of a multi-process run: a per-reward mean then sums in
    # the same order whatever the number of processes (a transposed view would not, in the last bit)
    return torch.tensor(cols, dtype=torch.float32).T.reshape(-1, len(names)).contiguous()


def step_slots(run: Run, step: int) -> tuple[list[int], list[Any]]:
    """This process's global prompt slots of ``step`` and their manifest items."""
    n = run.local_prompts
    global_idx = P.step_prompt_indices(step, run.tc.prompts_per_step, len(run.items), run.tc.seed)
    slots = list(range(run.rank * n, (run.rank + 1) * n))
    return slots, [run.items[i] for i in global_idx[slots[0]:slots[-1] + 1]]


def encode_step(run: Run, step: int, slots: list[int], items: list[Any]) -> PromptBatch:
    """The step's prompts (augmented images when ``train.augment``), encoded and on the run's device."""
    from vlgrpo.model import prompt_encoding

    mdir = run.paths.manifest.parent
    imgs = P.step_images(items, mdir, run.tc, step, slots)
    enc = prompt_encoding.encode_prompts(run.processor, items, mdir, run.cfg.data.min_pixels, run.cfg.data.max_pixels,
                                  images=imgs)
    return PromptBatch.from_encoded(enc, [len(it.images) for it in items],
                                    [len(it.videos) for it in items]).to(run.device)


def sample(run: Run, prompts: PromptBatch, step: int, slots: list[int],
           spec: SamplingSpec | None = None) -> Completions:
    """G completions per prompt from the current policy (eval mode, autocast).
    ``spec``: how to sample (default ``run.sampling``; dynamic sampling's extra rounds may sample hotter)."""
    scorer = unwrap(run.scorer)
    spec = spec or run.sampling
    gens = [P.step_generator(run.tc.seed, step, k, 0) for k in slots]
    all_done = (lambda flag: sharding.all_processes(flag, run.device)) if run.sharded else None
    scorer.model.eval()
    with run.accelerator.autocast():
        completions = scorer.generate(prompts, spec, gens, run.tc.shared_work, all_done=all_done)
    scorer.model.train()
    if run.sharded:
        # every process scores completions of one width, the longest of all: whether the shared path runs
        # its second (completion) forward then does not differ between processes - each forward through a
        # sharded layer is a collective. Padded columns are masked (causal attention: earlier tokens unchanged).
        ids, mask = completions.ids, completions.mask
        width = sharding.max_over_processes(ids.shape[1], run.device)
        completions = Completions(F.pad(ids, (0, width - ids.shape[1]), value=run.sampling.pad_id),
                                  F.pad(mask, (0, width - mask.shape[1]), value=0), completions.terminated)
    return completions


def score_rewards(run: Run, step: int, items: list[Any], completions: Completions) -> torch.Tensor:
    """Decode the completions and score them with the reward registry → local (N_local, K), NaN for None."""
    from vlgrpo import rewards as R

    G = run.tc.num_generations
    c_ids, c_mask, term = completions.ids, completions.mask, completions.terminated
    ids_list = [ids[:int(m.sum())] for ids, m in zip(c_ids.tolist(), c_mask)]
    texts = [run.processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in ids_list]
    prompts_txt = [R.reward_prompt(it) for it in items for _ in range(G)]
    columns: dict[str, list] = {}
    for it in items:
        for k, v in it.columns().items():
            columns.setdefault(k, []).extend([v] * G)
    columns["terminated"] = term.tolist()
    columns["completion_length"] = c_mask.sum(1).tolist()        # tokens (soft_overlong reads it)
    columns["completion_ids"] = ids_list
    try:
        rb = R.compute_rewards(run.rewards.weights, prompts_txt, texts, columns,
                               on_error=run.cfg.rewards.on_error, rewards=run.rewards.fns,
                               trainer_state=R.RewardState(step, run.tc.max_steps))
    except R.RewardError as e:
        raise TrainingError(f"step {step + 1}: {e}") from e
    return reward_tensor(step + 1, rb.per_reward, run.rewards.names)


def rollout(run: Run, step: int, clock: StepClock) -> Rollout:
    """Run one step's rollout (0-based ``step``) on this process, its prompts sampled once; ``clock`` gets
    a lap per phase (encode, generate, rewards, score). Advantages are computed over the rewards of all
    processes. The plain strategy of ``Run.rollout_fn`` (dynamic sampling's is
    :func:`vlgrpo.train.dynamic.informative_rollout`)."""
    slots, items = step_slots(run, step)
    prompts = encode_step(run, step, slots, items)
    clock.lap("encode")
    completions = sample(run, prompts, step, slots)
    clock.lap("generate")
    local_r = score_rewards(run, step, items, completions).to(run.device)        # (N_local, K)
    return finish_rollout(run, prompts, completions, local_r, clock, {})


def finish_rollout(run: Run, prompts: PromptBatch, completions: Completions, local_r: torch.Tensor,
                   clock: StepClock, extra: dict[str, float], sampler_logp: torch.Tensor | None = None) -> Rollout:
    """Group advantages over all processes' rewards (``local_r``: this process's (N_local, K)), then
    old-policy / reference log-probs → the Rollout. ``sampler_logp`` (N_local, C): a rollout engine's
    log-probs of the sampled tokens; the trainer's own of the same sampling distribution (banned ids
    removed) are then always computed, the mismatch logged and (``train.rollout.vllm.importance_sampling``)
    corrected."""
    c_ids, c_mask, term = completions.ids, completions.mask, completions.terminated
    all_r = run.accelerator.gather(local_r).cpu()                                     # (N_global, K)
    weights = run.rewards.weight_tensor()
    total = grpo.total_rewards(all_r, weights)                                        # (N_global,)
    adv_all, std = grpo.compute_advantages(all_r, weights, run.tc.num_generations, run.tc.advantage_estimator,
                                           run.tc.scale_rewards)
    n_local = run.local_prompts * run.tc.num_generations
    adv = adv_all[run.rank * n_local:(run.rank + 1) * n_local].to(run.device)
    clock.lap("rewards")
    # train.mask_truncated_completions: as in TRL, a completion cut at the length limit gets an all-zero mask,
    # for the loss and for the attention of its scoring forwards; its tokens are not counted
    mask = grpo.drop_truncated(c_mask, term) if run.tc.mask_truncated_completions else c_mask
    # old policy / reference log-probs only when the maths needs them
    old_logp = (score_batch(run.scorer, prompts, c_ids, mask, run.tc, run.accelerator)
                if run.tc.num_iterations > 1 else None)
    is_weight = None
    if sampler_logp is not None:
        # the engine reports the log-probs of what it sampled from: the policy with the vision placeholder
        # ids banned (as the trainer's own sampler bans them). Compared with the unbanned policy the ratio
        # would carry the banned mass log(1 - m) on every token, a bias the correction must not apply.
        sampler_view = score_batch(run.scorer, prompts, c_ids, mask, run.tc, run.accelerator,
                                   exclude=banned_ids(run, c_ids.device))
        is_weight = sampler_weights(run, sampler_view, sampler_logp.to(sampler_view.device), mask, extra)
    ref_logp = (score_batch(run.ref_scorer, prompts, c_ids, mask, run.tc, run.accelerator)
                if run.ref_scorer is not None else None)
    global_tokens = float(run.accelerator.gather(mask.sum().reshape(1).float()).sum())
    batch = StepBatch(prompts, c_ids, mask, adv, old_logp, ref_logp, global_tokens, run.world, is_weight)
    clock.lap("score")
    return Rollout(batch, term, all_r, total, std, c_mask.sum(1), extra)


def banned_ids(run: Run, device) -> torch.Tensor | None:
    """The ids the rollout samplers never draw (``SamplingSpec.banned_ids``) as a tensor; None when none."""
    ids = sorted(set(run.sampling.banned_ids))
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def sampler_weights(run: Run, trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                    extra: dict[str, float]) -> torch.Tensor | None:
    """The importance weights (N, C) of ``train.rollout.vllm`` (None when its ``importance_sampling`` is off);
    the mismatch statistics of this process's tokens go into ``extra`` either way."""
    vc = run.tc.rollout.vllm
    w = (grpo.sampler_correction(trainer_logp, sampler_logp, mask, vc.is_mode, vc.is_cap, vc.is_min)
         if vc.importance_sampling else None)
    extra.update(grpo.mismatch_stats(trainer_logp, sampler_logp, mask, w, vc.is_cap, vc.is_min))
    return w
