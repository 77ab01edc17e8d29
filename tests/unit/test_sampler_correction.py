"""The rollout engine's sampler-mismatch correction (vlgrpo.algo.grpo.sampler_correction) against TRL's
GRPOTrainer maths (vllm_importance_sampling_correction), on given log-probs."""
import dataclasses
import math

import pytest
import torch
from trl import GRPOConfig

from vlgrpo.algo import grpo


def trl_is_ratio(old, sampling, mask, mode, clip_max, clip_min):
    # transcribed from trl.GRPOTrainer._generate_and_score_completions (the vLLM IS block), kept verbatim in
    # its steps so that a difference in vlgrpo's version shows here
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


def logps(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(6, 5, generator=g) * 3
    sampling = old + torch.randn(6, 5, generator=g) * 0.8      # a mismatch large enough to clip
    sampling[1, 2] = float("nan")                               # a token the sampler gave no log-prob
    mask = torch.ones(6, 5)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    return old, sampling, mask


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_weights_equal_trl(mode, clip_min):
    old, sampling, mask = logps(0)
    ours = grpo.sampler_correction(old, sampling, mask, mode, 2.0, clip_min)
    theirs = trl_is_ratio(old, sampling, mask, mode, 2.0, clip_min).expand_as(old)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (ours != 1).any() and ((ours == 2.0).any() or (ours == 0).any())   # the bound did bind


def test_defaults_are_trls_choice_of_cap():
    # the cap default equals TRL's vllm_importance_sampling_clip_max, the floor TRL's clip_min
    from vlgrpo.config import VllmConfig

    trl = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    assert VllmConfig().is_cap == trl["vllm_importance_sampling_clip_max"]
    assert VllmConfig().is_min == trl["vllm_importance_sampling_clip_min"]


def test_weighted_loss_equals_trl_composition():
    # TRL: per_token_loss = -min(coef_1 A, coef_2 A) * is_ratio, then + beta * kl (KL not weighted)
    old, sampling, mask = logps(1)
    logp = (old + torch.randn_like(old) * 0.1).requires_grad_()
    ref = old - 0.2
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.0])
    w = grpo.sampler_correction(old, sampling, mask, "token_truncate", 3.0)
    spec = grpo.LossSpec(0.2, 0.28, 0.04, "token")
    ours, _, _ = grpo.policy_token_loss(logp, old, ref, adv, mask, spec, w)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    theirs = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None]) * w + 0.04 * kl
    torch.testing.assert_close(ours, theirs)


def test_mismatch_stats():
    old, sampling, mask = logps(2)
    w = grpo.sampler_correction(old, sampling, mask, "token_mask", 2.0)
    st = grpo.mismatch_stats(old, sampling, mask, w, 2.0)
    real = mask.bool() & ~torch.isnan(sampling)
    d = (old - sampling)[real]
    assert st["mismatch/logp_diff_mean"] == pytest.approx(float(d.abs().mean()))
    assert st["mismatch/logp_diff_max"] == pytest.approx(float(d.abs().max()))
    assert st["mismatch/token_outside_frac"] == pytest.approx(float((torch.exp(d) > 2.0).float().mean()))
    assert 0 < st["mismatch/token_outside_frac"] < 1
