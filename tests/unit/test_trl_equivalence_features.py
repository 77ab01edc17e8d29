"""GSPO, high-entropy token masking and truncated-completion masking against TRL 1.16's ``GRPOTrainer``.

Same set-up as test_trl_equivalence.py (its fixtures: tiny Qwen2.5-VL, sampled completions, noisy old policy,
perturbed reference): TRL's ``compute_loss`` with ``importance_sampling_level`` / ``top_entropy_quantile`` set
and our ``update_phase`` with the same ``train.*`` keys must give the same loss and gradients (fp32, 1e-5).
TRL masks truncated completions while it builds the batch (``_generate_and_score_completions``), so that
rule (``ids[-1] not in eos + pad``, with the trainer's own ``eos_token_ids``) is checked against our
``terminated`` flags, and the masked batch against ``compute_loss``.
"""
import pytest
import torch

from tests.unit.test_trl_equivalence import (C, G, N, P, _assert_grads_close, _trl_inputs,  # noqa: F401
                                             setup, trl_trainer)
from vlgrpo.algo import grpo
from vlgrpo.model import decoding, loading
from vlgrpo.train.batches import StepBatch
from vlgrpo.train.generation import SamplingSpec, generate_group_completions
from vlgrpo.train.data_order import step_generator
from vlgrpo.train.scoring import CompletionScorer, score_batch
from vlgrpo.train.update import update_phase
from tests.settings import tuned_train


def _trl(tr, s, loss_type, beta, with_old, mask=None, **attrs):
    """TRL's loss and gradients with trainer attributes (importance_sampling_level, ...) set for this call."""
    saved = {k: getattr(tr, k) for k in attrs}
    tr.loss_type, tr.beta = loss_type, beta
    try:
        for k, v in attrs.items():
            setattr(tr, k, v)
        inputs = _trl_inputs(s, with_old, beta)
        if mask is not None:
            inputs["completion_mask"], inputs["num_items_in_batch"] = mask, mask.sum()
        tr.model.zero_grad(set_to_none=True)
        loss = tr.compute_loss(tr.model, inputs)
        loss.backward()
    finally:
        for k, v in saved.items():
            setattr(tr, k, v)
    return loss.item(), {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def _ours(s, loss_type, beta, with_old, mask=None, shared=False, **train):
    model, _ = loading.load_model(s["dir"])
    model.train()
    mask = s["mask"] if mask is None else mask
    tc = tuned_train(prompts_per_step=P, num_generations=G, micro_batch_size=N, loss_type=loss_type, beta=beta,
                     epsilon_low=0.2, epsilon_high=0.28, max_completion_length=C, mixed_precision="no",
                     shared_work=shared, **train)
    batch = StepBatch(s["prompts"], s["ids"], mask, s["adv"], s["old_logp"] if with_old else None,
                      s["ref_logp"] if beta else None, float(mask.sum()), 1)
    sums = update_phase(CompletionScorer(model), batch, tc)
    return sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta,with_old", [(0.0, False), (0.04, True)])
def test_gspo_sequence_level_matches_trl(setup, trl_trainer, loss_type, beta, with_old):
    trl_loss, trl_grads = _trl(trl_trainer, setup, loss_type, beta, with_old, importance_sampling_level="sequence")
    sums, grads = _ours(setup, loss_type, beta, with_old, importance_sampling_level="sequence")
    assert sums["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    _assert_grads_close(grads, trl_grads, atol=1e-5)
    if with_old:   # and it is not the token-level loss in disguise
        tok_loss, _ = _trl(trl_trainer, setup, loss_type, beta, with_old)
        assert abs(tok_loss - trl_loss) > 1e-4


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("quantile", [0.2, 0.6])
def test_top_entropy_quantile_matches_trl(setup, trl_trainer, loss_type, quantile):
    trl_loss, trl_grads = _trl(trl_trainer, setup, loss_type, 0.04, True, top_entropy_quantile=quantile)
    full_loss, _ = _trl(trl_trainer, setup, loss_type, 0.04, True)
    assert abs(full_loss - trl_loss) > 1e-5                  # the mask changes the loss
    for shared, tol in ((False, 1e-5), (True, 1e-4)):
        sums, grads = _ours(setup, loss_type, 0.04, True, shared=shared, top_entropy_quantile=quantile)
        assert sums["loss"] == pytest.approx(trl_loss, abs=tol, rel=tol)
        _assert_grads_close(grads, trl_grads, atol=tol)


@pytest.fixture(scope="module")
def truncation(setup, trl_trainer):
    """Completions of which some stop and some are cut at C tokens, their ``terminated`` flags, and which ones
    TRL's rule calls truncated.

    The untrained tiny model rarely samples its EOS within C tokens, so one token that it does sample (the
    most frequent one in the fixture's completions) is made a stop token too - for our sampler and as TRL's
    ``eos_token_ids`` alike (what a generation config with two EOS ids gives).
    """
    model, proc = loading.load_model(setup["dir"])
    stops = list(decoding.stop_token_ids(proc, model))
    extra = int(torch.mode(setup["ids"][:, 1:].flatten()).values)
    spec = SamplingSpec(G, C, 1.0, 1.0, tuple(stops + [extra]), proc.tokenizer.pad_token_id,
                        tuple(decoding.vision_token_ids(proc, model)))
    c = generate_group_completions(model, setup["prompts"], spec, [step_generator(0, 0, k, 0) for k in range(P)])
    ids, mask, term = c.ids, c.mask, c.terminated
    saved = trl_trainer.eos_token_ids
    trl_trainer.eos_token_ids = [*saved, extra]
    try:
        eos_and_pad = [*trl_trainer.eos_token_ids, trl_trainer._tokenizer.pad_token_id]
    finally:
        trl_trainer.eos_token_ids = saved
    lists = [row[:int(m.sum())].tolist() for row, m in zip(ids, mask)]
    trl_truncated = torch.tensor([seq[-1] not in eos_and_pad for seq in lists])
    s = dict(setup, ids=ids, mask=mask, term=term, trl_truncated=trl_truncated)
    # old / reference log-probs of these completions (the fixture's belong to its own completions)
    tc = tuned_train(prompts_per_step=P, num_generations=G, micro_batch_size=N, mixed_precision="no",
                     max_completion_length=C, shared_work=False)
    cur = score_batch(CompletionScorer(model), setup["prompts"], ids, mask, tc)
    s["old_logp"] = cur + 0.3 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(2))
    s["ref_logp"] = cur - 0.2 * torch.rand(cur.shape, generator=torch.Generator().manual_seed(3))
    return s


def test_truncated_completions_are_the_ones_trl_masks(truncation):
    term = truncation["term"]
    assert torch.equal(~term, truncation["trl_truncated"])
    assert term.any() and (~term).any(), "need both kinds of completion for the comparison to mean something"
    masked = grpo.drop_truncated(truncation["mask"], term)
    assert masked[~term].sum() == 0 and torch.equal(masked[term], truncation["mask"][term])


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_mask_truncated_completions_matches_trl(truncation, trl_trainer, loss_type):
    s = truncation
    trl_mask = s["mask"] * (~s["trl_truncated"]).unsqueeze(1).int()          # what TRL hands compute_loss
    trl_loss, trl_grads = _trl(trl_trainer, s, loss_type, 0.04, True, mask=trl_mask)
    sums, grads = _ours(s, loss_type, 0.04, True, mask=grpo.drop_truncated(s["mask"], s["term"]))
    assert sums["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    _assert_grads_close(grads, trl_grads, atol=1e-5)
