"""Gradient checkpointing (``train.gradient_checkpointing``) that keeps the shared-work KV cache.

    from vlgrpo.model.grad_checkpointing import enable_gradient_checkpointing
    enable_gradient_checkpointing(model)     # every decoder layer and vision block; returns how many

Each Qwen-VL decoder layer and vision block is recomputed in the backward pass instead of keeping its
activations (torch's non-reentrant checkpoint, RNG state preserved, so dropout replays the same mask and the
gradients equal the plain ones). transformers' own switch (``gradient_checkpointing_enable``) drops the KV
cache of every checkpointed layer, because a recompute would append its keys/values to the cache a second
time. vlgrpo's shared-work scoring needs that cache (the prompt is encoded once and its cache is expanded
to the G completions, with gradients flowing back through it), so here each layer's recompute first puts its
own cache layer back to the state it had before the original forward: the recompute sees the same cache,
produces the same shapes and values, and leaves the cache as the original forward did.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformers ``GradientCheckpointingLayer`` of ``model`` (decoder layers, vision
    blocks); returns how many. A model with none raises ValueError."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers announces "Caching is incompatible with gradient checkpointing ... Setting use_cache=False"
    # for such a layer; the layer keeps its cache here (use_cache is not read inside a layer), so that line
    # would mislead.
    logging.getLogger("transformers.modeling_layers").addFilter(_drop_cache_warning)
    n = 0
    for mod in model.modules():
        if isinstance(mod, GradientCheckpointingLayer):
            idx = _cache_index(mod)
            mod.gradient_checkpointing = True
            # the layer keeps past_key_values under checkpointing: our recompute restores its cache first
            mod._can_checkpoint_with_cache = idx is not None
            mod._gradient_checkpointing_func = functools.partial(_checkpoint_layer, idx)
            n += 1
    if n == 0:
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} has no layer that supports "
                         f"gradient checkpointing")
    return n


def _drop_cache_warning(record: logging.LogRecord) -> bool:
    return "Caching is incompatible with gradient checkpointing" not in record.getMessage()


def _cache_index(layer: nn.Module) -> int | None:
    """The KV-cache slot a decoder layer writes (its attention's ``layer_idx``); None for vision blocks."""
    for name in ("self_attn", "attn", "attention", "linear_attn"):   # linear_attn: Qwen3.5's Gated DeltaNet
        idx = getattr(getattr(layer, name, None), "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def _checkpoint_layer(cache_index: int | None, fn: Callable, *args: Any):
    """``fn(*args)`` under a non-reentrant checkpoint; ``fn`` is transformers' ``partial(forward, layer,
    **kwargs)``, so its keywords hold the cache the layer reads and appends to."""
    cache = getattr(fn, "keywords", {}).get("past_key_values") if cache_index is not None else None
    if cache is None:
        return checkpoint(fn, *args, use_reentrant=False)
    before = _snapshot(cache, cache_index)

    def run(*a):
        _restore(cache, cache_index, before)     # a no-op on the first call; the recompute sees the old state
        return fn(*a)

    return checkpoint(run, *args, use_reentrant=False)


def _snapshot(cache: Any, idx: int) -> dict | None:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"train.gradient_checkpointing: unsupported cache type {type(cache).__name__} "
                        f"(expected a transformers Cache with per-layer state)")
    # A cache layer's state is plain attributes (keys, values, is_initialized, ...), and for a linear-attention
    # layer dicts of them (conv / recurrent state per index, has_previous_state); an update replaces the
    # tensors (torch.cat, or on an expanded cache vlgrpo.model.caches' assignment), never writes into one the
    # forward read, so copying the attributes and those dicts is the whole state.
    return _copy_state(vars(layers[idx])) if idx < len(layers) else None


def _copy_state(state: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}


def _restore(cache: Any, idx: int, state: dict | None) -> None:
    if idx >= len(cache.layers):
        return
    layer = cache.layers[idx]
    if state is None:            # the layer did not exist yet: make it empty again
        layer.reset()
        return
    vars(layer).clear()
    vars(layer).update(_copy_state(state))
