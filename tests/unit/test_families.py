"""Every Qwen-VL family (tests/families.py: real config classes, the hub's on-disk layout) through the
project's own loading, encoding, validation and generation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tests.families import FAMILIES, HYBRID_LAYERS, build_family, reference_model  # noqa: E402
from tests.tiny_setup import write_scenes  # noqa: E402
from vlgrpo.model import decoding, loading, prompt_encoding  # noqa: E402
from vlgrpo.data.manifest import Item  # noqa: E402
from tests.settings import tuned_config, tuned_train

PIX = dict(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, list[Item]]:
    """Synthetic 112x112 scenes written under a manifest folder (image paths relative to it)."""
    root = tmp_path_factory.mktemp("scenes")
    return root, write_scenes(root, 8)


def _texts(items):
    return [t for it in items for t in (it.question, it.solution)]


@pytest.fixture(scope="module")
def checkpoints(scenes, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("families")
    return {f: build_family(f, _texts(scenes[1]), out / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_has_the_hub_layout_and_loads_unchanged(family, checkpoints, scenes):
    path = checkpoints[family]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
            "tokenizer.json", "model.safetensors"} <= names
    assert not names & {"processor_config.json", "chat_template.jinja"}
    raw = json.loads((path / "config.json").read_text())
    if family in ("qwen2_vl", "qwen2_5_vl"):        # flat text keys, legacy M-RoPE spelling
        assert "text_config" not in raw and raw["rope_scaling"]["type"] == "mrope"
    model, proc = loading.load_model(path)
    assert type(model).__name__ == type(reference_model(family, _texts(scenes[1]))).__name__
    ref = reference_model(family, _texts(scenes[1])).state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    text = model.config.text_config
    hybrid = family.startswith("qwen3_5")
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (64, 4 if hybrid else 2, 2)
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]
    if hybrid:                  # 3 Gated DeltaNet layers + 1 full attention, as the real 3:1 pattern
        assert text.layer_types == list(HYBRID_LAYERS)
        assert [type(layer.linear_attn).__name__ for layer in model.model.language_model.layers[:3]] \
            == ["Qwen3_5GatedDeltaNet" if family == "qwen3_5" else "Qwen3_5MoeGatedDeltaNet"] * 3
    elif family.startswith("qwen3"):
        assert list(model.config.vision_config.deepstack_visual_indexes) == [0, 1]
    if family.startswith("qwen3"):
        assert proc.image_processor.patch_size == 16


def _image_tokens(path: Path, scenes) -> tuple[int, list[list[int]]]:
    model, proc = loading.load_model(path)
    root, items = scenes
    batch = prompt_encoding.encode_prompts(proc, items[:1], root, **PIX)
    return int((batch["input_ids"] == model.config.image_token_id).sum()), batch["image_grid_thw"].tolist()


@pytest.mark.parametrize("family,tokens", [("qwen2_5_vl", 16), ("qwen3_vl", 9), ("qwen3_5", 9)])
def test_pixel_budget_applies_to_every_family(family, tokens, checkpoints, scenes):
    """112x112 in a 3136..12544 px budget: 4x4 blocks of 28 px, or 3x3 blocks of 32 px for Qwen3-VL / Qwen3.5 whose
    checkpoint asks for shortest_edge 65536 (256x256, 64 tokens) when the processor is not given the budget."""
    n, grid = _image_tokens(checkpoints[family], scenes)
    assert n == tokens
    assert grid[0][1] * grid[0][2] == 4 * tokens


def test_validation_counts_the_visual_tokens_training_sees(checkpoints, scenes, tmp_path):
    """validate's estimate uses the model's own visual block (32 px for Qwen3-VL): its visual count is the
    number of image tokens the encoded prompt holds, and the whole estimate never under-counts, so
    train.max_prompt_tokens never passes a row in validation that training then drops."""
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest
    from vlgrpo.data.validation import check_file

    path = checkpoints["qwen3_vl"]
    cfg = tuned_config({"data": {"num_train": 4, "num_val": 0, "num_test": 0, **PIX},
                            "base": {"model": str(path)}})
    build_dataset(cfg, tmp_path)
    manifest = tmp_path / "data" / "manifest.jsonl"
    items = read_manifest(manifest)
    model, proc = loading.load_model(path)
    enc = prompt_encoding.encode_prompts(proc, items, manifest.parent, **PIX)
    lengths = enc["attention_mask"].sum(1).tolist()
    image_tokens = (enc["input_ids"] == model.config.image_token_id).sum(1).tolist()
    _, rows, _, _, _ = check_file(manifest, cfg)
    assert [r.item.id for r in rows] == [it.id for it in items]
    assert [sum(i.visual_tokens for i in r.images) for r in rows] == image_tokens
    assert all(r.prompt_tokens >= n for r, n in zip(rows, lengths))
    tight = tuned_config({"data": PIX, "base": {"model": str(path)},
                              "train": {"max_prompt_tokens": min(lengths) - 1}})
    assert check_file(manifest, tight)[1] == []


def _argmax_decode(model, batch, stops: list[int], banned: list[int], n: int) -> list[int]:
    """Greedy by hand: a full forward per token, argmax of the last position's logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out: list[int] = []
    extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    mm = batch["mm_token_type_ids"]
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, **extra).logits[0, -1]
            logits[banned] = float("-inf")
            t = int(logits.argmax())
            out.append(t)
            if t in stops:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            mm = torch.cat([mm, torch.zeros(1, 1, dtype=mm.dtype)], 1)
    return out


