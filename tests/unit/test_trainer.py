"""The GRPO trainer loop (vlgrpo.train) on a tiny Qwen2.5-VL and a small synthetic manifest."""
import dataclasses
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_setup import tiny_project, tiny_train_cfg
from vlgrpo.algo import grpo
from vlgrpo.model import decoding, loading, prompt_encoding
from vlgrpo.data.manifest import read_manifest
from vlgrpo.train.errors import TrainingError
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.batches import PromptBatch, StepBatch
from vlgrpo.train.checkpoint import truncate_metrics
from vlgrpo.train.generation import SamplingSpec, generate_group_completions, sample_next
from vlgrpo.train.data_order import data_order, drop_long_prompts, step_generator, step_images, step_prompt_indices
from vlgrpo.train.scoring import CompletionScorer
from vlgrpo.train.update import update_phase
from tests.settings import tuned_config

TRL_NAMES = ["loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
             "completions/clipped_ratio", "grad_norm", "learning_rate", "samples_per_s", "tokens_per_s", "step",
             "epoch"]

# A reward with spread on an untrained model: longer text scores more. Loaded through rewards.plugins,
# the mechanism users add rewards with.
PLUGIN = textwrap.dedent('''
    from vlgrpo.rewards import register

    @register("text_length")
    def text_length(prompts, completions, **columns):
        return [min(len(c), 20) / 20.0 for c in completions]

    @register("broken_nan")
    def broken_nan(prompts, completions, **columns):
        return [float("nan")] * len(completions)
''')


def make_cfg(project, weights=None, **train):
    return tiny_train_cfg(project, weights or {"text_length": 1.0, "format": 0.1}, **train)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    return tiny_project(root, make_cfg(root), PLUGIN)


