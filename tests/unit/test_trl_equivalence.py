"""Our GRPO loss and gradients against TRL 1.x ``GRPOTrainer`` (the test-time oracle), and accumulation.

Same tiny Qwen2.5-VL weights, same prompts + images, same sampled completions, same advantages, same
reference / old-policy log-probs: TRL's ``compute_loss`` and our ``update_phase`` must give the same loss and
the same gradient for every parameter (fp32), for each loss_type, with beta 0 and beta > 0.

TRL 1.16 multiplies the KL term by the importance ratio ρ by default (``use_bias_correction_kl``); docs/architecture.md's
objective is the plain k3 term, so the oracle runs with that correction off. ``epsilon_high`` 0.28 ≠
``epsilon_low`` 0.2 so a swapped clip bound would show. Also at the shipped temperature 0.7, under TRL's
gradient accumulation (where ``bnpo`` differs by design, see docs/architecture.md), and with the step split
between two processes as DDP would.

The clipped-surrogate loss types here (``grpo.PPO_LOSS_TYPES``); cispo and sapo in test_objectives_trl.py.

GSPO, high-entropy token masking and truncated-completion masking against TRL 1.16's ``GRPOTrainer``.

With the same fixtures, TRL's ``compute_loss`` with ``importance_sampling_level`` / ``top_entropy_quantile`` set
and our ``update_phase`` with the same ``train.*`` keys must give the same loss and gradients (fp32, 1e-5).
TRL masks truncated completions while it builds the batch (``_generate_and_score_completions``), so that
rule (``ids[-1] not in eos + pad``, with the trainer's own ``eos_token_ids``) is checked against our
``terminated`` flags, and the masked batch against ``compute_loss``.
"""
import copy
import dataclasses

import pytest
import torch

from vlgrpo.algo import grpo
from vlgrpo.model import decoding, loading, prompt_encoding, tiny_model
from vlgrpo.config import TinyModelConfig
from vlgrpo.data.synthetic import generate
from vlgrpo.train.batches import micro_batches, PromptBatch, StepBatch
from vlgrpo.train.generation import SamplingSpec, generate_group_completions
from vlgrpo.train.data_order import step_generator
from vlgrpo.train.scoring import CompletionScorer, score_batch
from vlgrpo.train.update import update_phase
from tests.settings import tuned_data, tuned_train

G, P, C = 4, 2, 8            # 2 prompts × 4 completions, up to 8 tokens
N = P * G


def synthetic_prompts():
    """(items, images, tokenizer texts) of the P prompts every equivalence case scores."""
    pairs = list(generate(tuned_data(num_train=6, num_val=0, num_test=0, seed=3)))
    items = [p[0] for p in pairs][:P]
    images = [[p[1]] for p in pairs][:P]
    return items, images, [it.question + " " + it.solution for it, _ in pairs] * 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    items, images, texts = synthetic_prompts()
    model, proc = tiny_model.build_tiny(texts, TinyModelConfig(), seed=0)
    d = tmp_path_factory.mktemp("tiny")
    loading.save_model(model, proc, d)
    return make_setup(d, items, images)


def make_setup(d, items, images) -> dict:
    """Completions, advantages, reference and old-policy log-probs of the checkpoint at ``d`` (loaded the way
    ``base.model`` loads it): the inputs both TRL and our update score."""
    model, proc = loading.load_model(d)
    enc = prompt_encoding.encode_prompts(proc, items, None, 3136, 12544, images=images)
    prompts = PromptBatch.from_encoded(enc, [1] * P)
    spec = SamplingSpec(G, C, 1.0, 1.0, tuple(decoding.stop_token_ids(proc, model)), proc.tokenizer.pad_token_id,
                        tuple(decoding.vision_token_ids(proc, model)))
    c = generate_group_completions(model, prompts, spec, [step_generator(0, 0, k, 0) for k in range(P)])
    ids, mask = c.ids, c.mask
    # make lengths differ for sure: cut two completions short (masks must matter in every loss type)
    mask = mask.clone()
    mask[1, 3:] = 0
    mask[6, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2])
    adv, _ = grpo.group_advantages(rewards, G, "group")
    # a reference policy that differs from the current one, so the KL term is not 0
    ref = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    tc = tuned_train(prompts_per_step=P, num_generations=G, micro_batch_size=N, mixed_precision="no",
                     max_completion_length=C)
    ref_logp = score_batch(CompletionScorer(ref), prompts, ids, mask, dataclasses.replace(tc, shared_work=False))
    cur = score_batch(CompletionScorer(model), prompts, ids, mask, dataclasses.replace(tc, shared_work=False))
    old_logp = cur + 0.3 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(2))
    return dict(dir=d, proc=proc, prompts=prompts, ids=ids, mask=mask, adv=adv, ref_logp=ref_logp,
                old_logp=old_logp)


