"""The tiny offline Qwen2.5-VL: a tokenizer trained on the dataset's texts, a small random model from the
real ``Qwen2_5_VLConfig``, and a processor with a Qwen-style chat template. It is saved and loaded through
the same code as a real checkpoint (:mod:`vlgrpo.model.loading`)::

    from vlgrpo.model.tiny_model import build_tiny
    model, processor = build_tiny(texts, TinyModelConfig(), seed=0)
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterable

import torch

from vlgrpo.config import TinyModelConfig
from vlgrpo.model.prompt_encoding import PATCH_SIZE, SPATIAL_MERGE, TEMPORAL_PATCH

# The Qwen2/2.5-VL special tokens, in the order Qwen's own vocabulary lists them. Keeping the names lets
# a prompt rendered for the tiny model read exactly like one rendered for a real checkpoint.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# A Qwen-style chat template written for this project: every turn is `<|im_start|>role\n...<|im_end|>\n`,
# an image item renders as `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the pad),
# and `add_generation_prompt` opens the assistant turn. No default system prompt: the tiny model's
# context is short and a constant prefix teaches it nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; the Qwen special tokens come first (ids 0..13)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Split before byte-level mapping so merges never cross a word, a digit or a punctuation run; each
    # digit stands alone so "12" is never one token that the model must learn separately from "1","2".
    split = Regex(r"'(?:s|t|re|ve|m|ll|d)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _wrap_tokenizer(tok) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="left", model_max_length=4096, clean_up_tokenization_spaces=False,
        extra_special_tokens=None)
    hf.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS
                                                          if t not in ("<|endoftext|>", "<|im_end|>")]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _tiny_config(cfg: TinyModelConfig, tokenizer) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections; Qwen's ratio is
    # 16:24:24 of 64. Keep the same proportions for any head_dim.
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_num_heads,
        intermediate_size=2 * cfg.vision_hidden_size, out_hidden_size=cfg.hidden_size,
        patch_size=PATCH_SIZE, spatial_merge_size=SPATIAL_MERGE, temporal_patch_size=TEMPORAL_PATCH,
        window_size=PATCH_SIZE * SPATIAL_MERGE * 4,      # 112 px windows: one window per default image
        fullatt_block_indexes=[cfg.vision_depth - 1],   # the last block attends over the whole image
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )


def _tiny_processor(tokenizer) -> Any:
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    kw = dict(patch_size=PATCH_SIZE, merge_size=SPATIAL_MERGE, temporal_patch_size=TEMPORAL_PATCH)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw),
                               video_processor=Qwen2VLVideoProcessor(**kw),
                               tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_tiny(texts: Iterable[str], cfg: TinyModelConfig, seed: int) -> tuple[Any, Any]:
    """Build the tiny offline Qwen2.5-VL and its processor (tokenizer trained on ``texts``)."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    # The chat template's role names are in every prompt: train on them too so each is one token.
    roles = ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"] * 8
    tokenizer = _wrap_tokenizer(_train_tokenizer(itertools.chain(roles, texts), cfg.vocab_size))
    processor = _tiny_processor(tokenizer)
    config = _tiny_config(cfg, tokenizer)
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    return model, processor


@contextlib.contextmanager
def _seeded(seed: int):
    """Run the block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG stream."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
