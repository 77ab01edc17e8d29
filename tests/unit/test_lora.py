"""LoRA (``train.lora``) and gradient checkpointing (``train.gradient_checkpointing``) against their oracles.

- LoRA loss and adapter gradients equal TRL 1.x ``GRPOTrainer(peft_config=...)``'s ``compute_loss`` (fp32), on
  the plain and the shared-work path, with and without checkpointing; the reference (adapters off) scores
  exactly like the base model loaded on its own.
- Gradient checkpointing gives the gradients of the plain backward (fp32, <= 1e-5) on both paths, for the
  language model and the vision tower, and keeps fewer bytes for the backward pass.
- QLoRA on a machine without a CUDA GPU fails with a message that says so.
"""
import copy
import dataclasses

import pytest
import torch

from vlgrpo.algo import grpo

from vlgrpo.model import loading, lora

from vlgrpo.model import prompt_encoding, tiny_model
from vlgrpo.model.grad_checkpointing import enable_gradient_checkpointing
from vlgrpo.config import ConfigError, LoraConfig, TinyModelConfig
from vlgrpo.data.synthetic import generate
from vlgrpo.train.batches import PromptBatch, StepBatch
from vlgrpo.train.scoring import CompletionScorer, score_batch
from vlgrpo.train.update import update_phase
from tests.settings import tuned_config, tuned_data, tuned_train
from tests.tiny_setup import update_saving_bytes

G, P, C = 4, 2, 8
N = P * G
LC = LoraConfig(enabled=True, rank=4, alpha=8.0, vision=True, merger=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pairs = list(generate(tuned_data(num_train=6, num_val=0, num_test=0, seed=3)))
    items, images = [p[0] for p in pairs][:P], [[p[1]] for p in pairs][:P]
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it, _ in pairs] * 4, TinyModelConfig(),
                                      seed=0)
    d = tmp_path_factory.mktemp("tiny")
    loading.save_model(model, proc, d)
    model, proc = loading.load_model(d)
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, items, None, 3136, 12544, images=images),
                                       [1] * P)
    # completions: random text tokens (the maths does not care how they were sampled)
    text_ids = torch.arange(len(tiny_model.SPECIAL_TOKENS), len(proc.tokenizer))   # no special / vision token
    ids = text_ids[torch.randint(len(text_ids), (N, C), generator=torch.Generator().manual_seed(0))]
    mask = torch.ones(N, C, dtype=torch.long)
    mask = mask.clone()
    mask[1, 3:] = 0
    mask[6, 1:] = 0
    adv, _ = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2]), G, "group")
    tc = tuned_train(prompts_per_step=P, num_generations=G, micro_batch_size=N, mixed_precision="no",
                     max_completion_length=C, beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
    base_logp = score_batch(CompletionScorer(model), prompts, ids, mask, tc)
    old_logp = base_logp + 0.3 * torch.randn(base_logp.shape, generator=torch.Generator().manual_seed(2))
    # one set of adapter weights for every LoRA model here: B != 0, so the adapters change the policy and A
    # gets gradients (peft starts B at 0)
    pm = lora.wrap(copy.deepcopy(model), LC)
    g = torch.Generator().manual_seed(1)
    adapters = {k: (0.1 * torch.randn(v.shape, generator=g) if "lora_B" in k else v.clone())
                for k, v in lora.trainable_state(pm).items()}
    return dict(dir=d, proc=proc, prompts=prompts, ids=ids, mask=mask, adv=adv, tc=tc, base_logp=base_logp,
                old_logp=old_logp, adapters=adapters)


def _lora_model(s, ckpt=False):
    model, _ = loading.load_model(s["dir"])
    if ckpt:
        enable_gradient_checkpointing(model)
    pm = lora.wrap(model, LC)
    lora.load_trainable_state(pm, s["adapters"])
    pm.train()
    return pm


def _grads(model):
    return {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, atol):
    assert a.keys() == b.keys() and a
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    scale = max(b[n].abs().max().item() for n in b)
    assert scale > 1e-4, "gradients are ~0: the comparison would prove nothing"
    assert worst <= atol * max(1.0, scale), f"max |Δgrad| {worst:.3g} (grad scale {scale:.3g})"
    return worst


def test_reference_is_the_base_with_adapters_off(setup):
    s = setup
    pm = _lora_model(s)
    scorer = CompletionScorer(pm)
    with lora.adapters_disabled(scorer):
        ref = score_batch(scorer, s["prompts"], s["ids"], s["mask"], s["tc"])
    on = score_batch(scorer, s["prompts"], s["ids"], s["mask"], s["tc"])
    assert torch.allclose(ref, s["base_logp"], atol=1e-6)
    assert (on - s["base_logp"]).abs().max() > 1e-2          # the adapters do change the policy
    # only adapters train; the base weights are not parameters of the optimizer's concern
    assert all(("lora_" in n) == p.requires_grad for n, p in pm.named_parameters())


@pytest.fixture(scope="module")
def trl_lora(setup, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import GRPOConfig, GRPOTrainer

    s = setup
    model, _ = loading.load_model(s["dir"])
    targets = lora.target_modules(model, LC)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=N,
                      num_generations=G, loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                      max_completion_length=C, use_cpu=True, bf16=False, report_to=[],
                      gradient_accumulation_steps=1, temperature=1.0, use_bias_correction_kl=False)
    tr = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                     train_dataset=Dataset.from_list([{"prompt": "x"}] * N), processing_class=s["proc"],
                     peft_config=PeftLoraConfig(r=LC.rank, lora_alpha=LC.alpha, lora_dropout=0.0,
                                                target_modules=targets, bias="none"))
    assert tr.ref_model is None                      # TRL too: the reference is the adapters switched off
    lora.load_trainable_state(tr.model, s["adapters"])
    tr.current_gradient_accumulation_steps = 1
    tr.model.train()
    return tr


