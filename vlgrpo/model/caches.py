"""Expanding a prompt's cache to its G completions, for every kind of cache layer a Qwen-VL decoder keeps.

Shared work prefills each prompt once and then needs the prompt's state in G rows, one per completion.
Full-attention layers keep keys and values; Qwen3.5's Gated DeltaNet (linear-attention) layers keep a
convolution state and a recurrent state instead, and hybrid layers keep both. Each kind is repeated along
the batch dimension with ``repeat_interleave`` (differentiable, so the gradients of all G completions flow
back into the one prompt forward). A layer type this module does not know raises an error naming it rather
than expanding half a cache.

The expanded linear-attention states are then replaced, not overwritten, by the completions forward:
transformers copies a linear layer's new states into the old tensors in place (to keep static addresses for
CUDA graphs), but with gradients on, the delta rule saved the old recurrent state for its backward pass, and
the in-place write would fail it ("modified by an inplace operation"); and gradient checkpointing's
recompute (vlgrpo.model.grad_checkpointing) must find the states the original forward read.
"""
from __future__ import annotations

import functools

import torch

# cache layer class name -> the kinds of state it holds (vlgrpo.model.families names the same kinds)
KV, LINEAR = "key_value", "conv_recurrent"
LAYER_KINDS: dict[str, frozenset[str]] = {
    "DynamicLayer": frozenset({KV}),
    "DynamicSlidingWindowLayer": frozenset({KV}),
    "LinearAttentionLayer": frozenset({LINEAR}),
    "LinearAttentionAndFullAttentionLayer": frozenset({KV, LINEAR}),
    "LinearAttentionAndSlidingWindowAttentionLayer": frozenset({KV, LINEAR}),
}


class UnknownCacheLayer(TypeError):
    """A cache layer whose state vlgrpo does not know how to expand to G completions."""


def layer_kinds(layer) -> frozenset[str]:
    """The kinds of state a cache layer holds; raises :class:`UnknownCacheLayer` for any other layer type.

    Matched by exact class name: a subclass (a quantized or a static layer, say) may store its state
    elsewhere, and repeating only the attributes it inherits would silently pair completions with another
    prompt's state.
    """
    kinds = LAYER_KINDS.get(type(layer).__name__)
    if kinds is None:
        raise UnknownCacheLayer(
            f"cache layer type {type(layer).__name__!r} is not one shared work can expand to G completions "
            f"(known: {', '.join(sorted(LAYER_KINDS))}); set train.shared_work: false to prefill every "
            "completion's own copy of the prompt instead")
    return kinds


def _repeat_states(states: dict, repeats: int) -> None:
    for idx, state in states.items():
        if state is not None:
            states[idx] = state.repeat_interleave(repeats, dim=0)


def _assign_recurrent_state(layer, recurrent_states: torch.Tensor, state_idx: int = 0, **_) -> torch.Tensor:
    layer.recurrent_states[state_idx] = recurrent_states
    layer.is_recurrent_states_initialized[state_idx] = True
    return recurrent_states


def _assign_conv_state(layer, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                       **kwargs) -> torch.Tensor:
    if not layer.has_previous_state[state_idx]:       # a prefill: transformers' own path, on fresh tensors
        return type(layer).update_conv_state(layer, conv_states, state_idx, conv_kernel_size, **kwargs)
    full = torch.cat([layer.conv_states[state_idx], conv_states], dim=-1)
    layer.conv_states[state_idx] = full if layer.record_past else full[..., -layer.conv_kernel_size[state_idx]:]
    return full


def expand_cache(cache, repeats: int) -> None:
    """Repeat every layer of ``cache`` (a transformers ``Cache`` with ``.layers``) ``repeats`` times along the
    batch, in place: row p becomes rows p·repeats .. p·repeats + repeats - 1, for key/value layers,
    linear-attention (conv + recurrent) layers and hybrids alike."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnknownCacheLayer(f"cache type {type(cache).__name__!r} has no per-layer states to expand")
    kinds = [layer_kinds(layer) for layer in layers]          # check every layer before changing any
    for layer, kind in zip(layers, kinds):
        if LINEAR in kind:
            _repeat_states(layer.conv_states, repeats)
            _repeat_states(layer.recurrent_states, repeats)
            # this cache lives for one rollout or one scoring pass; see the module docstring for why
            layer.update_recurrent_state = functools.partial(_assign_recurrent_state, layer)
            layer.update_conv_state = functools.partial(_assign_conv_state, layer)
        if KV in kind and isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel():
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)
