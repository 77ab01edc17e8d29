"""The CISPO and SAPO losses, the entropy bonus and GDPO's per-reward normalisation against TRL 1.16's
``GRPOTrainer`` (the test-time oracle), on the fixtures of tests/unit/test_trl_equivalence.py.

Same tiny Qwen2.5-VL weights, prompts + images, sampled completions, advantages, reference and (noisy)
old-policy log-probs: TRL's ``compute_loss`` with ``loss_type`` cispo / sapo (or ``entropy_coef`` set) and our
``update_phase`` with the same ``train.*`` settings must give the same loss and the same gradient of every
parameter (fp32, 1e-5 on the plain and the shared-work path alike; measured: <= 2.4e-7) - on one batch,
under gradient accumulation, and with the step split between two processes as DDP does it.

CISPO's clip: TRL caps the weight at its ``epsilon_high`` with no lower bound; ours clips to
[1 - epsilon_low, 1 + epsilon_high] (verl's), so TRL's epsilon_high 1.28 is ours epsilon_low 1.0, epsilon_high
0.28. GDPO: TRL's ``multi_objective_aggregation="normalize_then_sum"`` advantages come out of its own
``_generate_and_score_completions`` with real reward functions that return fixed scores (one of them None).
"""
import contextlib
import tempfile

import pytest
import torch

from vlgrpo.algo import grpo
from vlgrpo.model import loading, tiny_model
from vlgrpo.config import TinyModelConfig
from tests.settings import tuned_train
from tests.unit.test_trl_equivalence import (C, G, N, P, _assert_grads_close, _make_trl_trainer, _trl_inputs,
                                             make_setup, synthetic_prompts, update_with)

CISPO_OURS = dict(epsilon_low=1.0, epsilon_high=0.28)       # = TRL's cispo with epsilon_high 1.28
CISPO_TRL = dict(epsilon_high=1.28)
SAPO = dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.4)   # unequal, so a swap would show


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    items, images, texts = synthetic_prompts()
    model, proc = tiny_model.build_tiny(texts, TinyModelConfig(), seed=0)
    d = tmp_path_factory.mktemp("tiny")
    loading.save_model(model, proc, d)
    return make_setup(d, items, images)


@pytest.fixture(scope="module")
def trl_trainer(setup, tmp_path_factory):
    return _make_trl_trainer(setup, tmp_path_factory, 1.0)


