"""Tiny random-weight checkpoints of every Qwen-VL family, laid out on disk like a real hub download.

Each family is built from transformers' own config class (Qwen2-VL, Qwen2.5-VL, Qwen3-VL with deepstack,
Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE with 3 linear-attention layers + 1 full-attention layer) at toy widths, with a byte-level BPE tokenizer trained on the data (the pieces of
``vlgrpo.model.tiny_model.build_tiny``), and written the way a real ``huggingface-cli download`` folder looks:

- ``config.json`` in the hub's own shape: flat text keys + legacy ``rope_scaling: {type: mrope, ...}`` for
  Qwen2-VL / Qwen2.5-VL (the 3B config's layout: tied embeddings, 2 KV heads, window attention with full
  attention every few blocks), nested ``text_config`` / ``vision_config`` for Qwen3-VL, Qwen3-VL-MoE and Qwen3.5;
- the legacy ``preprocessor_config.json`` (image processor fields at the top level, ``processor_class``)
  instead of ``processor_config.json``; Qwen3-VL's carries the real ``size: {shortest_edge: 65536}`` and
  16 px patches;
- ``chat_template.json`` (``{"chat_template": ...}``) instead of ``chat_template.jinja``;
- the hub ``generation_config.json`` (sampling on, Qwen2.5-VL's ``repetition_penalty: 1.05``);
- weights in ``model.safetensors`` under the hub's key names (transformers writes them that way).

The project only ever loads these through ``base.model: <path>``, so they exercise the same code path a
user's real checkpoint does:

    from tests.families import FAMILIES, build_family
    path = build_family("qwen3_vl", texts, tmp_path / "qwen3_vl")
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterable

import torch

from vlgrpo.model import tiny_model

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# Qwen3.5's decoder mixes Gated DeltaNet linear-attention layers with full attention, 3:1 as the real
# checkpoints do: 4 layers here, the fourth one full attention.
HYBRID_LAYERS = ("linear_attention", "linear_attention", "linear_attention", "full_attention")

# Toy widths shared by every family: 2 language layers of width 64 (4 heads of 16, 2 KV heads, so head_dim
# 16 and an M-RoPE half-dimension of 8), 3 vision blocks of width 32.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN = 64, 4, 2, 16, 2, 128
V_HIDDEN, V_HEADS, V_DEPTH = 32, 2, 3
VOCAB = 400

# Hub generation configs (the values of the Instruct checkpoints; token ids are filled in per tokenizer).
GENERATION = {
    "qwen2_vl": {"do_sample": True, "temperature": 0.01, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.0},
    "qwen2_5_vl": {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                   "repetition_penalty": 1.05},
    "qwen3_vl": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0},
    "qwen3_vl_moe": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                     "repetition_penalty": 1.0},
    "qwen3_5": {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.0},
    "qwen3_5_moe": {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                    "repetition_penalty": 1.0},
}

# Qwen2-VL / Qwen2.5-VL templates insert a default system turn; Qwen3-VL's do not. Both render an image as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad).
_PARTS = (
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)
_TURNS = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}" + _PARTS
          + "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
TEMPLATE_WITH_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}" + _TURNS)
TEMPLATE_PLAIN = _TURNS


def _tokenizer(texts: Iterable[str]):
    roles = ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
             "You are a helpful assistant."] * 8
    return tiny_model._wrap_tokenizer(tiny_model._train_tokenizer(itertools.chain(roles, texts), VOCAB))


def _ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tiny_model.SPECIAL_TOKENS}


def _mrope(interleaved: bool) -> dict[str, Any]:
    # (temporal, height, width) sections of the rotary half-dimension, in Qwen's 16:24:24 proportion
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if interleaved:
        rope["mrope_interleaved"] = True
    return rope


def _text(tok, **extra) -> dict[str, Any]:
    ids = _ids(tok)
    return dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], **extra)


def _token_ids(tok) -> dict[str, int]:
    ids = _ids(tok)
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def real_config(family: str, tok) -> Any:
    """The family's transformers config object at toy widths."""
    import transformers as tf

    if family in ("qwen2_vl", "qwen2_5_vl"):
        vision = dict(depth=V_DEPTH, num_heads=V_HEADS, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        if family == "qwen2_vl":     # Qwen2-VL's vision tower: embed_dim wide, LayerNorm + QuickGELU
            vision.update(embed_dim=V_HIDDEN, hidden_size=HIDDEN, mlp_ratio=2)
            cls, text = tf.Qwen2VLConfig, _text(tok, rope_parameters=_mrope(False), tie_word_embeddings=True)
        else:                        # Qwen2.5-VL-3B's shape: window attention, full attention in the last block
            vision.update(hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN, out_hidden_size=HIDDEN,
                          window_size=112, fullatt_block_indexes=[V_DEPTH - 1])
            cls, text = tf.Qwen2_5_VLConfig, _text(tok, rope_parameters=_mrope(False), tie_word_embeddings=True)
        return cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **_token_ids(tok))
    if family in ("qwen3_5", "qwen3_5_moe"):
        return _qwen3_5_config(family, tok)
    vision = dict(depth=V_DEPTH, hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN, num_heads=V_HEADS,
                  out_hidden_size=HIDDEN, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=256, deepstack_visual_indexes=[0, 1])
    text = _text(tok, head_dim=HEAD_DIM, rope_parameters=_mrope(True))
    if family == "qwen3_vl":
        return tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                **_token_ids(tok))
    if family == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                   **_token_ids(tok))
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def _qwen3_5_config(family: str, tok) -> Any:
    """Qwen3.5 / Qwen3.5-MoE: hybrid layers (Gated DeltaNet + gated full attention), no deepstack, rotary on a
    quarter of each head (partial_rotary_factor 0.25, so head_dim 64 keeps the M-RoPE half-dimension at 8)."""
    import transformers as tf

    vision = dict(depth=V_DEPTH, hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN, num_heads=V_HEADS,
                  out_hidden_size=HIDDEN, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=256)
    text = _text(tok, layer_types=list(HYBRID_LAYERS), head_dim=64,
                 rope_parameters={**_mrope(True), "partial_rotary_factor": 0.25},
                 linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4)
    text["num_hidden_layers"] = len(HYBRID_LAYERS)
    if family == "qwen3_5":
        return tf.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True, **_token_ids(tok))
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    text.pop("intermediate_size")
    return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_token_ids(tok))


