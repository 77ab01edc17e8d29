"""One update: the GRPO loss of a step's batch, accumulated over micro-batches, then optimizer steps.

The loss of each micro-batch is its numerator over the *step's* normaliser (vlgrpo.algo.grpo.loss_normalizer),
so the accumulated gradient is the gradient of the whole batch's loss.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from vlgrpo.algo import grpo
from vlgrpo.config import TrainConfig
from vlgrpo.train.batches import StepBatch, micro_batches
from vlgrpo.train import sharding
from vlgrpo.train.errors import check_finite
from vlgrpo.train.scoring import score_micro_batch
from vlgrpo.train.state import Run, UpdateResult


def update_phase(scorer: nn.Module, batch: StepBatch, tc: TrainConfig, accelerator=None) -> dict[str, float]:
    """One optimizer step's backward passes over ``batch`` in micro-batches of ``tc.micro_batch_size``
    (gradients accumulate in the parameters) → local metric sums: ``loss`` and ``<name>#sum`` /
    ``<name>#count`` pairs for entropy, kl and the clip ratios. ``accelerator`` None: plain backward."""
    mbs = micro_batches(batch.prompts, tc.num_generations, tc.micro_batch_size)
    mask = batch.completion_mask
    global_tokens = batch.global_num_tokens if batch.global_num_tokens is not None else float(mask.sum())
    norm = grpo.loss_normalizer(tc.loss_type, num_sequences=mask.shape[0], num_tokens=float(mask.sum()),
                                global_num_tokens=global_tokens,
                                max_completion_length=tc.max_completion_length,
                                num_processes=batch.num_processes)
    spec = grpo.LossSpec(tc.epsilon_low, tc.epsilon_high, tc.beta, tc.importance_sampling_level, tc.loss_type,
                         tc.sapo_temperature_pos, tc.sapo_temperature_neg)
    gather = values_gatherer(accelerator)
    bonus = tc.entropy_coef != 0.0          # train.entropy_coef: the entropies then carry gradients
    sums: dict[str, float] = {"loss": 0.0}
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        sl = slice(mb.start, mb.end)
        # DDP: gradients are all-reduced once per step, on the last micro-batch. Sharded (FSDP2): reduce-scattered
        # after every micro-batch - skipping that would keep a full unsharded gradient (vlgrpo.train.sharding)
        accumulate = accelerator is not None and not last and not sharding.is_fsdp(scorer)
        with (accelerator.no_sync(scorer) if accumulate else nullcontext()):
            with (accelerator.autocast() if accelerator is not None else nullcontext()):
                logp, ent = score_micro_batch(scorer, mb, batch.completion_ids, mask, tc,
                                              with_entropy="grad" if bonus else True)
            old = batch.old_logp[sl] if batch.old_logp is not None else None
            ref = batch.ref_logp[sl] if batch.ref_logp is not None else None
            # train.top_entropy_quantile: the policy term only on this micro-batch's high-entropy tokens
            high = (grpo.high_entropy_mask(ent.detach(), mask[sl], tc.top_entropy_quantile, gather)
                    if tc.top_entropy_quantile < 1.0 else None)
            keep = high
            if batch.is_weight is not None:      # the rollout engine's importance weights, as TRL applies them
                w = batch.is_weight[sl]
                keep = w if keep is None else keep.to(w.dtype) * w
            tl, ratio, kl = grpo.policy_token_loss(logp, old, ref, batch.advantages[sl], mask[sl], spec, keep)
            loss = grpo.aggregate_loss(tl, mask[sl], tc.loss_type, norm)
            if bonus:      # on the tokens the policy term acts on, as TRL (the high-entropy ones when masked)
                on = mask[sl] if high is None else mask[sl] * high.to(mask.dtype)
                loss = loss - tc.entropy_coef * grpo.entropy_bonus(ent, on, len(mbs))
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        sums["loss"] += float(loss.detach())
        m = mask[sl]
        _add(sums, "entropy", grpo.masked_sum_count(ent, m))
        if kl is not None:
            _add(sums, "kl", grpo.masked_sum_count(kl, m))
        for name, ind in grpo.loss_indicators(tc.loss_type, ratio.detach(), batch.advantages[sl], tc.epsilon_low,
                                              tc.epsilon_high).items():
            _add(sums, name, grpo.masked_sum_count(ind, m))
    return sums


def values_gatherer(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function that concatenates every process's 1-D tensor (lengths may differ); None for one process.

    Padded with a negative sentinel no entropy can take, gathered, and the sentinel dropped: the
    high-entropy quantile is then taken over the tokens of all processes, as TRL does.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return None

    def gather(values: torch.Tensor) -> torch.Tensor:
        padded = accelerator.pad_across_processes(values, dim=0, pad_index=_SENTINEL)
        everything = accelerator.gather(padded)
        return everything[everything != _SENTINEL]

    return gather


_SENTINEL = -1e9


def _add(sums: dict[str, float], name: str, sc: tuple[float, float]) -> None:
    sums[name + "#sum"] = sums.get(name + "#sum", 0.0) + sc[0]
    sums[name + "#count"] = sums.get(name + "#count", 0.0) + sc[1]


def update(run: Run, batch: StepBatch, step: int) -> UpdateResult:
    """``train.num_iterations`` optimizer updates on one step's batch (0-based ``step``) → UpdateResult
    (metric sums added over the iterations, grad norm of each iteration). A non-finite loss or grad norm
    raises TrainingError before the optimizer steps."""
    agg: dict[str, float] = {}
    grad_norms: list[float] = []
    for i in range(run.tc.num_iterations):
        sums = update_phase(run.scorer, batch, run.tc, run.accelerator)
        check_finite(step + 1, "loss", sums["loss"])
        if run.sharded:
            gn = sharding.clip_grad_norm(run.scorer.parameters(), run.tc.max_grad_norm)
        else:
            gn = float(run.accelerator.clip_grad_norm_(run.scorer.parameters(), run.tc.max_grad_norm))
        check_finite(step + 1, "grad_norm", gn)
        grad_norms.append(gn)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        sync_reference(run, step * run.tc.num_iterations + i + 1)
        for k, v in sums.items():
            agg[k] = agg.get(k, 0.0) + v
    return UpdateResult(agg, grad_norms)


def sync_reference(run: Run, updates: int) -> None:
    """``train.sync_ref_model`` (TR-DPO, as TRL's SyncRefModelCallback): after every
    ``ref_model_sync_steps``-th optimizer update (``updates`` counts them from 1 over the run),
    π_ref ← α·π_θ + (1 − α)·π_ref with α = ``ref_model_mixup_alpha``."""
    tc = run.tc
    if tc.sync_ref_model and run.ref_scorer is not None and updates % tc.ref_model_sync_steps == 0:
        grpo.mix_into_reference(run.policy, run.reference, tc.ref_model_mixup_alpha)
