"""The tiny Qwen2.5-VL through the real transformers classes: build, save/load, prompts, generation."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.tiny_setup import write_scenes
from vlgrpo.config import TinyModelConfig
from vlgrpo.data.manifest import Item
from vlgrpo.model.decoding import Decoding, generate_answers
from vlgrpo.model.loading import ModelLoadError, load_model, save_model
from vlgrpo.model.prompt_encoding import IGNORE_INDEX, build_messages, encode_prompts, supervised_batch
from vlgrpo.model.tiny_model import build_tiny

PIX = dict(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, list[Item]]:
    """Synthetic items with their images written under a temporary manifest folder."""
    root = tmp_path_factory.mktemp("scenes")
    return root, write_scenes(root, 12)


@pytest.fixture(scope="module")
def tiny(scenes):
    _, items = scenes
    texts = [t for it in items for t in (it.question, it.solution)]
    return build_tiny(texts, TinyModelConfig(), seed=0)


def test_tiny_config_and_special_tokens(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    cfg = model.config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    # Specials are single tokens, never split by BPE.
    ids = tok("<|im_start|>user\n<|image_pad|><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert 400_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


def test_chat_template_renders_image_tokens(tiny, scenes):
    _, processor = tiny
    root, items = scenes
    it = Item(id="x", split="train", task="color", question="<image>What color is it?", images=items[0].images,
              system="Be brief.")
    msgs = build_messages(it, [root / it.images[0]], **PIX)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What color is it?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    batch = encode_prompts(processor, [it], root, **PIX)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad_id).sum()) == 16          # 112x112 -> 8x8 patches -> 4x4 merged
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(batch["pixel_values"].shape) == (64, 3 * 2 * 14 * 14)


def test_build_messages_places_images_at_tags():
    it = Item(id="m", split="train", task="color", question="Left <image> right <image>?", images=["a", "b"])
    msgs = build_messages(it, [Path("a.png"), Path("b.png")], **PIX)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    parts = msgs[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[1]["image"] == "a.png" and parts[3]["image"] == "b.png"
    assert parts[1]["min_pixels"] == PIX["min_pixels"] and parts[3]["max_pixels"] == PIX["max_pixels"]
    with pytest.raises(ValueError, match="item m: question has 2 <image> tags but only 1 images"):
        build_messages(it, [Path("a.png")], **PIX)


def test_encode_prompts_left_pads_and_keeps_image_rows(tiny, scenes):
    _, processor = tiny
    root, items = scenes
    chosen = [items[0], Item(id="long", split="train", task="color", images=items[1].images,
                             question="<image>Look closely at every shape. What color is the square?")]
    batch = encode_prompts(processor, chosen, root, **PIX)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[:, -1].tolist() == [1, 1]                        # every prompt ends at the last column
    short = int(mask.sum(1).argmin())
    n_pad = int((mask[short] == 0).sum())
    assert n_pad > 0 and mask[short, :n_pad].sum() == 0          # padding is on the left
    assert (ids[short, :n_pad] == processor.tokenizer.pad_token_id).all()
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    # Prompts end with the assistant header, so generation starts the answer.
    assert processor.tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    # Passing already-loaded images gives the same tensors as reading the files.
    imgs = [[Image.open(root / it.images[0]).convert("RGB")] for it in chosen]
    again = encode_prompts(processor, chosen, root, **PIX, images=imgs)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_supervised_batch_labels_only_answer(tiny, scenes):
    _, processor = tiny
    root, items = scenes
    batch = supervised_batch(processor, items[:3], root, **PIX)
    tok = processor.tokenizer
    for r, it in enumerate(items[:3]):
        lab = batch["labels"][r]
        kept = lab[lab != IGNORE_INDEX].tolist()
        assert tok.decode(kept) == it.solution + "<|im_end|>"
        assert kept == batch["input_ids"][r, -len(kept):].tolist()
        assert (lab[batch["attention_mask"][r] == 0] == IGNORE_INDEX).all()


def test_save_load_round_trip_identical_logits(tiny, scenes, tmp_path):
    model, processor = tiny
    root, items = scenes
    out = save_model(model, processor, tmp_path / "base")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json", "processor_config.json"} <= names
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    model2, processor2 = load_model(out)
    assert type(model2).__name__ == "Qwen2_5_VLForConditionalGeneration"
    b1 = encode_prompts(processor, items[:4], root, **PIX)
    b2 = encode_prompts(processor2, items[:4], root, **PIX)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    with torch.no_grad():
        assert torch.equal(model(**b1).logits, model2(**b2).logits)


def test_load_model_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'missing'}: model directory not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty: no config.json"):
        load_model(tmp_path / "empty")


def test_generate_answers_deterministic_greedy(tiny, scenes):
    model, processor = tiny
    root, items = scenes
    dec = Decoding(batch_size=4, max_new_tokens=4, **PIX)
    a = generate_answers(model, processor, items[:6], root, dec)
    b = generate_answers(model, processor, items[:6], root, dataclasses.replace(dec, batch_size=6))
    assert len(a) == 6
    assert [c.token_ids for c in a] == [c.token_ids for c in b]    # batch composition does not matter
    for c in a:
        assert 1 <= len(c.token_ids) <= 4
        assert c.terminated == (c.token_ids[-1] in (processor.tokenizer.eos_token_id,
                                                    processor.tokenizer.pad_token_id))
    s = generate_answers(model, processor, items[:2], root,
                         dataclasses.replace(dec, do_sample=True, num_return_sequences=3))
    assert len(s) == 6


def test_generate_answers_decodes_trained_answer(scenes, tmp_path):
    """A few supervised steps on one item make greedy decoding return its answer, terminated."""
    root, items = scenes
    it = items[0]
    model, processor = build_tiny([it.question, it.solution] * 4, TinyModelConfig(), seed=1)
    batch = supervised_batch(processor, [it], root, **PIX)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    (c,) = generate_answers(model, processor, [it], root, Decoding(batch_size=1, max_new_tokens=6, **PIX))
    assert c.text == it.solution and c.terminated


def test_generation_never_emits_vision_placeholders(tiny, scenes):
    """Even a policy that prefers <|image_pad|> must not emit it: the next forward would miscount images."""
    model, processor = tiny
    root, items = scenes
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def prefer_image_pad(_module, _inputs, logits):  # (B, T, V): make the placeholder the top choice
        logits = logits.clone()
        logits[..., image_pad] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(prefer_image_pad)
    try:
        comps = generate_answers(model, processor, items[:2], root,
                                 Decoding(2, 3, **PIX, do_sample=True, num_return_sequences=2))
    finally:
        handle.remove()
    assert len(comps) == 4
    assert all(image_pad not in c.token_ids and len(c.token_ids) >= 1 for c in comps)