def _trl_inputs(s, with_old, beta, rows=slice(0, N)):
    """The dict TRL's ``_generate_and_score_completions`` would hand to ``compute_loss`` for completions
    ``rows`` (one micro-batch under gradient accumulation); ``num_items_in_batch`` always counts the whole
    generation batch, as TRL's does."""
    idx = list(range(N))[rows]
    rep = s["prompts"].select([i // G for i in idx])              # TRL holds one prompt copy per completion
    ids, mask = s["ids"][rows], s["mask"][rows]
    inputs = {
        "prompt_ids": rep.input_ids, "prompt_mask": rep.attention_mask,
        "completion_ids": ids, "completion_mask": mask,
        "advantages": s["adv"][rows], "num_items_in_batch": s["mask"].sum(),
        "pixel_values": rep.pixel_values, "image_grid_thw": rep.image_grid_thw, "num_images": [1] * len(idx),
        "mm_token_type_ids": torch.cat([rep.mm_token_type_ids, torch.zeros_like(ids)], 1),
    }
    if with_old:
        inputs["old_per_token_logps"] = s["old_logp"][rows]
    if beta:
        inputs["ref_per_token_logps"] = s["ref_logp"][rows]
    return inputs


def _make_trl_trainer(setup, tmp_path_factory, temperature):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, _ = loading.load_model(setup["dir"])
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=N,
                      num_generations=G, loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                      max_completion_length=C, use_cpu=True, bf16=False, report_to=[],
                      gradient_accumulation_steps=1, temperature=temperature, use_bias_correction_kl=False,
                      # TRL adds an MoE model's load-balancing loss (router_aux_loss_coef of its config); vlgrpo's
                      # objective has no such term (docs/architecture.md), so the oracle runs without it
                      router_aux_loss_coef=0.0)
    tr = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                     args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * N),
                     processing_class=setup["proc"])
    tr.current_gradient_accumulation_steps = 1        # set by the HF training loop, which we do not run
    tr.model.train()
    return tr


@pytest.fixture(scope="module")
def trl_trainer(setup, tmp_path_factory):
    """One TRL trainer for all cases (building one costs seconds): ``compute_loss`` reads ``loss_type`` and
    ``beta`` from the trainer at call time, so each case sets them; the reference model TRL loads for beta > 0
    is not used by ``compute_loss`` (the reference log-probs come in the inputs)."""
    return _make_trl_trainer(setup, tmp_path_factory, 1.0)


@pytest.fixture(scope="module")
def trl_trainer_t07(setup, tmp_path_factory):
    """TRL at the shipped sampling temperature 0.7 (TRL bakes the temperature into its fused LM head when
    the trainer is built, so this is a trainer of its own)."""
    return _make_trl_trainer(setup, tmp_path_factory, 0.7)


