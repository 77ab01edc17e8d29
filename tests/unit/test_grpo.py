"""The GRPO maths against hand computations (vlgrpo.algo.grpo).

The advantage estimators (rloo, reinforce_pp, GDPO) and the CISPO / SAPO token losses against the papers'
definitions written out in plain Python, next to how verl 0.8 writes them.

GSPO weights, the high-entropy mask, truncation masking and reference mixing: the tensor-level properties
are checked by hand; the entropy mask and the reference mixing against TRL 1.16's own functions
(``GRPOTrainer.get_high_entropy_mask`` on a real ``Accelerator``, ``SyncRefModelCallback``). Loss/gradient
equality with TRL's ``compute_loss`` on a real model is in test_trl_equivalence.py.
"""
import math
import types

import pytest
import torch

from vlgrpo.algo import grpo

NAN = float("nan")


def test_total_rewards_ignores_none_and_marks_unscorable():
    per = torch.tensor([[1.0, 0.5], [NAN, 1.0], [NAN, NAN]])
    r = grpo.total_rewards(per, torch.tensor([1.0, 0.1]))
    assert r[0].item() == pytest.approx(1.05)
    assert r[1].item() == pytest.approx(0.1)
    assert math.isnan(r[2].item())


def test_group_advantages_by_hand():
    # group 1: rewards 1, 0 → mean 0.5, sample std sqrt(0.5) ; group 2: all 2 → std 0, advantage 0
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    adv, std = grpo.group_advantages(r, num_generations=2, scale_rewards="group")
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0])
    assert std.tolist() == pytest.approx([s, s, 0.0, 0.0])
    assert grpo.frac_zero_std(std) == 0.5


def test_group_advantages_batch_and_none():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    adv, std = grpo.group_advantages(r, 2, "batch")
    bstd = torch.tensor([1.0, 0.0, 2.0, 2.0]).std().item()        # Bessel-corrected, 0.9574
    assert std.tolist() == pytest.approx([bstd] * 4)
    assert adv.tolist() == pytest.approx([0.5 / (bstd + 1e-4), -0.5 / (bstd + 1e-4), 0.0, 0.0])
    adv, _ = grpo.group_advantages(r, 2, "none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_group_advantages_ignore_nan_rewards():
    # group of 3 with one None: mean/std over the two others; the None completion gets advantage 0
    r = torch.tensor([3.0, NAN, 1.0])
    adv, std = grpo.group_advantages(r, 3, "group")
    s = math.sqrt(2.0)                                             # std of (3, 1) with Bessel
    assert adv.tolist() == pytest.approx([1 / (s + 1e-4), 0.0, -1 / (s + 1e-4)])
    assert std[0].item() == pytest.approx(s)


def test_group_advantages_rejects_ragged():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo.group_advantages(torch.zeros(5), 2)


def test_selective_log_softmax_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])    # (1, 2, 2)
    idx = torch.tensor([[1, 0]])
    lp = grpo.selective_log_softmax(logits, idx)
    assert lp.tolist()[0] == pytest.approx([math.log(0.75), math.log(0.5)])
    # temperature 2 halves the logits: p = softmax(0, log(3)/2) = (1, √3) / (1 + √3)
    lp2 = grpo.selective_log_softmax(logits, idx, temperature=2.0)
    assert lp2[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))
    h = grpo.entropy_from_logits(logits)
    assert h.tolist()[0] == pytest.approx([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)])


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)                                         # ρ = 1.5, 0.5, 1.1
    loss, ratio = grpo.clipped_surrogate(logp, old, torch.tensor([2.0]), 0.2, 0.3)
    # A > 0: min(ρA, clip(ρ)A) = A·min(ρ, clip(ρ)) → 1.3·2, 0.5·2, 1.1·2
    assert loss.tolist()[0] == pytest.approx([-2.6, -1.0, -2.2])
    loss, _ = grpo.clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.3)
    # A < 0: −min(−ρ, −clip(ρ)) = max(ρ, clip(ρ)) → 1.5, 0.8, 1.1
    assert loss.tolist()[0] == pytest.approx([1.5, 0.8, 1.1])
    assert ratio.tolist()[0] == pytest.approx([1.5, 0.5, 1.1])


def test_clipped_surrogate_on_policy_gradient_is_minus_advantage():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo.clipped_surrogate(logp, logp.detach(), torch.tensor([0.7]), 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.7, -0.7])