def run(project, name, **train):
    cfg = make_cfg(project, **train)
    return cfg, train_grpo(cfg, RunPaths.under(project, "data/manifest.jsonl", "models/base", f"out/{name}",
                             f"reports/{name}.jsonl"), progress=False)


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_smoke_params_change_and_metrics_have_trl_names(project):
    cfg, s = run(project, "smoke", beta=0.04)
    assert s["finished"] and s["steps"] == 2
    rows = lines(project / "reports/smoke.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in TRL_NAMES + ["rewards/text_length/mean", "rewards/format/mean"] if k not in r]
        assert not missing, missing
        assert r["reward_std"] > 0 and r["grad_norm"] > 0      # the plugin reward gives a signal
    assert rows[0]["epoch"] == pytest.approx(2 / 16)
    # warmup_ratio 0, 2 updates: lr = base·½(1+cos(π·u/2)) after update u
    assert rows[0]["learning_rate"] == pytest.approx(0.01 * grpo.lr_multiplier(1, 2, 0))
    base = load_file(project / "models/base/model.safetensors")
    new = load_file(project / "out/smoke/model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], new[k])]
    assert len(changed) > len(base) // 2, f"only {len(changed)}/{len(base)} tensors changed"
    assert any("visual" in k for k in changed), "the vision tower must learn too"
    # the final model reloads through the same path as any checkpoint; checkpoints are kept beside it
    loading.load_model(project / "out/smoke")
    assert sorted(p.name for p in (project / "out/smoke/checkpoints").iterdir()) == ["step-1", "step-2"]
    assert json.loads((project / "out/smoke/checkpoints/step-2/trainer_state.json").read_text())["step"] == 2


def test_bf16_default_runs_on_cpu(project):
    _, s = run(project, "bf16", max_steps=1, mixed_precision="bf16")
    assert s["finished"] and s["mixed_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(s["final"]["loss"]))


def test_augment_changes_the_step_images_reproducibly(project):
    cfg = make_cfg(project, augment=True)
    items = read_manifest(project / "data/manifest.jsonl", split="train")[:2]
    a = step_images(items, project / "data", cfg.train, step=3, slots=[0, 1])
    b = step_images(items, project / "data", cfg.train, step=3, slots=[0, 1])
    orig = prompt_encoding.IMAGE_CACHE.get(project / "data" / items[0].images[0])
    assert a[0][0].tobytes() == b[0][0].tobytes() != orig.tobytes()
    assert a[0][0].size == orig.size
    assert step_images(items, project / "data", make_cfg(project).train, 3, [0, 1]) is None
    _, s = run(project, "aug", max_steps=1, augment=True)
    assert s["finished"]


def test_relative_reward_plugin_is_found_from_another_folder(project, tmp_path, monkeypatch):
    """``rewards.plugins: [plugin.py]`` is relative to the project root, as in evaluation, not to the
    current directory: the train stage run from another folder used to fail with PluginError."""
    cfg = make_cfg(project, max_steps=1)
    cfg = dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, plugins=("plugin.py",)))
    monkeypatch.chdir(tmp_path)
    s = train_grpo(cfg, RunPaths.under(project, "data/manifest.jsonl", "models/base", "out/relplugin",
                                       "reports/relplugin.jsonl"), progress=False)
    assert s["finished"] and s["final"]["rewards/text_length/mean"] > 0


def test_training_and_evaluation_suppress_the_same_vision_tokens(project):
    """A policy that prefers every vision token must emit none of them, in rollouts and in evaluation
    alike (training used to ban only the model config's ids and so could sample <|vision_pad|>)."""
    model, proc = loading.load_model(project / "models/base")
    names = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    vision = [proc.tokenizer.convert_tokens_to_ids(n) for n in names]

    def prefer_vision(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., vision] += 1e4
        return logits

    items = read_manifest(project / "data/manifest.jsonl", split="train")[:2]
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, items, project / "data", 3136, 12544), [1, 1])
    spec = SamplingSpec.for_training(make_cfg(project).train, proc, model)
    handle = model.lm_head.register_forward_hook(prefer_vision)
    try:
        sampled = generate_group_completions(model, prompts, spec, [step_generator(0, 0, k, 0) for k in (0, 1)])
        ids, mask = sampled.ids, sampled.mask
        answers = decoding.generate_answers(model, proc, items, project / "data",
                                            decoding.Decoding(2, 4, 3136, 12544, do_sample=True,
                                                              num_return_sequences=2))
    finally:
        handle.remove()
    assert not set(ids[mask.bool()].tolist()) & set(vision)
    assert not {t for c in answers for t in c.token_ids} & set(vision)
    assert set(spec.banned_ids) == set(decoding.vision_token_ids(proc, model)) >= set(vision)


def test_fp16_on_cpu_is_refused(project):
    with pytest.raises(TrainingError, match="fp16 needs a GPU"):
        run(project, "fp16", mixed_precision="fp16")


def test_nan_reward_names_step_and_reward(project):
    with pytest.raises(TrainingError, match=r"step 1: .*broken_nan"):
        run(project, "nan", weights={"broken_nan": 1.0})


