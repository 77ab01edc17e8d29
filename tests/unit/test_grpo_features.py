"""GSPO weights, the high-entropy mask, truncation masking and reference mixing (vlgrpo.algo.grpo).

The tensor-level properties are checked by hand; the entropy mask and the reference mixing against TRL 1.16's
own functions (``GRPOTrainer.get_high_entropy_mask`` on a real ``Accelerator``, ``SyncRefModelCallback``).
Loss/gradient equality with TRL's ``compute_loss`` on a real model is in test_trl_equivalence.py.
"""
import types

import pytest
import torch

from vlgrpo.algo import grpo

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