def _hub_config_json(family: str, saved: dict[str, Any]) -> dict[str, Any]:
    """Rewrite transformers' nested config.json the way the hub stores it for this family."""
    if family not in ("qwen2_vl", "qwen2_5_vl"):
        return saved                      # Qwen3-VL checkpoints were published with the nested layout
    flat = {k: v for k, v in saved.items() if k != "text_config"}
    text = dict(saved["text_config"])
    rope = text.pop("rope_parameters")
    for k in ("model_type", "layer_types", "dtype"):
        text.pop(k, None)
    flat.update(text)
    # the legacy spelling the 3B/7B downloads carry
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["torch_dtype"] = flat.pop("dtype", "float32")
    flat["transformers_version"] = "4.41.2"
    return flat


def _preprocessor_json(family: str) -> dict[str, Any]:
    """The legacy top-level image processor file, with each family's real values."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"}
    return {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"}


def build_family(family: str, texts: Iterable[str], out_dir: str | Path, seed: int = 0) -> Path:
    """Build the family's tiny model and write it to ``out_dir`` in the hub's on-disk layout."""
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(texts)
    config = real_config(family, tok)
    with tiny_model._seeded(seed):
        model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(_hub_config_json(family, json.loads(cfg_path.read_text())), indent=2))
    ids = _ids(tok)
    gen = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
           "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], **GENERATION[family],
           "transformers_version": "4.41.2"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok.chat_template = None            # the template lives in chat_template.json, as in the downloads
    tok.save_pretrained(out)
    for name in ("chat_template.jinja", "processor_config.json"):
        (out / name).unlink(missing_ok=True)
    template = TEMPLATE_WITH_DEFAULT_SYSTEM if family in ("qwen2_vl", "qwen2_5_vl") else TEMPLATE_PLAIN
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_json(family), indent=2))
    return out


def reference_model(family: str, texts: Iterable[str], seed: int = 0) -> torch.nn.Module:
    """The same weights as :func:`build_family` writes, straight from the config object (never saved)."""
    from transformers import AutoModelForImageTextToText

    config = real_config(family, _tokenizer(texts))
    with tiny_model._seeded(seed):
        return AutoModelForImageTextToText.from_config(config).eval()
