"""The Qwen-VL families vlgrpo supports, and everything in which they differ, in one table.

Every family loads through the same code (``base.model: <checkpoint folder>``); what differs is data here:

- ``patch_size``: the vision patch in pixels (a merged visual token covers ``2 * patch_size`` square), which
  sets the pixel budget's block size (``data.min_pixels`` / ``data.max_pixels`` round to it);
- ``box_format``: the ``rewards.iou_box_format`` its box answers use - ``qwen2.5`` absolute pixels of the
  resized image the model sees, ``qwen3`` 0-1000 relative to the image;
- ``cache_kinds``: the states its decoder caches during generation (``vlgrpo.model.caches``): keys/values,
  and for Qwen3.5's Gated DeltaNet layers a convolution + recurrent state; shared work expands both kinds;
- ``lora_targets``: the language model's linear layers that ``train.lora.target_modules`` (default: every
  family's targets) puts adapters on;
- ``processor`` and ``quirks``: the processor class its checkpoints resolve to and what its hub files do
  differently.

Adding a family (docs/real-models.md, "Adding a family"): add a row here, a tiny builder to tests/families.py,
and run tests/unit/test_families.py - it checks each row against a real checkpoint of the family.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlgrpo.model.caches import KV, LINEAR

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# Gated DeltaNet: the fused q/k/v projection, the output gate's projection and the output projection.
# in_proj_a / in_proj_b (hidden -> one scalar per value head, the decay and the write strength) are left out:
# a rank-16 adapter on a 32-wide output costs as much as the layer and mostly rescales its gates.
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "out_proj")


@dataclass(frozen=True)
class Family:
    """One row of :data:`FAMILIES` (the module docstring says what each field means)."""
    name: str
    model_types: tuple[str, ...]
    patch_size: int
    box_format: str
    cache_kinds: frozenset[str]
    lora_targets: tuple[str, ...]
    processor: str
    quirks: str


_KV = frozenset({KV})
_HYBRID = frozenset({KV, LINEAR})
_DENSE = ATTENTION_TARGETS + MLP_TARGETS

FAMILIES: tuple[Family, ...] = (
    Family("qwen2_vl", ("qwen2_vl",), 14, "qwen3", _KV, _DENSE, "Qwen2VLProcessor",
           "flat hub config.json with legacy rope_scaling {type: mrope}; the chat template adds a default "
           "system turn; boxes 0-1000 relative, as Qwen3-VL's"),
    Family("qwen2_5_vl", ("qwen2_5_vl",), 14, "qwen2.5", _KV, _DENSE, "Qwen2_5_VLProcessor",
           "flat hub config.json; generation_config samples with repetition_penalty 1.05 (evaluation ignores "
           "it); window attention in the vision tower"),
    Family("qwen3_vl", ("qwen3_vl",), 16, "qwen3", _KV, _DENSE, "Qwen3VLProcessor",
           "preprocessor_config asks for shortest_edge 65536 (256x256) unless data.min_pixels / max_pixels "
           "are given; deepstack visual features feed the first decoder layers"),
    Family("qwen3_vl_moe", ("qwen3_vl_moe",), 16, "qwen3", _KV, ATTENTION_TARGETS, "Qwen3VLProcessor",
           "as Qwen3-VL; every decoder MLP is routed experts held as fused 3-D weights, not linear layers, so "
           "LoRA adapts attention only; TRL adds a router load-balancing loss that vlgrpo's objective does not "
           "have"),
    Family("qwen3_5", ("qwen3_5",), 16, "qwen3", _HYBRID, _DENSE + LINEAR_ATTENTION_TARGETS,
           "Qwen3VLProcessor",
           "hybrid decoder: 3 Gated DeltaNet (linear-attention) layers per full-attention layer; 248,320-token "
           "vocabulary; the tokenizer class in the hub files is overridden by transformers (Qwen3_5Tokenizer); "
           "no deepstack; rotary on a quarter of each attention head"),
    Family("qwen3_5_moe", ("qwen3_5_moe",), 16, "qwen3", _HYBRID, _DENSE + LINEAR_ATTENTION_TARGETS,
           "Qwen3VLProcessor",
           "as Qwen3.5, with routed experts (fused 3-D weights, no LoRA) plus a shared expert whose "
           "gate/up/down projections do get adapters"),
)


class UnknownFamily(ValueError):
    """A checkpoint whose ``model_type`` no row of the family table names."""


def family_of(config) -> Family:
    """The row for a transformers config (or a model, whose ``.config`` is read)."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnknownFamily(f"model_type {model_type!r} is not a supported Qwen-VL family (known: {known}); "
                        "docs/real-models.md says how to add one")


def all_lora_targets() -> tuple[str, ...]:
    """Every family's LoRA targets, in table order (the default ``train.lora.target_modules``)."""
    out: list[str] = []
    for fam in FAMILIES:
        out += [t for t in fam.lora_targets if t not in out]
    return tuple(out)