def test_k3_kl_by_hand_and_clamp():
    logp = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.5), math.log(0.25), -100.0]])
    kl = grpo.k3_kl(logp, ref)
    d = math.log(0.5)                                               # ref − logp for token 2
    assert kl[0, 0].item() == pytest.approx(0.0)
    assert kl[0, 1].item() == pytest.approx(math.exp(d) - d - 1)
    assert kl[0, 2].item() == pytest.approx(math.exp(-20) + 20 - 1)  # clamped to −20


def test_per_token_loss_adds_beta_kl_and_requires_ref():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    loss, ratio, kl = grpo.per_token_loss(logp, None, ref, torch.tensor([1.0]), 0.2, 0.2, beta=0.1)
    d = math.log(0.5)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * (math.exp(d) - d - 1))
    assert ratio.item() == 1.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.per_token_loss(logp, None, None, torch.tensor([1.0]), 0.2, 0.2, beta=0.1)
    _, _, kl0 = grpo.per_token_loss(logp, None, None, torch.tensor([1.0]), 0.2, 0.2, beta=0.0)
    assert kl0 is None


# token losses of 2 sequences: seq 0 has 3 real tokens (1, 2, 3), seq 1 has 1 real token (4) and 2 pads
TL = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", (2.0 + 4.0) / 2),        # mean of the per-sequence means
    ("bnpo", 10.0 / 4),               # token mean
    ("dr_grpo", 10.0 / (2 * 5)),      # / (B × max_completion_length=5)
    ("dapo", 10.0 / 20),              # / tokens in the whole generation batch (20, given)
    ("sapo", (2.0 + 4.0) / 2),        # as grpo (TRL 1.16, verl 0.8)
    ("cispo", 10.0 / 20),             # as dapo (TRL 1.16)
])
def test_aggregation_by_hand(loss_type, expected):
    norm = grpo.loss_normalizer(loss_type, num_sequences=2, num_tokens=4, global_num_tokens=20,
                                max_completion_length=5)
    assert grpo.aggregate_loss(TL, MASK, loss_type, norm).item() == pytest.approx(expected)


def test_dapo_normalizer_divides_by_processes():
    # DDP averages gradients over processes, so each process divides by global/num_processes
    assert grpo.loss_normalizer("dapo", num_sequences=1, num_tokens=1, global_num_tokens=40,
                                max_completion_length=1, num_processes=2) == 20.0


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_micro_batches_sum_to_full_batch(loss_type):
    kw = dict(num_sequences=2, num_tokens=4, global_num_tokens=4, max_completion_length=3)
    norm = grpo.loss_normalizer(loss_type, **kw)
    full = grpo.aggregate_loss(TL, MASK, loss_type, norm)
    parts = sum(grpo.aggregate_loss(TL[i:i + 1], MASK[i:i + 1], loss_type, norm) for i in range(2))
    assert parts.item() == pytest.approx(full.item())


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        grpo.loss_numerator(TL, MASK, "ppo")


def test_clip_indicators_and_masked_means():
    ratio = torch.tensor([[0.5, 1.5, 1.0], [0.5, 1.5, 1.0]])
    adv = torch.tensor([-1.0, 1.0])
    ind = grpo.clip_indicators(ratio, adv, 0.2, 0.2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # low: only (0,0) [ρ<0.8, A<0]; high: only (1,1) [ρ>1.2, A>0]; 5 real tokens
    assert grpo.masked_sum_count(ind["clip_ratio/low_mean"], mask) == (1.0, 5.0)
    assert grpo.masked_sum_count(ind["clip_ratio/high_mean"], mask) == (1.0, 5.0)
    assert grpo.masked_sum_count(ind["clip_ratio/region_mean"], mask) == (2.0, 5.0)


def test_lr_schedule_warmup_then_cosine():
    assert grpo.warmup_steps_for(60, 0.05) == 3
    assert [grpo.lr_multiplier(s, 10, 3) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert grpo.lr_multiplier(3, 10, 3) == pytest.approx(1.0)
    # halfway through the decay: ½(1 + cos(π/2)) = 0.5 ; at the end: 0
    assert grpo.lr_multiplier(3 + 7 / 2, 10, 3) == pytest.approx(0.5)
    assert grpo.lr_multiplier(10, 10, 3) == pytest.approx(0.0)
    assert grpo.lr_multiplier(0, 10, 0) == pytest.approx(1.0)


N, T = 6, 5


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(N, T, generator=g) * 3).requires_grad_(True)
    # per-sequence shifts put some sequence ratios outside [1−ε, 1+ε] on the clipped side of their advantage
    shift = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.05, 0.0]).unsqueeze(1)
    old = logp.detach() - shift + 0.1 * torch.randn(N, T, generator=g)
    mask = torch.ones(N, T)
    mask[1, 2:] = 0
    mask[4, 1:] = 0
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.1])
    return logp, old, mask, adv