def _trl_inputs(s, ref_logp):
    rep = s["prompts"].select([i for i in range(P) for _ in range(G)])
    return {"prompt_ids": rep.input_ids, "prompt_mask": rep.attention_mask, "completion_ids": s["ids"],
            "completion_mask": s["mask"], "advantages": s["adv"], "num_items_in_batch": s["mask"].sum(),
            "pixel_values": rep.pixel_values, "image_grid_thw": rep.image_grid_thw, "num_images": [1] * N,
            "mm_token_type_ids": torch.cat([rep.mm_token_type_ids, torch.zeros_like(s["ids"])], 1),
            "old_per_token_logps": s["old_logp"], "ref_per_token_logps": ref_logp}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_lora_loss_and_adapter_grads_match_trl_peft(setup, trl_lora, loss_type):
    s = setup
    tc = dataclasses.replace(s["tc"], loss_type=loss_type)
    tr = trl_lora
    tr.loss_type, tr.beta = loss_type, tc.beta
    tr.model.zero_grad(set_to_none=True)
    trl_loss = tr.compute_loss(tr.model, _trl_inputs(s, s["base_logp"]))
    trl_loss.backward()
    want = _grads(tr.model)
    assert all("lora_" in n for n in want) and len(want) == 2 * len(lora.target_modules(
        loading.load_model(s["dir"])[0], LC))
    for shared, ckpt, tol in [(False, False, 1e-5), (True, False, 1e-5), (True, True, 1e-5)]:
        pm = _lora_model(s, ckpt)
        scorer = CompletionScorer(pm)
        with lora.adapters_disabled(scorer):          # the reference log-probs as the trainer makes them
            ref = score_batch(scorer, s["prompts"], s["ids"], s["mask"], tc)
        batch = StepBatch(s["prompts"], s["ids"], s["mask"], s["adv"], s["old_logp"], ref)
        sums = update_phase(scorer, batch, dataclasses.replace(tc, shared_work=shared))
        assert sums["loss"] == pytest.approx(trl_loss.item(), abs=tol, rel=tol), (shared, ckpt)
        worst = _assert_close(_grads(pm), want, tol)
        print(f"{loss_type} shared={shared} ckpt={ckpt}: |Δloss| {abs(sums['loss'] - trl_loss.item()):.2g}, "
              f"max |Δgrad| {worst:.2g}")


@pytest.mark.parametrize("shared", [False, True])
def test_gradient_checkpointing_same_grads_fewer_saved_bytes(setup, shared):
    s = setup
    tc = dataclasses.replace(s["tc"], shared_work=shared)
    batch = StepBatch(s["prompts"], s["ids"], s["mask"], s["adv"], s["old_logp"], s["base_logp"] + 0.05)
    out = {}
    for ckpt in (False, True):
        model, _ = loading.load_model(s["dir"])
        model.train()
        if ckpt:
            names = {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)}
            assert enable_gradient_checkpointing(model) == 4       # 2 decoder layers + 2 vision blocks
            assert {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)} \
                == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"} and not names
        sums, saved = update_saving_bytes(model, batch, tc)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[ckpt] = (sums["loss"], grads, saved)
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-7)
    worst = _assert_close(out[True][1], out[False][1], 1e-5)
    print(f"checkpointing shared={shared}: max |Δgrad| {worst:.2g}, saved bytes {out[True][2]} vs {out[False][2]}")
    assert any(".visual." in n for n in out[True][1])          # the vision tower got its gradients too
    assert out[True][2] < 0.5 * out[False][2]


def test_qlora_needs_a_gpu_and_lora_config_errors(setup):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: QLoRA may run here")
    with pytest.raises(lora.LoraError, match="needs a CUDA GPU"):
        lora.load_policy(setup["dir"], LoraConfig(enabled=True, quantize_4bit=True), torch.bfloat16)
    with pytest.raises(ConfigError, match="train.lora.quantize_4bit"):
        tuned_config({"train": {"lora": {"quantize_4bit": True}}})
    model, _ = loading.load_model(setup["dir"])
    with pytest.raises(lora.LoraError, match="train.lora.target_modules"):
        lora.target_modules(model, LoraConfig(enabled=True, target_modules=("no_such_proj",)))
    assert not any(".visual." in n for n in lora.target_modules(model, LoraConfig(enabled=True)))