def test_over_long_prompts_are_dropped_not_truncated(project):
    cfg = make_cfg(project)
    model, proc = loading.load_model(project / "models/base")
    items = read_manifest(project / "data/manifest.jsonl", split="train")
    enc = prompt_encoding.encode_prompts(proc, items, project / "data", cfg.data.min_pixels, cfg.data.max_pixels)
    lengths = enc["attention_mask"].sum(1).tolist()
    limit = sorted(lengths)[len(lengths) // 2]
    kept, dropped = drop_long_prompts(proc, items, project / "data", cfg.data, limit)
    assert dropped == sum(n > limit for n in lengths) > 0
    assert [it.id for it in kept] == [it.id for it, n in zip(items, lengths) if n <= limit]
    with pytest.raises(TrainingError, match="max_prompt_tokens"):
        run(project, "toolong", max_prompt_tokens=min(lengths) - 1)


def test_shared_and_plain_paths_same_samples_loss_and_grads(project):
    model, proc = loading.load_model(project / "models/base")
    items = read_manifest(project / "data/manifest.jsonl", split="train")[:3]
    prompts = PromptBatch.from_encoded(
        prompt_encoding.encode_prompts(proc, items, project / "data", 3136, 12544), [1] * 3)
    stops, pad = decoding.stop_token_ids(proc, model), proc.tokenizer.pad_token_id
    spec = SamplingSpec(4, 6, 1.0, 0.9, tuple(stops), pad, tuple(decoding.vision_token_ids(proc, model)))
    gens = [generate_group_completions(model, prompts, spec,
                                         [step_generator(0, 5, k, 0) for k in range(3)], shared=sh)
            for sh in (True, False)]
    for field in ("ids", "mask", "terminated"):          # same draws: the cache expansion changes nothing
        assert torch.equal(getattr(gens[0], field), getattr(gens[1], field))
    ids, mask = gens[0].ids, gens[0].mask
    adv, _ = grpo.group_advantages(torch.arange(12.0) % 3, 4)
    out = {}
    for sh in (True, False):
        model.zero_grad(set_to_none=True)
        cfg = make_cfg(project, prompts_per_step=3, micro_batch_size=2, beta=0.0, loss_type="bnpo",
                       max_completion_length=6)
        sums = update_phase(CompletionScorer(model), StepBatch(prompts, ids, mask, adv, None, None),
                              dataclasses.replace(cfg.train, shared_work=sh))
        out[sh] = (sums["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-5)
    for n, g in out[False][1].items():
        assert torch.allclose(out[True][1][n], g, atol=1e-5, rtol=1e-3), n
    assert any(g.abs().sum() > 0 for n, g in out[True][1].items() if "visual" in n)


def test_sample_next_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.7, g)
    # nucleus for 0.7: tokens 0 (0.5) and 1 (crosses 0.7); renormalised 0.625 / 0.375
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)
    assert set(sample_next(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    a = step_prompt_indices(3, 4, 10, seed=1)
    assert a == step_prompt_indices(3, 4, 10, seed=1)
    # slots 12..15 of the concatenated epoch orders: epoch 1 positions 2..5
    assert a == [int(i) for i in data_order(10, 1, 1)[2:6]]
    epoch0 = [i for s in range(2) for i in step_prompt_indices(s, 5, 10, seed=1)]
    assert sorted(epoch0) == list(range(10))   # every item once per epoch


def test_truncate_metrics_keeps_earlier_steps(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    truncate_metrics(p, 2)
    assert [r["step"] for r in lines(p)] == [1, 2]


def test_resume_fingerprint_tracks_what_a_step_computes(tmp_path):
    """A checkpoint of a run with another learning rate, reward weight, base model or prompt list must not be
    resumed (it would hand back that run's policy); save/log cadence may differ."""

    from types import SimpleNamespace

    from vlgrpo.train.checkpoint import run_fingerprint

    init = tmp_path / "base"
    init.mkdir()
    (init / "model.safetensors").write_bytes(b"x" * 10)
    cfg = tuned_config()
    items = [SimpleNamespace(id=f"i{k}") for k in range(4)]
    fp = run_fingerprint(cfg, init, items)
    assert fp == run_fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_steps=7, out_dir="elsewhere")), init, items)
    assert fp != run_fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=5e-4)), init, items)
    # the rollout engine's placement (interpreter, URL, memory, timeouts) may move; its sampling may not
    ro = cfg.train.rollout
    moved = dataclasses.replace(ro, vllm=dataclasses.replace(ro.vllm, url="http://127.0.0.1:9", request_timeout_s=9.0))
    assert fp == run_fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rollout=moved)), init, items)
    resampled = dataclasses.replace(ro, vllm=dataclasses.replace(ro.vllm, dtype="bfloat16"))
    assert fp != run_fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rollout=resampled)), init, items)
    other_rewards = dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, weights={"accuracy": 2.0}))
    assert fp != run_fingerprint(other_rewards, init, items)
    assert fp != run_fingerprint(cfg, init, items[:3])
    (init / "model.safetensors").write_bytes(b"y" * 11)
    assert fp != run_fingerprint(cfg, init, items)