@contextlib.contextmanager
def _set(obj, **attrs):
    saved = {k: getattr(obj, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def _trl_attrs(loss_type, entropy_coef=0.0, top_entropy_quantile=1.0):
    """Trainer attributes and config fields (``args``) of a TRL case."""
    attrs = dict(loss_type=loss_type, top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef,
                 _entropy_bonus_enabled=entropy_coef != 0.0)
    if loss_type == "cispo":
        attrs.update(CISPO_TRL)
    args = dict(SAPO) if loss_type == "sapo" else {}
    return attrs, args


def trl_run(tr, s, loss_type, beta, with_old, accumulate=1, **kw):
    """TRL's loss and gradients; ``accumulate`` > 1: that many equal micro-batches as the HF loop runs them
    under ``gradient_accumulation_steps`` (the loss is the sum of the micro-batch losses)."""
    attrs, args = _trl_attrs(loss_type, **kw)
    tr.model.zero_grad(set_to_none=True)
    total, m = 0.0, N // accumulate
    with _set(tr, beta=beta, current_gradient_accumulation_steps=accumulate, **attrs), \
            _set(tr.args, steps_per_generation=accumulate, **args):
        for j in range(accumulate):
            loss = tr.compute_loss(tr.model, _trl_inputs(s, with_old, beta, slice(j * m, (j + 1) * m)))
            loss.backward()
            total += loss.item()
    return total, {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def ours_run(s, loss_type, beta, with_old, shared=False, micro_batch_size=N, rows=slice(0, N), world=1, **train):
    """Our ``update_phase``, on the whole batch or on the rows one of ``world`` DDP processes holds."""
    kw = dict(epsilon_low=0.2, epsilon_high=0.28)
    if loss_type == "cispo":
        kw.update(CISPO_OURS)
    if loss_type == "sapo":
        kw.update(SAPO)
    kw.update(train)
    tc = tuned_train(prompts_per_step=P, num_generations=G, micro_batch_size=micro_batch_size, loss_type=loss_type,
                     beta=beta, max_completion_length=C, mixed_precision="no", shared_work=shared, **kw)
    return update_with(s, tc, with_old, beta, rows, world)


def _check(ours, trl, tol):
    (sums, grads), (trl_loss, trl_grads) = ours, trl
    assert sums["loss"] == pytest.approx(trl_loss, abs=tol, rel=tol)
    _assert_grads_close(grads, trl_grads, atol=tol)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
@pytest.mark.parametrize("beta,with_old", [(0.0, False), (0.04, True)])
def test_cispo_and_sapo_match_trl(setup, trl_trainer, loss_type, beta, with_old):
    trl = trl_run(trl_trainer, setup, loss_type, beta, with_old)
    _check(ours_run(setup, loss_type, beta, with_old), trl, 1e-5)
    _check(ours_run(setup, loss_type, beta, with_old, shared=True), trl, 1e-5)
    if with_old:       # the noisy old policy moves ρ off 1: the objective is not the clipped surrogate's
        ppo_like = {"cispo": "dapo", "sapo": "grpo"}[loss_type]
        ppo_loss, ppo_grads = trl_run(trl_trainer, setup, ppo_like, beta, with_old)
        worst = max((trl[1][n] - ppo_grads[n]).abs().max().item() for n in ppo_grads)
        assert worst > 1e-3, f"{loss_type} gave {ppo_like}'s gradient: the test would prove nothing"
        sums, _ = ours_run(setup, loss_type, beta, with_old)
        if loss_type == "cispo":
            assert sums["cispo_clip_ratio#sum"] > 0        # some weights hit the cap
        assert "clip_ratio/region_mean#sum" not in sums


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_on_policy_cispo_and_sapo_have_the_clipped_surrogates_gradient(setup, loss_type):
    """With ρ ≡ 1 (num_iterations 1) CISPO's gradient is dapo's and SAPO's is grpo's (the gate's slope at 1 is 1):
    they differ from the clipped surrogate only once the policy has moved since sampling."""
    _, g = ours_run(setup, loss_type, 0.04, False)
    _, g_ref = ours_run(setup, {"cispo": "dapo", "sapo": "grpo"}[loss_type], 0.04, False)
    _assert_grads_close(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_under_gradient_accumulation_match_trl(setup, trl_trainer, loss_type):
    trl = trl_run(trl_trainer, setup, loss_type, 0.04, True, accumulate=2)
    _check(ours_run(setup, loss_type, 0.04, True, shared=True, micro_batch_size=N // 2), trl, 1e-5)
    # and four accumulated micro-batches are the whole batch (the step's normaliser, not the micro-batch's)
    full = ours_run(setup, loss_type, 0.04, True)
    acc = ours_run(setup, loss_type, 0.04, True, micro_batch_size=N // 4)
    assert acc[0]["loss"] == pytest.approx(full[0]["loss"], abs=1e-6, rel=1e-5)
    _assert_grads_close(acc[1], full[1], atol=1e-5)


def _halves(setup, loss_type, **kw):
    """Loss (summed) and mean gradient of the two halves of the batch, each run as one of two processes."""
    (a, ga), (b, gb) = [ours_run(setup, loss_type, 0.04, True, rows=slice(j * N // 2, (j + 1) * N // 2), world=2,
                                 **kw) for j in range(2)]
    return a["loss"] + b["loss"], {n: (ga[n] + gb[n]) / 2 for n in ga}


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_two_processes_each_with_half_the_groups_give_trls_step(setup, trl_trainer, loss_type):
    """Two DDP processes each score their half; DDP averages the gradients (the logged loss is the sum / 2).
    TRL's two-process step is the same sum of halves as its two accumulated micro-batches."""
    loss2, grads2 = _halves(setup, loss_type)
    one = ours_run(setup, loss_type, 0.04, True)
    assert loss2 / 2 == pytest.approx(one[0]["loss"], abs=1e-5, rel=1e-5)
    _assert_grads_close(grads2, one[1], atol=1e-5)
    trl_loss, trl_grads = trl_run(trl_trainer, setup, loss_type, 0.04, True, accumulate=2)
    _assert_grads_close(grads2, trl_grads, atol=1e-5)


# ------------------------------------------------------------------------------------------ entropy bonus


@pytest.mark.parametrize("loss_type,quantile", [("grpo", 1.0), ("dapo", 1.0), ("cispo", 1.0), ("grpo", 0.6)])
def test_entropy_coef_matches_trl(setup, trl_trainer, loss_type, quantile):
    kw = dict(entropy_coef=0.05, top_entropy_quantile=quantile)
    trl = trl_run(trl_trainer, setup, loss_type, 0.04, True, **kw)
    without = trl_run(trl_trainer, setup, loss_type, 0.04, True, top_entropy_quantile=quantile)
    assert abs(trl[0] - without[0]) > 1e-4, "the bonus must change the loss for the test to mean something"
    worst = max((trl[1][n] - without[1][n]).abs().max().item() for n in without[1])
    assert worst > 1e-4, "the bonus must change the gradient (the entropies carry gradients)"
    _check(ours_run(setup, loss_type, 0.04, True, **kw), trl, 1e-5)
    _check(ours_run(setup, loss_type, 0.04, True, shared=True, **kw), trl, 1e-5)


def test_entropy_coef_under_accumulation_and_two_processes_matches_trl(setup, trl_trainer):
    """TRL's bonus is each micro-batch's token mean / the accumulation steps; ours the same (so both depend on
    the cut when micro-batches hold unequal token counts, as here)."""
    kw = dict(entropy_coef=0.05)
    trl = trl_run(trl_trainer, setup, "grpo", 0.04, True, accumulate=2, **kw)
    _check(ours_run(setup, "grpo", 0.04, True, shared=True, micro_batch_size=N // 2, **kw), trl, 1e-5)
    loss2, grads2 = _halves(setup, "grpo", **kw)
    _assert_grads_close(grads2, trl[1], atol=1e-5)


# ------------------------------------------------------------------------------------------------ GDPO


def _fixed_reward(values, k):
    def reward(completions, **kwargs):
        assert len(completions) == len(values)
        return [None if v != v else float(v) for v in values[:, k].tolist()]
    reward.__name__ = f"fixed_{k}"
    return reward


@pytest.mark.parametrize("aggregation,scale", [("normalize_then_sum", "gdpo"), ("sum_then_normalize", "group")])
def test_gdpo_advantages_equal_trls_multi_objective_aggregation(setup, aggregation, scale):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # rewards on different scales (one a tenth of the other), one not applicable (None), one group tied in r1
    R = torch.tensor([[1.0, 0.2], [0.0, float("nan")], [0.5, 0.9], [1.0, 0.1],
                      [0.0, 0.03], [0.0, 0.03], [1.0, 0.03], [0.2, 0.03]])
    w = [1.0, 0.5]
    model, proc = loading.load_model(setup["dir"])
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=N, num_generations=G,
                      max_completion_length=4, use_cpu=True, bf16=False, report_to=[], reward_weights=w,
                      multi_objective_aggregation=aggregation)
    tr = GRPOTrainer(model=model, reward_funcs=[_fixed_reward(R, 0), _fixed_reward(R, 1)], args=args,
                     train_dataset=Dataset.from_list([{"prompt": "x"}] * N), processing_class=proc)
    trl_adv = tr._generate_and_score_completions([{"prompt": f"question {i // G}"} for i in range(N)])["advantages"]
    ours, _ = grpo.compute_advantages(R, torch.tensor(w), G, "grpo", scale)
    assert torch.allclose(ours, trl_adv.float(), atol=1e-6, rtol=0), (ours, trl_adv)
    if scale == "gdpo":      # and it is not the plain group normalisation of the weighted sum
        plain, _ = grpo.compute_advantages(R, torch.tensor(w), G, "grpo", "group")
        assert (plain - ours).abs().max() > 1e-2


@pytest.fixture(scope="module")
def trl_trainer_t07(setup, tmp_path_factory):
    return _make_trl_trainer(setup, tmp_path_factory, 0.7)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_at_sequence_level_and_the_shipped_temperature_match_trl(setup, trl_trainer,
                                                                               trl_trainer_t07, loss_type):
    """GSPO's sequence ratio under either loss (TRL warns for cispo, computes it all the same), and sampling
    temperature 0.7 (log-probs and ratios of softmax(logits / 0.7) in both)."""
    with _set(trl_trainer, importance_sampling_level="sequence"):
        trl = trl_run(trl_trainer, setup, loss_type, 0.04, True)
    _check(ours_run(setup, loss_type, 0.04, True, importance_sampling_level="sequence"), trl, 1e-5)
    token = trl_run(trl_trainer, setup, loss_type, 0.04, True)
    assert abs(token[0] - trl[0]) > 1e-4                     # not the token-level loss in disguise
    trl = trl_run(trl_trainer_t07, setup, loss_type, 0.04, True)
    _check(ours_run(setup, loss_type, 0.04, True, shared=True, temperature=0.7), trl, 1e-5)