def _trl_loss_and_grads(tr, s, loss_type, beta, with_old, accumulate=1):
    """TRL's loss and gradients; ``accumulate`` > 1 runs ``compute_loss`` + backward on that many equal
    micro-batches the way the HF loop does under ``gradient_accumulation_steps`` (the loss returned is the
    sum of the micro-batch losses, i.e. what the optimizer step sees)."""
    tr.loss_type, tr.beta = loss_type, beta
    tr.current_gradient_accumulation_steps = tr.args.steps_per_generation = accumulate
    tr.model.zero_grad(set_to_none=True)
    total, m = 0.0, N // accumulate
    try:
        for j in range(accumulate):
            loss = tr.compute_loss(tr.model, _trl_inputs(s, with_old, beta, slice(j * m, (j + 1) * m)))
            loss.backward()
            total += loss.item()
    finally:
        tr.current_gradient_accumulation_steps = tr.args.steps_per_generation = 1
    return total, {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def _our_loss_and_grads(s, loss_type, beta, with_old, shared, micro_batch_size=N, **train):
    """Our ``update_phase`` on the whole batch (or, with ``rows`` / ``num_processes`` in ``train``, on the
    rows one of ``num_processes`` DDP processes holds, normalised as that process would)."""
    rows, world = train.pop("rows", slice(0, N)), train.pop("num_processes", 1)
    tc = tuned_train(prompts_per_step=P, num_generations=G, micro_batch_size=micro_batch_size,
                     loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                     max_completion_length=C, mixed_precision="no", shared_work=shared, **train)
    return update_with(s, tc, with_old, beta, rows, world)


def update_with(s, tc, with_old, beta, rows=slice(0, N), world=1):
    """Our ``update_phase`` with the train section ``tc`` on ``rows`` of the batch (as one of ``world`` DDP
    processes): (loss sums, gradients) of a freshly loaded copy of the set-up's model."""
    model, _ = loading.load_model(s["dir"])
    model.train()
    first = rows.start // G
    batch = StepBatch(s["prompts"].select(range(first, rows.stop // G)), s["ids"][rows], s["mask"][rows],
                      s["adv"][rows], s["old_logp"][rows] if with_old else None,
                      s["ref_logp"][rows] if beta else None, float(s["mask"].sum()), world)
    sums = update_phase(CompletionScorer(model), batch, tc)
    return sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    scale = max(b[n].abs().max().item() for n in b)
    assert scale > 1e-3, "gradients are ~0: the comparison would prove nothing"
    assert worst <= atol * max(1.0, scale), f"max |Δgrad| {worst:.3g} (grad scale {scale:.3g})"


@pytest.mark.parametrize("loss_type", grpo.PPO_LOSS_TYPES)
@pytest.mark.parametrize("beta,with_old", [(0.0, False), (0.04, True)])
def test_loss_and_grads_match_trl(setup, trl_trainer, loss_type, beta, with_old):
    trl_loss, trl_grads = _trl_loss_and_grads(trl_trainer, setup, loss_type, beta, with_old)
    sums, grads = _our_loss_and_grads(setup, loss_type, beta, with_old, shared=False)
    assert sums["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    _assert_grads_close(grads, trl_grads, atol=1e-5)
    # the shared-work path computes the same maths (float order differs slightly)
    sums_s, grads_s = _our_loss_and_grads(setup, loss_type, beta, with_old, shared=True)
    assert sums_s["loss"] == pytest.approx(trl_loss, abs=1e-4, rel=1e-4)
    _assert_grads_close(grads_s, trl_grads, atol=1e-4)
    if with_old:   # the noisy old policy makes some ratios leave [1-ε, 1+ε]
        assert sums["clip_ratio/region_mean#sum"] > 0
    if beta:
        assert sums["kl#sum"] > 0


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_four_accumulated_micro_batches_equal_full_batch(setup, loss_type, shared):
    full, g_full = _our_loss_and_grads(setup, loss_type, 0.04, True, shared, micro_batch_size=N)
    acc, g_acc = _our_loss_and_grads(setup, loss_type, 0.04, True, shared, micro_batch_size=N // 4)
    assert len(micro_batches(setup["prompts"], G, N // 4)) == 4
    assert acc["loss"] == pytest.approx(full["loss"], abs=1e-6, rel=1e-5)
    _assert_grads_close(g_acc, g_full, atol=1e-5)


@pytest.mark.parametrize("mbs", [1, 2, 4, 8])
def test_micro_batches_keep_each_samples_image_rows(setup, mbs):
    pr = setup["prompts"]
    spans = pr.pixel_spans()
    for mb in micro_batches(pr, G, mbs):
        first = mb.start // G
        want = torch.cat([pr.pixel_values[spans[i][0]:spans[i][1]] for i in range(first, (mb.end - 1) // G + 1)])
        assert torch.equal(mb.prompts.pixel_values, want)
        # rows = Σ t·h·w of the micro-batch's images: the split follows image_grid_thw
        assert mb.prompts.pixel_values.shape[0] == int(mb.prompts.image_grid_thw.prod(-1).sum())
        assert (mb.end - mb.start) == len(mb.prompts) * mb.repeats


@pytest.mark.parametrize("loss_type", grpo.PPO_LOSS_TYPES)
def test_loss_and_grads_match_trl_at_the_shipped_temperature(setup, trl_trainer_t07, loss_type):
    """params.yaml samples at 0.7: log-probs, ratios and KL are those of softmax(logits / 0.7) in both."""
    trl_loss, trl_grads = _trl_loss_and_grads(trl_trainer_t07, setup, loss_type, 0.04, True)
    sums, grads = _our_loss_and_grads(setup, loss_type, 0.04, True, shared=True, temperature=0.7)
    assert sums["loss"] == pytest.approx(trl_loss, abs=1e-4, rel=1e-4)
    _assert_grads_close(grads, trl_grads, atol=1e-4)
    at_one, _ = _our_loss_and_grads(setup, loss_type, 0.04, True, shared=True)
    assert at_one["loss"] != pytest.approx(trl_loss, abs=1e-3, rel=1e-3), "0.7 vs 1.0 must differ here"


def _halves(setup, loss_type, **kw):
    """Loss (summed) and mean gradient of the two halves of the batch, each run as its own update."""
    out = [_our_loss_and_grads(setup, loss_type, 0.04, True, shared=True, rows=slice(j * N // 2, (j + 1) * N // 2),
                               **kw) for j in range(2)]
    (a, ga), (b, gb) = out
    return a["loss"] + b["loss"], {n: (ga[n] + gb[n]) / 2 for n in ga}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_trl_under_gradient_accumulation_matches_our_accumulated_step(setup, trl_trainer, loss_type):
    trl_loss, trl_grads = _trl_loss_and_grads(trl_trainer, setup, loss_type, 0.04, True, accumulate=2)
    sums, grads = _our_loss_and_grads(setup, loss_type, 0.04, True, shared=True, micro_batch_size=N // 2)
    assert sums["loss"] == pytest.approx(trl_loss, abs=1e-4, rel=1e-4)
    _assert_grads_close(grads, trl_grads, atol=1e-4)


def test_bnpo_under_accumulation_is_where_we_differ_from_trl(setup, trl_trainer):
    """TRL's bnpo divides each micro-batch by its *own* token count and averages the micro-batches; ours
    divides the step's summed numerator by the step's token count, so it does not depend on how the step is
    cut (docs/architecture.md). The two agree only when every micro-batch holds as many tokens; here they do
    not (two completions are cut short), and TRL's value is exactly the mean of the halves' own bnpo."""
    mask = setup["mask"]
    assert int(mask[:N // 2].sum()) != int(mask[N // 2:].sum())
    trl_loss, trl_grads = _trl_loss_and_grads(trl_trainer, setup, "bnpo", 0.04, True, accumulate=2)
    halves_sum, halves_grad = _halves(setup, "bnpo")
    assert trl_loss == pytest.approx(halves_sum / 2, abs=1e-4, rel=1e-4)
    _assert_grads_close(halves_grad, trl_grads, atol=1e-4)
    ours, _ = _our_loss_and_grads(setup, "bnpo", 0.04, True, shared=True, micro_batch_size=N // 2)
    full, _ = _our_loss_and_grads(setup, "bnpo", 0.04, True, shared=True)
    assert ours["loss"] == pytest.approx(full["loss"], abs=1e-6, rel=1e-5)
    assert ours["loss"] != pytest.approx(trl_loss, abs=1e-4, rel=1e-3)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_two_processes_each_with_half_the_groups_give_the_one_process_step(setup, loss_type):
    """What two DDP processes compute: each scores its half with its own normaliser (dapo: the step's global
    token count / 2), DDP averages the gradients and the logged loss is the sum / 2."""
    loss2, grads2 = _halves(setup, loss_type, num_processes=2)
    one, grads1 = _our_loss_and_grads(setup, loss_type, 0.04, True, shared=True)
    assert loss2 / 2 == pytest.approx(one["loss"], abs=1e-5, rel=1e-5)
    _assert_grads_close(grads2, grads1, atol=1e-5)


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


@pytest.mark.parametrize("loss_type", grpo.PPO_LOSS_TYPES)
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


@pytest.mark.parametrize("loss_type", grpo.PPO_LOSS_TYPES)
def test_mask_truncated_completions_matches_trl(truncation, trl_trainer, loss_type):
    s = truncation
    trl_mask = s["mask"] * (~s["trl_truncated"]).unsqueeze(1).int()          # what TRL hands compute_loss
    trl_loss, trl_grads = _trl(trl_trainer, s, loss_type, 0.04, True, mask=trl_mask)
    sums, grads = _ours(s, loss_type, 0.04, True, mask=grpo.drop_truncated(s["mask"], s["term"]))
    assert sums["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    _assert_grads_close(grads, trl_grads, atol=1e-5)
