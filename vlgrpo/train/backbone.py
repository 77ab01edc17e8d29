"""Reaching into a policy: the bare model inside a DDP / accelerate wrapper, and a Qwen-VL model's backbone
and head. Shared by generation, scoring and the run state; imports nothing else of the trainer."""
from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the model without its head: hidden states out, the head): ``model.model`` / ``lm_head`` of a Qwen-VL
    ``...ForConditionalGeneration`` (a peft wrapper is looked through; its adapters stay in the layers)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.get_output_embeddings()
