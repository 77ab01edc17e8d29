"""The GRPO maths as small pure tensor functions (docs/architecture.md, "The GRPO maths as implemented").

Notation: a step samples G completions o_1..o_G for each prompt q; N = P*G completions in all, each of at most
T completion tokens; ``mask`` (N, T) is 1 on real completion tokens and 0 on padding.

    r_i     = Σ_k w_k R_k(q, o_i)                       rewards that are None are left out of the sum
    A_i     = (r_i − mean_group(r)) / (std_group(r) + 1e-4)
    ρ_i,t   = exp(logπθ(o_i,t) − logπold(o_i,t))           importance_sampling_level "token" (default)
    s_i     = exp(mean_t (logπθ − logπold))                  "sequence" (GSPO): ρ_i,t := s_i for every t
    ρ_i,t   = sg[s_i] · πθ(o_i,t) / sg[πθ(o_i,t)]             "sequence_token" (GSPO-token): value s_i,
                                                                gradient per token
    ℓ_i,t   = −min(ρ·A_i, clip(ρ, 1−ε_low, 1+ε_high)·A_i) + β·KL_i,t
    KL_i,t  = exp(ref − logp) − (ref − logp) − 1        (k3 estimator; ref − logp clamped to ±20)

    cispo:  ℓ_i,t = −sg[clip(ρ, 1−ε_low, 1+ε_high)]·A_i·logπθ(o_i,t) + β·KL   (MiniMax-M1: the weight is clipped,
                                                                               never the gradient)
    sapo:   ℓ_i,t = −(4/τ)·σ(τ(ρ − 1))·A_i + β·KL,  τ = τ_pos if A_i > 0 else τ_neg   (a soft gate for the clip)

and the per-token losses are aggregated by ``loss_type`` (see :func:`loss_numerator` / :func:`loss_normalizer`).
The advantage can also come from RLOO's leave-one-out baseline, REINFORCE++'s batch normalisation or GDPO's
per-reward normalisation (:func:`compute_advantages`).

How this departs from the textbook: nothing in the maths; the one engineering choice is that every
aggregation is written as ``numerator(micro-batch) / normalizer(whole step)``, so the gradient of k
accumulated micro-batches is exactly the gradient of the whole batch (the normaliser is a count over the
step, passed in, never recomputed per micro-batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ScaleRewards = Literal["group", "batch", "none", "gdpo"]
AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp"]
ImportanceSamplingLevel = Literal["token", "sequence", "sequence_token"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")     # the clipped surrogate, aggregated four ways
SCALE_REWARDS = ("group", "batch", "none", "gdpo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
OWN_SCALING = {"rloo": "none", "reinforce_pp": "batch"}   # the estimators that fix their own reward scaling
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
STD_EPS = 1e-4        # added to the std before dividing (TRL and the DeepSeekMath paper use the same)
KL_LOG_CLAMP = 20.0   # |ref − logp| is clamped here so exp() cannot overflow in low precision


# --------------------------------------------------------------------------------------------- rewards


def total_rewards(per_reward: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r_i = Σ_k w_k R_ik over the rewards that apply (NaN = None = not applicable).

    per_reward: (N, K) with NaN where a reward returned None; weights: (K,). Returns (N,); a completion for which
    no reward applies gets NaN (it is then left out of the group statistics and gets advantage 0).
    """
    applicable = ~torch.isnan(per_reward)                                  # (N, K)
    r = torch.where(applicable, per_reward * weights, torch.zeros_like(per_reward)).sum(dim=1)  # (N,)
    return torch.where(applicable.any(dim=1), r, torch.full_like(r, float("nan")))