def test_sequence_weight_is_the_length_normalised_log_ratio(tensors):
    logp, old, mask, _ = tensors
    w = grpo.log_importance_weights(logp.detach(), old, mask, "sequence")
    assert w.shape == (N, 1)
    for i in range(N):
        n = int(mask[i].sum())
        assert w[i, 0].item() == pytest.approx(float((logp.detach()[i, :n] - old[i, :n]).mean()), abs=1e-6)
    # one-token completions: sequence and token level coincide
    one = torch.zeros(N, T)
    one[:, 0] = 1
    ws = grpo.log_importance_weights(logp, old, one, "sequence")
    wt = grpo.log_importance_weights(logp, old, one, "token")
    assert torch.allclose(ws[:, 0], wt[:, 0])


def test_gspo_token_value_is_sequence_and_gradient_is_per_token(tensors):
    """GSPO-token: ρ_it = sg[s_i]·π/sg[π]; value s_i, ∂ℓ_it/∂logp_it = −A_i·s_i (unclipped), 0 when clipped."""
    logp, old, mask, adv = tensors
    wide = grpo.LossSpec(epsilon_low=0.99, epsilon_high=100.0, beta=0.0, importance_sampling_level="sequence")
    seq_loss, seq_ratio, _ = grpo.policy_token_loss(logp, old, None, adv, mask, wide)
    tok_spec = grpo.LossSpec(0.99, 100.0, 0.0, "sequence_token")
    tl, ratio, _ = grpo.policy_token_loss(logp, old, None, adv, mask, tok_spec)
    assert torch.allclose(ratio * mask, seq_ratio * mask) and torch.allclose(tl * mask, seq_loss * mask)
    total = grpo.aggregate_loss(tl, mask, "dapo", float(mask.sum()))
    (grad,) = torch.autograd.grad(total, logp)
    s = seq_ratio[:, :1].detach()
    want = -adv.unsqueeze(1) * s * mask / mask.sum()
    assert torch.allclose(grad, want, atol=1e-6)
    # with the usual ε the clipped sequences get no gradient at all
    spec = grpo.LossSpec(0.2, 0.2, 0.0, "sequence_token")
    tl, ratio, _ = grpo.policy_token_loss(logp, old, None, adv, mask, spec)
    (grad,) = torch.autograd.grad(grpo.aggregate_loss(tl, mask, "dapo", float(mask.sum())), logp)
    a = adv.unsqueeze(1)
    clipped = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    assert clipped.any() and (~clipped & mask.bool()).any()
    assert torch.all(grad[clipped] == 0)
    assert torch.all(grad[~clipped & mask.bool()] != 0)


def test_on_policy_all_levels_have_the_same_gradient(tensors):
    logp, _, mask, adv = tensors
    grads = {}
    for level in grpo.IMPORTANCE_SAMPLING_LEVELS:
        spec = grpo.LossSpec(0.2, 0.28, 0.0, level)
        tl, ratio, _ = grpo.policy_token_loss(logp, None, None, adv, mask, spec)
        assert torch.allclose(ratio, torch.ones_like(ratio))
        (grads[level],) = torch.autograd.grad(grpo.aggregate_loss(tl, mask, "grpo", N), logp)
    assert torch.allclose(grads["sequence"], grads["token"], atol=1e-7)
    assert torch.allclose(grads["sequence_token"], grads["token"], atol=1e-7)


def test_unknown_level_is_refused(tensors):
    logp, old, mask, _ = tensors
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.log_importance_weights(logp, old, mask, "tokens")


def test_keep_mask_removes_only_the_policy_term(tensors):
    logp, old, mask, adv = tensors
    ref = old - 0.1
    spec = grpo.LossSpec(0.2, 0.2, 0.04)
    full, _, kl = grpo.policy_token_loss(logp, old, ref, adv, mask, spec)
    keep = torch.zeros(N, T, dtype=torch.bool)
    keep[0, 0] = True
    part, _, _ = grpo.policy_token_loss(logp, old, ref, adv, mask, spec, keep=keep)
    assert torch.allclose(part[0, 0], full[0, 0])
    assert torch.allclose(part[~keep], (0.04 * kl)[~keep])


