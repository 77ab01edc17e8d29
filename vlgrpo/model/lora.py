"""LoRA / QLoRA through peft (``train.lora``): wrap a loaded Qwen-VL policy, switch the adapters off for the
reference policy, save and load adapter directories, merge.

    from vlgrpo.model import loading, lora
    model = lora.load_policy("models/base", cfg.train.lora, torch.bfloat16)   # base in bf16 + fp32 adapters
    with lora.adapters_disabled(model):       # the reference policy: the same weights, adapters off
        ...
    model.save_pretrained("out")              # adapter_config.json + adapter_model.safetensors
    merged, processor = loading.load_model("out")     # base + adapter, merged (an adapter dir loads too)

Only the adapters are trainable; the frozen weights are held in the compute dtype (bf16/fp16 under mixed
precision, fp32 without), since no optimizer ever updates them. The adapters themselves stay fp32 (peft's
``autocast_adapter_dtype``), so the optimizer state is fp32 as in full fine-tuning.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vlgrpo.config import LoraConfig


class LoraError(RuntimeError):
    """A LoRA/QLoRA set-up that cannot work here; the message names the ``train.lora`` key and the reason."""


def _vision_prefix(model: nn.Module) -> str | None:
    for name, _ in model.named_modules():
        if name.split(".")[-1] == "visual":
            return name + "."
    return None


def target_modules(model: nn.Module, lc: LoraConfig) -> list[str]:
    """Full names of the linear layers that get adapters: the language model's layers whose leaf name is in
    ``lc.target_modules``; with ``lc.vision`` every linear layer of the vision blocks; with ``lc.merger`` the
    merger's (Qwen3-VL: the deepstack mergers too). lm_head never (it is tied to the embedding)."""
    vis = _vision_prefix(model)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        if vis is not None and name.startswith(vis):
            merger = "merger" in name[len(vis):]
            if (merger and lc.merger) or (not merger and lc.vision):
                out.append(name)
        elif name.split(".")[-1] in lc.target_modules:
            out.append(name)
    if not out:
        raise LoraError(f"train.lora.target_modules: no linear layer of {type(model).__name__} matches "
                        f"{list(lc.target_modules)} (vision={lc.vision}, merger={lc.merger})")
    return out


def wrap(model: nn.Module, lc: LoraConfig) -> nn.Module:
    """``model`` as a peft LoRA model: every weight frozen, adapters (fp32) on ``target_modules``."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = target_modules(model, lc)
    pc = PeftLoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                        bias="none")
    return get_peft_model(model, pc)


def _quantization_config(lc: LoraConfig, compute_dtype: torch.dtype) -> Any:
    """NF4 4-bit base for QLoRA; refuses clearly where bitsandbytes cannot run it."""
    if not torch.cuda.is_available():
        raise LoraError("train.lora.quantize_4bit: QLoRA keeps the base model in 4-bit NF4 through bitsandbytes, "
                        "which needs a CUDA GPU; this machine has none. Set quantize_4bit: false (LoRA on a "
                        "bf16 base) or train on a GPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise LoraError("train.lora.quantize_4bit: bitsandbytes is not installed; "
                        "pip install -e '.[qlora]'") from e
    from transformers import BitsAndBytesConfig

    # The vision tower and the output head stay in the compute dtype: they are small next to the language
    # model, and 4-bit vision features cost accuracy for little memory.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=["visual", "lm_head"])


def load_policy(path: str | Path, lc: LoraConfig, compute_dtype: torch.dtype,
                gradient_checkpointing: bool = False) -> tuple[nn.Module, Any]:
    """(peft model, processor): the base in ``compute_dtype`` (4-bit with ``quantize_4bit``) + fresh adapters."""
    from vlgrpo.model import loading

    quant = _quantization_config(lc, compute_dtype) if lc.quantize_4bit else None
    model, processor = loading.load_model(path, dtype=compute_dtype, quantization_config=quant)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, lc), processor


def peft_model(model: nn.Module) -> nn.Module | None:
    """The peft model inside ``model`` (itself, or under a DDP/FSDP ``.module`` or a scorer's ``.model``)."""
    from peft import PeftModel

    seen = 0
    while model is not None and seen < 4:
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "model", None)
        seen += 1
    return None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The reference policy: the same module with every adapter switched off (the frozen base)."""
    pm = peft_model(model)
    if pm is None:
        raise LoraError(f"{type(model).__name__}: not a LoRA model - no adapters to disable")
    with pm.disable_adapter():
        yield


def trainable_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The adapter weights (what a LoRA checkpoint must hold), by peft's own names. ``state_dict``: the
    model's weights by its ``state_dict`` names (e.g. gathered from shards), taken instead of its own."""
    from peft import get_peft_model_state_dict

    pm = peft_model(model)
    if pm is None:
        raise LoraError(f"{type(model).__name__}: not a LoRA model")
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(pm, state_dict=state_dict).items()}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters themselves (not copies), by the names of :func:`trainable_state`."""
    from peft import get_peft_model_state_dict

    pm = peft_model(model)
    if pm is None:
        raise LoraError(f"{type(model).__name__}: not a LoRA model")
    return dict(get_peft_model_state_dict(pm, state_dict=pm.state_dict(keep_vars=True)))


def check_adapter_names(want: set[str], got: set[str]) -> None:
    """Raise LoraError naming the first missing / extra adapters when a checkpoint's names are not ``want``."""
    if got != want:
        missing, extra = sorted(want - got)[:3], sorted(got - want)[:3]
        raise LoraError(f"adapter weights do not match this run's train.lora (missing {missing}, extra {extra})")


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put adapter weights saved by :func:`trainable_state` back; a missing or extra adapter is an error."""
    from peft import set_peft_model_state_dict

    pm = peft_model(model)
    check_adapter_names(set(trainable_state(pm)), set(state))
    res = set_peft_model_state_dict(pm, state)
    if getattr(res, "unexpected_keys", None):
        raise LoraError(f"adapter weights: unexpected keys {res.unexpected_keys[:3]}")


class AdaptersOff(nn.Module):
    """A scorer of the reference policy: ``scorer`` (the LoRA policy's) run with its adapters switched off."""

    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.scorer):
            return self.scorer(*args, **kwargs)