def nan_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected, like TRL's ``nanstd``) ignoring NaN; 0 below two values."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)                       # values that count
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.nan_to_num((x - mean) ** 2, nan=0.0).sum(dim=dim, keepdim=True)
    var = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq))
    return var.sqrt().squeeze(dim)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards = "group",
                     eps: float = STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i − mean_group(r)) / (std(r) + eps); returns (advantages (N,), std used per completion (N,)).

    rewards: (N,) ordered group by group (completions of prompt p are rows p*G .. p*G+G-1); NaN rewards are
    ignored in the mean and std and their advantage is 0. ``scale_rewards``: ``group`` divides by the group's
    std, ``batch`` by the std of the whole batch, ``none`` does not divide (Dr. GRPO). The returned std is the
    group std for ``group``/``none`` (used to count zero-std groups) and the batch std for ``batch``.
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be (N,) with N a multiple of num_generations={num_generations}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, num_generations)                            # (P, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    if scale_rewards == "batch":
        std = nan_std(rewards).expand_as(rewards)                          # (N,)
    elif scale_rewards in ("group", "none"):
        std = nan_std(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0), std


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): A_i = r_i − mean_{j≠i} r_j over the group's other
    completions, not divided by any std (as the paper; verl 0.8 ``compute_rloo_outcome_advantage`` writes the
    same as G/(G−1)·(r_i − mean)). NaN rewards count neither as a sample nor in a baseline and get
    advantage 0; a group with fewer than two rewards gets 0. (N,) → (N,)."""
    grouped = rewards.view(-1, num_generations)                            # (P, G)
    ok = ~torch.isnan(grouped)
    n = ok.sum(dim=1, keepdim=True)                                        # rewards that count per group
    total = torch.where(ok, grouped, torch.zeros_like(grouped)).sum(dim=1, keepdim=True)
    baseline = (total - grouped) / (n - 1).clamp(min=1)                    # mean of the others
    adv = torch.where(ok & (n > 1), grouped - baseline, torch.zeros_like(grouped))
    return adv.reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, num_generations: int, eps: float = STD_EPS) -> torch.Tensor:
    """REINFORCE++ with the group baseline (Hu et al. 2025, "REINFORCE++", the outcome-reward variant; verl 0.8
    ``reinforce_plus_plus_baseline``, ms-swift 4's ``reinforce_plus_plus``): subtract the group mean, then
    normalise over the whole batch: A = (c − mean_batch(c)) / (std_batch(c) + eps), c_i = r_i − mean_group(r).

    The batch statistics are over completions (each completion one sample), as ms-swift 4.6
    (``rl_core/advantage.py``: the centred rewards over their batch std + 1e-4; their batch mean is 0 already,
    every group's centred rewards summing to 0, unless some are NaN); verl whitens the same centred rewards
    over tokens, which weights a completion by its length. NaN rewards are left out and get 0.
    """
    grouped = rewards.view(-1, num_generations)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)   # (N,)
    adv = (centred - torch.nanmean(centred)) / (nan_std(centred) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def gdpo_advantages(per_reward: torch.Tensor, weights: torch.Tensor, num_generations: int,
                    eps: float = STD_EPS) -> torch.Tensor:
    """GDPO (Liu et al. 2026, "Group reward-Decoupled Normalization"): each reward is normalised within its
    group first, (R_ik − mean_group(R_k)) / (std_group(R_k) + eps), the normalised rewards are summed with
    their weights, and the sum is normalised over the batch, (s − mean(s)) / (std(s) + eps). TRL 1.16's
    ``multi_objective_aggregation="normalize_then_sum"``, ms-swift 4's ``scale_rewards: gdpo``.

    per_reward (N, K) with NaN where a reward did not apply (left out of its statistics and of the sum);
    a completion no reward applies to gets 0. Returns (N,).
    """
    N, K = per_reward.shape
    grouped = per_reward.view(-1, num_generations, K)                      # (P, G, K)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nan_std(grouped, dim=1).unsqueeze(1)                           # (P, 1, K)
    normed = ((grouped - mean_k) / (std_k + eps)).view(N, K)
    s = total_rewards(normed, weights)                                     # NaN where nothing applied
    adv = (s - torch.nanmean(s)) / (nan_std(s) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def compute_advantages(per_reward: torch.Tensor, weights: torch.Tensor, num_generations: int,
                       estimator: AdvantageEstimator = "grpo", scale_rewards: ScaleRewards = "group",
                       eps: float = STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantages (N,) of ``train.advantage_estimator`` / ``train.scale_rewards`` from the per-reward
    scores (N, K) of the whole step, and the std (N,) that counts the tied groups (``frac_reward_zero_std``:
    the group std of the weighted total, whatever the estimator; the batch std for ``scale_rewards: batch``).

    grpo + group / batch / none: :func:`group_advantages` of the weighted total; grpo + gdpo:
    :func:`gdpo_advantages`; rloo: :func:`rloo_advantages`; reinforce_pp: :func:`reinforce_pp_advantages`.
    These two have their own scaling - none for rloo, the batch std for reinforce_pp (ms-swift 4's defaults
    for them) - so they take that ``scale_rewards`` value or ``group``, the shared default, which they read
    as their own.
    """
    total = total_rewards(per_reward, weights)
    if estimator == "grpo":
        if scale_rewards == "gdpo":
            _, std = group_advantages(total, num_generations, "group", eps)
            return gdpo_advantages(per_reward, weights, num_generations, eps), std
        return group_advantages(total, num_generations, scale_rewards, eps)
    if scale_rewards not in ("group", OWN_SCALING.get(estimator)):
        raise ValueError(f"scale_rewards {scale_rewards!r} does not apply to {estimator!r}, which scales "
                         f"{OWN_SCALING.get(estimator)!r} (leave scale_rewards at group or set that)")
    _, std = group_advantages(total, num_generations, "group", eps)
    if estimator == "rloo":
        return rloo_advantages(total, num_generations), std
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(total, num_generations, eps), std
    raise ValueError(f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {estimator!r}")


def informative_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per group (P,) bool: do its G rewards differ? A group whose rewards all tie (or are all NaN) has
    advantage 0 for every completion - no learning signal - and is what dynamic sampling drops."""
    std = nan_std(rewards.view(-1, num_generations), dim=1)
    return ~torch.isclose(std, torch.zeros_like(std))


def frac_zero_std(std: torch.Tensor) -> float:
    """Fraction of completions whose group had all-equal rewards (zero advantage: no learning signal)."""
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()


# ------------------------------------------------------------------------------------- token log-probs


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[index], without keeping the (B, T, V) log-softmax around.

    logits: (B, T, V); index: (B, T) token ids. Returns (B, T). logsumexp is taken row by row over the batch so
    the peak memory is one (T, V) slice rather than the whole (B, T, V) tensor a second time.
    """
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)  # (B, T)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])          # (B, T)
    return picked - lse


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = −Σ_v p_v log p_v of softmax(logits / temperature); (B, T, V) → (B, T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# ------------------------------------------------------------------------------------ per-token losses


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) per token; returns (loss (N, T), ρ (N, T)).

    logp / old_logp: (N, T); advantages: (N,). With one optimisation pass per generation (num_iterations 1)
    old_logp is logp.detach(), so ρ = 1 in value but its gradient is ∇logp.
    """
    ratio = torch.exp(logp - old_logp)                                     # ρ (N, T)
    a = advantages.unsqueeze(1)                                            # (N, 1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a
    return -torch.min(unclipped, clipped), ratio


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = KL_LOG_CLAMP) -> torch.Tensor:
    """KL ≈ exp(ref − logp) − (ref − logp) − 1 per token (k3: unbiased, always ≥ 0); (N, T) → (N, T)."""
    d = torch.clamp(ref_logp - logp, -clamp, clamp)
    return torch.exp(d) - d - 1.0


def log_importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                           level: ImportanceSamplingLevel = "token") -> torch.Tensor:
    """log ρ per token (N, T) for ``level`` token; (N, 1) for sequence and sequence_token.

    sequence (GSPO, TRL's ``importance_sampling_level="sequence"``): the length-normalised log-ratio of the
    whole completion, one weight per sequence. sequence_token (GSPO-token, ms-swift's name): the same value,
    but written ``logp − sg[logp] + sg[seq]`` so each token keeps its own gradient path (it returns (N, T)).
    """
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    m = mask.to(log_ratio.dtype)
    seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)   # (N, 1)
    if level == "sequence":
        return seq
    if level == "sequence_token":
        return logp - logp.detach() + seq.detach()
    raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                     f"got {level!r}")


@dataclass(frozen=True)
class LossSpec:
    """The per-token loss settings (``train.*`` of the same names)."""
    epsilon_low: float
    epsilon_high: float
    beta: float
    importance_sampling_level: ImportanceSamplingLevel = "token"
    loss_type: LossType = "grpo"             # cispo / sapo change the per-token term; the rest aggregate it
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


def policy_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                      advantages: torch.Tensor, mask: torch.Tensor, spec: LossSpec,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ℓ = keep · clipped surrogate(ρ at ``spec.importance_sampling_level``) + β·KL, as TRL composes it.

    ``mask`` (N, T) is needed for the sequence-level weights; ``keep`` (N, T) bool or float, optional: the
    weight of each token's policy term (the high-entropy mask, times the sampler correction's importance
    weights when a rollout engine sampled); the KL term applies to every token either way (TRL does the
    same). Returns (ℓ (N, T), ρ (N, T) - a sequence weight repeated over its tokens -, KL (N, T) or None).
    """
    if old_logp is None:                                                   # on-policy: ρ ≡ 1 in value
        old_logp = logp.detach()
    ratio = torch.exp(log_importance_weights(logp, old_logp, mask, spec.importance_sampling_level))
    a = advantages.unsqueeze(1)                                            # (N, 1)
    if spec.loss_type == "cispo":
        loss = cispo_token_loss(logp, ratio, a, spec.epsilon_low, spec.epsilon_high)
    elif spec.loss_type == "sapo":
        loss = sapo_token_loss(ratio, a, spec.sapo_temperature_pos, spec.sapo_temperature_neg).expand_as(logp)
    else:
        clipped = torch.clamp(ratio, 1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high)
        loss = -torch.min(ratio * a, clipped * a).expand_as(logp)          # (N, T)
    if keep is not None:
        loss = loss * keep.to(loss.dtype)
    kl = None
    if spec.beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
        kl = k3_kl(logp, ref_logp)
        loss = loss + spec.beta * kl
    return loss, ratio.expand_as(logp), kl


def cispo_token_loss(logp: torch.Tensor, ratio: torch.Tensor, a: torch.Tensor, epsilon_low: float,
                     epsilon_high: float) -> torch.Tensor:
    """CISPO (MiniMax-M1, 2025): −sg[clip(ρ, 1−ε_low, 1+ε_high)]·A·logπθ per token, (N, T).

    The importance weight is clipped and detached, the gradient always flows through logπθ, so no token
    loses its gradient to the clip (PPO's clip zeroes it). Bounds as verl 0.8 ``compute_policy_loss_cispo``
    (1 ± its clip ratios); TRL 1.16 caps ρ at its ``epsilon_high`` with no lower bound, which is
    ε_low = 1 here and TRL's epsilon_high = 1 + ε_high (the paper's ε_max = 5 is epsilon_high 4).
    """
    w = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high).detach()
    return -(w * a) * logp


def sapo_token_loss(ratio: torch.Tensor, a: torch.Tensor, temperature_pos: float,
                    temperature_neg: float) -> torch.Tensor:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): −(4/τ)·σ(τ(ρ − 1))·A per token, with
    τ = τ_pos where A > 0 and τ_neg otherwise (TRL 1.16 ``sapo_temperature_pos/neg``, verl 0.8 ``tau_pos/neg``).

    At ρ = 1 the gate's slope is 1, so on-policy the gradient is the plain policy gradient; as ρ leaves 1
    the gate flattens smoothly instead of cutting off, faster for the larger τ (negative advantages).
    """
    tau = torch.where(a > 0, torch.full_like(a, temperature_pos), torch.full_like(a, temperature_neg))
    return -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * a


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Tokens whose entropy is in the top ``quantile`` of the batch's completion tokens (bool (N, T)).

    The threshold is the (1 − quantile) quantile (linear interpolation) of the entropies of all real tokens,
    gathered over processes by ``gather`` (a function taking this process's 1-D tensor and returning all
    processes' values) - TRL's ``get_high_entropy_mask``: quantile 1.0 keeps everything, 0.0 only the
    highest-entropy token(s). Padding is never kept.
    """
    m = mask.bool()
    values = entropies[m].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropies * m.to(entropies.dtype) >= threshold) & m


def drop_truncated(mask: torch.Tensor, terminated: torch.Tensor) -> torch.Tensor:
    """``train.mask_truncated_completions``: completions that hit the length limit without a stop token get
    an all-zero mask (no loss, no tokens counted), like TRL's; (N, T), (N,) → (N, T)."""
    return mask * terminated.to(mask.dtype).unsqueeze(1)


@torch.no_grad()
def mix_into_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """TR-DPO reference update, in place: π_ref ← α·π_θ + (1 − α)·π_ref, parameter by parameter."""
    for ref_p, p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.mul_(1.0 - alpha).add_(p.detach().to(ref_p.dtype), alpha=alpha)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, epsilon_low: float, epsilon_high: float, beta: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ℓ = clipped surrogate + β·KL at token level; returns (ℓ (N, T), ρ (N, T), KL (N, T) or None when β = 0).
    The token-level case of :func:`policy_token_loss` (which the trainer calls)."""
    spec = LossSpec(epsilon_low, epsilon_high, beta, "token")
    return policy_token_loss(logp, old_logp, ref_logp, advantages, torch.ones_like(logp), spec)


# ---------------------------------------------------------------------------------------- aggregation


def loss_numerator(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType) -> torch.Tensor:
    """The part of the loss a micro-batch contributes before dividing by the step's normaliser.

    grpo, sapo: Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)   (each sequence's token mean, summed over sequences)
    bnpo, dr_grpo, dapo, cispo: Σ_i Σ_t ℓ_it m_it (all tokens summed)
    """
    m = mask.to(token_loss.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum()
    if loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        return (token_loss * m).sum()
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def loss_normalizer(loss_type: LossType, *, num_sequences: int, num_tokens: float, global_num_tokens: float,
                    max_completion_length: int, num_processes: int = 1) -> float:
    """What the summed numerators of one optimizer step are divided by.

    num_sequences / num_tokens: completions / completion tokens of this process's step batch (all its
    micro-batches); global_num_tokens: completion tokens of the whole generation batch over all processes.
        grpo, sapo:  num_sequences                    → mean over sequences of the per-sequence mean
        bnpo:        num_tokens                       → token mean over the local batch
        dr_grpo:     num_sequences × max_completion_length → a constant: no length bias
        dapo, cispo: global_num_tokens / num_processes → token mean over the whole generation batch (DDP
                                                         averages the processes' gradients, hence the ÷)
    (sapo and cispo aggregate as TRL 1.16 does them: like grpo and like dapo.)
    """
    if loss_type in ("grpo", "sapo"):
        return float(num_sequences)
    if loss_type == "bnpo":
        return max(float(num_tokens), 1.0)
    if loss_type == "dr_grpo":
        return float(num_sequences * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        return max(float(global_num_tokens), 1.0) / num_processes
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType,
                   normalizer: float) -> torch.Tensor:
    """Loss of one micro-batch = numerator / step normaliser; summing it over micro-batches gives the step loss."""
    return loss_numerator(token_loss, mask, loss_type) / normalizer


# -------------------------------------------------------------------------------------------- metrics


def masked_sum_count(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(Σ x·m, Σ m): token means are accumulated as sums and counts so micro-batches and processes combine."""
    m = mask.to(torch.float32)
    return float((x.detach().float() * m).sum()), float(m.sum())


def clip_indicators(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                    epsilon_high: float) -> dict[str, torch.Tensor]:
    """Tokens where clipping removed the gradient, named as TRL logs them (means over completion tokens).

    low: ρ < 1−ε_low with A < 0; high: ρ > 1+ε_high with A > 0; region: either.
    """
    a = advantages.unsqueeze(1)                                            # (N, 1)
    low = (ratio < 1.0 - epsilon_low) & (a < 0)
    high = (ratio > 1.0 + epsilon_high) & (a > 0)
    return {"clip_ratio/low_mean": low.float(), "clip_ratio/high_mean": high.float(),
            "clip_ratio/region_mean": (low | high).float()}


def loss_indicators(loss_type: LossType, ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                    epsilon_high: float) -> dict[str, torch.Tensor]:
    """The clip metrics of ``loss_type``: :func:`clip_indicators` for the clipped surrogate; for cispo
    ``cispo_clip_ratio`` (TRL's name: ρ > 1+ε_high with A > 0, where the weight was capped); none for sapo
    (nothing is clipped)."""
    if loss_type == "cispo":
        return {"cispo_clip_ratio": ((ratio > 1.0 + epsilon_high) & (advantages.unsqueeze(1) > 0)).float()}
    if loss_type == "sapo":
        return {}
    return clip_indicators(ratio, advantages, epsilon_low, epsilon_high)


def entropy_bonus(entropies: torch.Tensor, mask: torch.Tensor, num_micro_batches: int) -> torch.Tensor:
    """The mean token entropy of one micro-batch over ``mask``'s tokens, divided by the step's micro-batch
    count (TRL 1.16's ``entropy_coef`` term: subtracted from the loss times the coefficient, whatever the
    loss_type). Summed over micro-batches it is the mean of their token means - the step's token mean when
    they hold equally many tokens (as TRL, it depends on the cut otherwise)."""
    m = mask.to(entropies.dtype)
    return (entropies * m).sum() / m.sum().clamp(min=1.0) / num_micro_batches


# ------------------------------------------------------------------------------------------- schedule


def warmup_steps_for(max_steps: int, warmup_ratio: float) -> int:
    return math.ceil(max_steps * warmup_ratio)


def lr_multiplier(step: int, max_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over ``warmup_steps`` then cosine decay to 0 at ``max_steps`` (step counts from 0).

        s < W:  (s + 1) / (W + 1)        never exactly 0, so the first step already learns
        s ≥ W:  ½ (1 + cos(π (s − W) / (S − W)))
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sampler_correction(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float | None, floor: float | None = None) -> torch.Tensor:
    """Truncated importance sampling of the trainer/sampler mismatch (TRL's
    ``vllm_importance_sampling_correction``): the weight (N, T) of each token's policy term.

    ρ = π_trainer / π_sampler of a token (``token_*`` modes) or of a whole completion (``sequence_*``: the exp
    of its summed log-ratios, repeated over its tokens). ``*_truncate`` clips ρ to [floor, cap]; ``*_mask``
    sets ρ outside it to 0. Padding (``mask`` 0) and tokens the sampler gave no log-prob (NaN) count as a
    log-ratio of 0.
    """
    diff = torch.nan_to_num((trainer_logp - sampler_logp) * mask.to(trainer_logp.dtype), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=floor, max=cap)
    elif mode.endswith("mask"):
        lo = floor if floor is not None else -math.inf
        hi = cap if cap is not None else math.inf
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    else:
        raise ValueError(f"unknown importance sampling mode {mode!r}")
    return ratio.expand_as(trainer_logp)


def mismatch_stats(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None, cap: float | None, floor: float | None = None) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's over the real tokens: mean and max
    |log ratio|, and (with the correction's ``weights``) the weights' mean and the share of tokens whose
    ratio fell outside [floor, cap] (clipped or masked)."""
    m = mask.bool() & ~torch.isnan(sampler_logp)
    d = (trainer_logp - sampler_logp)[m].float()
    if d.numel() == 0:
        return {}
    out = {"mismatch/logp_diff_mean": float(d.abs().mean()), "mismatch/logp_diff_max": float(d.abs().max())}
    r = torch.exp(d)
    hi = cap if cap is not None else math.inf
    lo = floor if floor is not None else -math.inf
    out["mismatch/token_outside_frac"] = float(((r > hi) | (r < lo)).float().mean())
    if weights is not None:
        out["mismatch/is_weight_mean"] = float(weights[m].float().mean())
    return out