@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 1,
                                       "min_new_tokens": 12, "num_beams": 2}],
                         ids=["hub", "harsher"])
def test_greedy_evaluation_ignores_the_checkpoints_decoding_settings(settings, checkpoints, scenes, tmp_path):
    """Qwen2.5-VL's generation_config has repetition_penalty 1.05 and sampling on (and a checkpoint may set
    more: n-gram bans, a minimum length, beams): evaluation's greedy answers must still be the plain argmax
    of the model's logits, token for token. 1.05 alone happens not to flip this random tiny model's argmax
    (checked up to 48 tokens), so the "harsher" file is the case that fails when the checkpoint's settings
    leak into evaluation."""
    import shutil

    path = shutil.copytree(checkpoints["qwen2_5_vl"], tmp_path / "ckpt")
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **settings}))
    model, proc = loading.load_model(path)
    assert model.generation_config.repetition_penalty == settings.get("repetition_penalty", 1.05)
    root, items = scenes
    stops = decoding.stop_token_ids(proc, model)
    banned = decoding.vision_token_ids(proc, model)
    n = 12
    comps = decoding.generate_answers(model, proc, items, root, decoding.Decoding(len(items), n, **PIX))
    for it, c in zip(items, comps):
        batch = prompt_encoding.encode_prompts(proc, [it], root, **PIX)
        assert c.token_ids == _argmax_decode(model, batch, stops, banned, n), it.id


# ------------------------------------------------------------------------------------ scoring per family


def _mixed_items(root: Path, items: list[Item]) -> list[Item]:
    """One prompt with two images, one with one (images at tags), like mixed ms-swift data."""
    two = Item(id="two", split="train", task="color", question="<image>Left, <image> right: same colour?",
               images=[items[1].images[0], items[2].images[0]], solution="no")
    return [items[0], two, items[3]]


def _sample(model, proc, prompts, G: int, length: int):
    from vlgrpo.train.generation import SamplingSpec, generate_group_completions
    from vlgrpo.train.data_order import step_generator

    spec = SamplingSpec(G, length, 1.0, 1.0, tuple(decoding.stop_token_ids(proc, model)),
                        proc.tokenizer.pad_token_id, tuple(decoding.vision_token_ids(proc, model)))
    gens = [step_generator(0, 3, k, 0) for k in range(len(prompts))]
    return generate_group_completions(model, prompts, spec, gens, shared=True)