def _trl_entropy_mask(entropies, mask, quantile):
    from accelerate import Accelerator
    from trl import GRPOTrainer

    host = types.SimpleNamespace(accelerator=Accelerator(cpu=True))
    return GRPOTrainer.get_high_entropy_mask(host, entropies, mask, 1 - quantile)


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_high_entropy_mask_equals_trl(tensors, quantile):
    _, _, mask, _ = tensors
    ent = torch.rand(N, T, generator=torch.Generator().manual_seed(5)) * 2
    ours = grpo.high_entropy_mask(ent, mask, quantile)
    trl = _trl_entropy_mask(ent, mask, quantile)
    assert torch.equal(ours, trl)
    kept = int(ours.sum())
    real = int(mask.sum())
    assert (kept == real) if quantile == 1.0 else (1 <= kept < real)
    assert not (ours & ~mask.bool()).any()


def test_drop_truncated_zeroes_whole_completions(tensors):
    _, _, mask, _ = tensors
    term = torch.tensor([True, False, True, True, False, True])
    out = grpo.drop_truncated(mask, term)
    assert torch.equal(out[term], mask[term])
    assert out[~term].sum() == 0


def test_reference_mixing_equals_trl_sync():
    from trl.trainer.callbacks import SyncRefModelCallback

    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref_a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref_b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref_b.load_state_dict(ref_a.state_dict())
    before = [p.clone() for p in ref_a.parameters()]
    grpo.mix_into_reference(policy, ref_a, 0.6)
    SyncRefModelCallback._sync_target_model(policy, ref_b, 0.6)
    for a, b, p0, p in zip(ref_a.parameters(), ref_b.parameters(), before, policy.parameters()):
        assert torch.equal(a, b)
        assert torch.allclose(a, 0.6 * p + 0.4 * p0)


def test_informative_groups():
    nan = float("nan")
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, nan, nan, 0.5, nan])
    assert grpo.informative_groups(r, 2).tolist() == [False, True, False, False, False]
    # agrees with the zero-std count the metrics stream logs
    _, std = grpo.group_advantages(r, 2)
    assert grpo.frac_zero_std(std) == pytest.approx(1 - grpo.informative_groups(r, 2).float().mean().item())


# ---------------------------------------------------------------------------------- advantage estimators

R8 = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2]      # two groups of four


def _groups(r, g):
    return [r[i:i + g] for i in range(0, len(r), g)]