def _plain_forward_logprobs(model, prompts, ids, G: int) -> torch.Tensor:
    """Log-probs of each completion from one ordinary forward over prompt + image + completion."""
    from vlgrpo.algo import grpo

    rep = prompts.select([i for i in range(len(prompts)) for _ in range(G)])
    L, C = rep.input_ids.shape[1], ids.shape[1]
    full = torch.cat([rep.input_ids, ids], 1)
    mask = torch.cat([rep.attention_mask, torch.ones_like(ids)], 1)
    mm = torch.cat([rep.mm_token_type_ids, torch.zeros_like(ids)], 1)
    logits = model(input_ids=full, attention_mask=mask, mm_token_type_ids=mm, pixel_values=rep.pixel_values,
                   image_grid_thw=rep.image_grid_thw).logits
    return grpo.selective_log_softmax(logits[:, L - 1:L + C - 1], ids)


def _scored(model, prompts, ids, mask, G: int, micro: int, shared: bool) -> torch.Tensor:
    from vlgrpo.train.batches import micro_batches
    from vlgrpo.train.scoring import CompletionScorer, score_micro_batch

    tc = tuned_train(prompts_per_step=len(prompts), num_generations=G, micro_batch_size=micro,
                     temperature=1.0, shared_work=shared)
    scorer = CompletionScorer(model)
    return torch.cat([score_micro_batch(scorer, mb, ids, mask, tc)[0]
                      for mb in micro_batches(prompts, G, micro)])


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_work_logprobs_equal_a_plain_forward(family, checkpoints, scenes):
    """fp32: the shared path (prompt and image once, KV cache expanded to the G completions) gives the
    log-probs of an ordinary full forward of each completion, for every family (deepstack and MoE too),
    with prompts carrying different numbers of images."""
    from vlgrpo.train.batches import PromptBatch

    model, proc = loading.load_model(checkpoints[family])
    root, items = scenes
    chosen = _mixed_items(root, items)
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, chosen, root, **PIX),
                                         [len(it.images) for it in chosen])
    G = 4
    c = _sample(model, proc, prompts, G, 5)
    ids, mask = c.ids, c.mask
    with torch.no_grad():
        want = _plain_forward_logprobs(model, prompts, ids, G)
        for micro, shared in ((2, True), (4, True), (12, True), (4, False), (12, False)):
            got = _scored(model, prompts, ids, mask, G, micro, shared)
            assert ((got - want).abs() * mask).max() <= 1e-5, (micro, shared)


def test_plain_path_scores_micro_batches_with_different_image_counts(checkpoints, scenes):
    """train.shared_work: false with a 2-image and a 1-image prompt in one micro-batch: same log-probs as the
    shared path (it used to split the image rows as if every prompt had the same number of images)."""
    from vlgrpo.train.batches import PromptBatch

    model, proc = loading.load_model(checkpoints["qwen2_5_vl"])
    root, items = scenes
    chosen = _mixed_items(root, items)
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, chosen, root, **PIX),
                                         [len(it.images) for it in chosen])
    c = _sample(model, proc, prompts, 4, 5)
    ids, mask = c.ids, c.mask
    with torch.no_grad():
        plain = _scored(model, prompts, ids, mask, 4, 12, shared=False)   # all three prompts together
        shared = _scored(model, prompts, ids, mask, 4, 12, shared=True)
    assert ((plain - shared).abs() * mask).max() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
def test_training_scores_never_keep_completion_logits(family, checkpoints, scenes):
    """A forward + backward of the policy's score keeps at most ``train.logprob_chunk`` tokens' worth of
    vocabulary-sized tensors for the backward pass (the full path kept completions x tokens x vocab); Qwen3.5
    too, whose 248k-token vocabulary is where it matters most."""
    from vlgrpo.train.batches import PromptBatch, micro_batches
    from vlgrpo.train.scoring import CompletionScorer, score_micro_batch

    model, proc = loading.load_model(checkpoints[family])
    V, H = model.get_output_embeddings().weight.shape
    root, items = scenes
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, items[:2], root, **PIX), [1, 1])
    c = _sample(model, proc, prompts, 4, 6)
    ids, mask = c.ids, c.mask
    n, C = ids.shape
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    for shared in (True, False):
        tc = tuned_train(prompts_per_step=2, num_generations=4, micro_batch_size=8, shared_work=shared,
                         logprob_chunk=3)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            (mb,) = micro_batches(prompts, 4, 8)
            logp, _ = score_micro_batch(CompletionScorer(model), mb, ids, mask, tc, with_entropy=True)
            logp.sum().backward()
        vocab_sized = [s for s in saved if V in s and tuple(s) != (V, H)]
        assert n * C > 3 and all(s.numel() <= 3 * V for s in vocab_sized), (shared, vocab_sized)


def test_full_fine_tuning_reference_is_held_in_the_compute_dtype(checkpoints, scenes, tmp_path):
    """bf16 training: the frozen reference is a bf16 copy (half of fp32), fp32 only without mixed precision;
    its log-probs under autocast differ from an fp32-held reference's by about what autocast itself changes."""
    from vlgrpo.train.paths import RunPaths
    from vlgrpo.train.batches import PromptBatch
    from vlgrpo.train.scoring import score_batch
    from vlgrpo.train.setup import load_models

    paths = RunPaths.under(tmp_path, "data/manifest.jsonl", str(checkpoints["qwen2_5_vl"]), "out", "m.jsonl")
    refs = {}
    for mp in ("bf16", "no"):
        cfg = tuned_config({"train": {"beta": 0.04, "mixed_precision": mp, "prompts_per_step": 2,
                                          "num_generations": 4, "micro_batch_size": 4}})
        model, proc, ref = load_models(cfg, paths, torch.device("cpu"))
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16 if mp == "bf16" else torch.float32}
        assert not any(p.requires_grad for p in ref.parameters())
        refs[mp] = ref
    root, items = scenes
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, items[:2], root, **PIX), [1, 1])
    c = _sample(model, proc, prompts, 4, 6)
    ids, mask = c.ids, c.mask
    tc = cfg.train
    fp32 = score_batch(refs["no"], prompts, ids, mask, tc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        held_bf16 = score_batch(refs["bf16"], prompts, ids, mask, tc)
        held_fp32 = score_batch(refs["no"], prompts, ids, mask, tc)
    autocast_effect = float(((held_fp32 - fp32).abs() * mask).max())
    assert float(((held_bf16 - held_fp32).abs() * mask).max()) <= 2 * autocast_effect + 1e-3


# ------------------------------------------------------------------------------------ the family table


@pytest.mark.parametrize("family", FAMILIES)
def test_family_table_row_matches_the_real_checkpoint(family, checkpoints, scenes):
    """vlgrpo.model.families: each row's patch size, processor, cache kinds (from a real prefill) and LoRA
    targets (adapters land on each of them, linear-attention projections included) are the checkpoint's."""
    from vlgrpo.config import LM_LINEAR_MODULES, LoraConfig
    from vlgrpo.model import families, lora
    from vlgrpo.model.caches import layer_kinds

    model, proc = loading.load_model(checkpoints[family])
    row = families.family_of(model)
    assert row.name == family and type(proc).__name__ == row.processor
    assert proc.image_processor.patch_size == row.patch_size
    root, items = scenes
    batch = prompt_encoding.encode_prompts(proc, items[:1], root, **PIX)
    with torch.no_grad():
        cache = model(**batch, use_cache=True, logits_to_keep=1).past_key_values
    assert frozenset().union(*(layer_kinds(layer) for layer in cache.layers)) == row.cache_kinds
    assert set(families.all_lora_targets()) == set(LM_LINEAR_MODULES)      # the shipped default covers all
    names = lora.target_modules(model, LoraConfig(enabled=True))
    assert {n.split(".")[-1] for n in names} == set(row.lora_targets)
    if row.cache_kinds > {"key_value"}:     # every Gated DeltaNet layer gets its projections adapted
        assert sum(".linear_attn." in n for n in names) == 3 * len(families.LINEAR_ATTENTION_TARGETS)


def test_an_unknown_model_type_is_named(checkpoints):
    from vlgrpo.model import families

    with pytest.raises(families.UnknownFamily, match="'llava'.*qwen3_5_moe"):
        families.family_of(type("Cfg", (), {"model_type": "llava"})())


def _hybrid_prefill(checkpoints, scenes):
    model, proc = loading.load_model(checkpoints["qwen3_5"])
    root, items = scenes
    batch = prompt_encoding.encode_prompts(proc, items[:2], root, **PIX)
    with torch.no_grad():
        return model(**batch, use_cache=True, logits_to_keep=1).past_key_values


def test_cache_expansion_repeats_every_state_kind(checkpoints, scenes):
    """Qwen3.5's cache: three linear-attention layers (conv + recurrent state) and one key/value layer; each
    prompt's state becomes G consecutive rows, of every kind."""
    from vlgrpo.model.caches import expand_cache

    cache = _hybrid_prefill(checkpoints, scenes)
    assert [type(layer).__name__ for layer in cache.layers] == ["LinearAttentionLayer"] * 3 + ["DynamicLayer"]
    before = [[t.clone() for t in (*layer.conv_states.values(), *layer.recurrent_states.values())]
              for layer in cache.layers[:3]] + [[cache.layers[3].keys.clone(), cache.layers[3].values.clone()]]
    expand_cache(cache, 3)
    after = [[*layer.conv_states.values(), *layer.recurrent_states.values()] for layer in cache.layers[:3]] \
        + [[cache.layers[3].keys, cache.layers[3].values]]
    for old, new in zip(before, after):
        for a, b in zip(old, new):
            assert a.shape[0] == 2 and torch.equal(b, a.repeat_interleave(3, 0))
    assert cache.get_seq_length() == before[3][0].shape[-2]


def test_an_unknown_cache_layer_type_is_named_before_anything_expands(checkpoints, scenes):
    from transformers.cache_utils import DynamicLayer

    from vlgrpo.model.caches import UnknownCacheLayer, expand_cache

    class PagedLayer(DynamicLayer):       # a layer type transformers might add, with its own storage
        pass

    cache = _hybrid_prefill(checkpoints, scenes)
    cache.layers[3].__class__ = PagedLayer
    conv = cache.layers[0].conv_states[0]
    with pytest.raises(UnknownCacheLayer, match="'PagedLayer'.*train.shared_work: false"):
        expand_cache(cache, 4)
    assert cache.layers[0].conv_states[0] is conv          # nothing was half-expanded


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_through_the_shared_path_equals_plain_generate(family, checkpoints, scenes):
    """A nucleus of one token (top_p -> 0) makes the rollout greedy: its completions, decoded from the
    expanded cache (key/value and linear-attention states), are transformers' own greedy ``generate`` of each
    prompt alone, for all G copies of the prompt."""
    from transformers import GenerationConfig

    from vlgrpo.train.batches import PromptBatch
    from vlgrpo.train.generation import SamplingSpec, generate_group_completions

    model, proc = loading.load_model(checkpoints[family])
    root, items = scenes
    chosen = _mixed_items(root, items)[:2]
    prompts = PromptBatch.from_encoded(prompt_encoding.encode_prompts(proc, chosen, root, **PIX),
                                       [len(it.images) for it in chosen])
    stops, banned, n, G = decoding.stop_token_ids(proc, model), decoding.vision_token_ids(proc, model), 8, 2
    spec = SamplingSpec(G, n, 1.0, 1e-9, tuple(stops), proc.tokenizer.pad_token_id, tuple(banned))
    got = generate_group_completions(model, prompts, spec, [torch.Generator().manual_seed(k) for k in range(2)])
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=stops, suppress_tokens=banned,
                          pad_token_id=proc.tokenizer.pad_token_id)
    for p, it in enumerate(chosen):
        batch = prompt_encoding.encode_prompts(proc, [it], root, **PIX)
        with torch.no_grad():
            want = model.generate(**batch, generation_config=gc)[0, batch["input_ids"].shape[1]:].tolist()
        for row in range(p * G, (p + 1) * G):
            assert got.ids[row][:int(got.mask[row].sum())].tolist() == want, (it.id, row)