def test_rloo_by_hand_from_the_paper():
    """RLOO (Ahmadian et al. 2024, eq. for the k-sample estimator): A_i = r_i − 1/(k−1) Σ_{j≠i} r_j."""
    adv = grpo.rloo_advantages(torch.tensor(R8), 4)
    want = [r - (sum(grp) - r) / 3 for grp in _groups(R8, 4) for r in grp]
    assert adv.tolist() == pytest.approx(want)
    assert adv[:4].tolist() == pytest.approx([0.5, -5 / 6, -1 / 6, 0.5])          # written out for group 1
    # verl 0.8 compute_rloo_outcome_advantage writes the same as G/(G−1)·(r − mean): no std
    mean = torch.tensor(R8).view(2, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(adv, 4 / 3 * (torch.tensor(R8) - mean))
    # None rewards neither count as a sample nor get a signal; a group with one reward left gets 0
    adv = grpo.rloo_advantages(torch.tensor([1.0, NAN, 0.0, 0.5, 1.0, NAN, NAN, NAN]), 4)
    assert adv.tolist() == pytest.approx([1 - 0.25, 0.0, 0 - 0.75, 0.5 - 0.5, 0.0, 0.0, 0.0, 0.0])


def test_reinforce_pp_by_hand_from_the_paper():
    """REINFORCE++-baseline (Hu et al. 2025): subtract the group mean, then normalise over the global batch."""
    import statistics
    centred = [r - statistics.mean(grp) for grp in _groups(R8, 4) for r in grp]
    m, sd = statistics.mean(centred), statistics.stdev(centred)
    want = [(c - m) / (sd + 1e-4) for c in centred]
    adv = grpo.reinforce_pp_advantages(torch.tensor(R8), 4)
    assert adv.tolist() == pytest.approx(want, abs=1e-6)
    # unlike GRPO, a group's spread is kept: the low-variance group gets smaller advantages
    g_adv, _ = grpo.group_advantages(torch.tensor(R8), 4)
    assert abs(adv[4:]).sum() < abs(adv[:4]).sum() and not torch.allclose(adv, g_adv, atol=1e-2)


def test_gdpo_by_hand_from_the_paper():
    """GDPO (Liu et al. 2026): each reward normalised in its group, weighted sum, then batch normalisation."""
    import statistics
    per = [[1.0, 0.2], [0.0, 0.4], [0.5, 0.9], [1.0, 0.1], [0.0, 0.03], [0.0, 0.03], [1.0, 0.03], [0.2, 0.06]]
    w = [1.0, 0.5]
    normed = [[0.0] * 2 for _ in per]
    for k in range(2):
        for g in range(2):
            col = [per[i][k] for i in range(g * 4, g * 4 + 4)]
            mu, sd = statistics.mean(col), statistics.stdev(col)
            for i in range(4):
                normed[g * 4 + i][k] = (col[i] - mu) / (sd + 1e-4)
    s = [sum(wk * n for wk, n in zip(w, row)) for row in normed]
    want = [(x - statistics.mean(s)) / (statistics.stdev(s) + 1e-4) for x in s]
    adv, std = grpo.compute_advantages(torch.tensor(per), torch.tensor(w), 4, "grpo", "gdpo")
    assert adv.tolist() == pytest.approx(want, abs=1e-5)
    # the second reward's tiny scale in group 2 no longer vanishes under the first's
    assert std.tolist() == pytest.approx(grpo.group_advantages(grpo.total_rewards(torch.tensor(per),
                                                                                  torch.tensor(w)), 4)[1].tolist())


def test_compute_advantages_dispatches_and_refuses_mixed_scaling():
    per, w = torch.tensor(R8).unsqueeze(1), torch.tensor([1.0])
    assert torch.equal(grpo.compute_advantages(per, w, 4, "rloo")[0], grpo.rloo_advantages(torch.tensor(R8), 4))
    assert torch.equal(grpo.compute_advantages(per, w, 4, "grpo", "none")[0],
                       grpo.group_advantages(torch.tensor(R8), 4, "none")[0])
    with pytest.raises(ValueError, match="does not apply to 'rloo'"):
        grpo.compute_advantages(per, w, 4, "rloo", "batch")
    assert torch.equal(grpo.compute_advantages(per, w, 4, "reinforce_pp", "batch")[0],
                       grpo.compute_advantages(per, w, 4, "reinforce_pp", "group")[0])
    with pytest.raises(ValueError, match="advantage_estimator"):
        grpo.compute_advantages(per, w, 4, "ppo")


# ----------------------------------------------------------------------------------------- cispo / sapo


def test_cispo_by_hand_weight_clipped_and_detached():
    """CISPO (MiniMax-M1 eq. 4): −sg[clip(ρ, 1−ε_low, 1+ε_high)]·A·logπ; the gradient in logπ is the clipped
    weight times −A even where PPO's clip would have zeroed it."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -0.5]])                # ρ = e^0.5 (clipped to 1.28), e^-1, 1
    ratio = torch.exp(logp - old)
    a = torch.tensor([[2.0]])
    loss = grpo.cispo_token_loss(logp, ratio, a, 0.2, 0.28)
    w = [min(max(math.exp(0.5), 0.8), 1.28), min(max(math.exp(-1.0), 0.8), 1.28), 1.0]
    assert loss[0].tolist() == pytest.approx([-wi * 2.0 * lp for wi, lp in zip(w, [-1.0, -2.0, -0.5])])
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.0 * wi for wi in w])


def test_sapo_by_hand_gate():
    """SAPO: −(4/τ)·σ(τ(ρ−1))·A with τ_pos for A > 0, τ_neg otherwise; slope 1 at ρ = 1, flatter away from 1."""
    ratio = torch.tensor([[1.0, 1.5], [1.0, 0.5]], requires_grad=True)
    a = torch.tensor([[1.0], [-1.0]])
    loss = grpo.sapo_token_loss(ratio, a, 1.0, 1.05)
    sig = lambda x: 1 / (1 + math.exp(-x))                   # noqa: E731
    want = [[-4 * sig(0.0), -4 * sig(0.5)], [4 / 1.05 * sig(0.0), 4 / 1.05 * sig(1.05 * -0.5)]]
    assert loss.flatten().tolist() == pytest.approx([x for row in want for x in row])
    loss.sum().backward()
    g = ratio.grad
    assert g[0, 0].item() == pytest.approx(-1.0) and g[1, 0].item() == pytest.approx(1.0)   # on-policy: ∓A
    assert abs(g[0, 1].item()) < 1.0 and abs(g[1, 1].item()) < 1.0                          # gated off-policy
