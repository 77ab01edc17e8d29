"""Load and save Qwen-VL checkpoints - the tiny default, a real hub-layout directory or a hub id, and LoRA
adapter directories (detected here, loaded as their base with the adapter merged in) - through the
transformers Auto classes, with every saved file's sha256 checked on load::

    save_model(model, processor, "models/base")
    model, processor = load_model("models/base")        # or a real checkpoint / an adapter directory
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vlgrpo.io import atomic_dir, verify_content_hashes, write_content_hashes


class ModelLoadError(RuntimeError):
    """A checkpoint path/id that cannot be loaded; the message names the path and the reason."""


class AdapterError(ModelLoadError):
    """An adapter directory whose config cannot be read or names no base model."""


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """A peft adapter directory (adapter_config.json, no full config.json)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model (path or hub id) an adapter directory was trained on."""
    p = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(p.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise AdapterError(f"{p}: cannot read the adapter config: {e}") from e
    if not base:
        raise AdapterError(f"{p}: no base_model_name_or_path - cannot tell which base model the adapter belongs to")
    return str(base)


def save_model(model, processor, out_dir: str | Path, rebuild: str | None = None) -> Path:
    """Write safetensors + config + generation config + processor + tokenizer + chat template, atomically.

    The sha256 of every file goes with them (``io.HASHES_FILE``), with ``rebuild``, the command that writes
    the folder again: :func:`load_model` checks them, so a byte flipped on disk is found before use.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_content_hashes(tmp, rebuild or "the stage that wrote it")
    return out_dir


def _is_local(path_or_id: str | Path) -> bool:
    """A path when it exists or cannot be a hub id (``owner/name``); otherwise a hub id."""
    s = str(path_or_id)
    if Path(s).expanduser().exists() or s.startswith((".", "/", "~")):
        return True
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is None


def load_model(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, quantization_config: Any = None) -> tuple[Any, Any]:
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (local dir or hub id) with the Auto classes.

    A LoRA adapter directory (``train.lora``'s output) loads as its base model with the adapter merged in.
    """
    from transformers import AutoModelForImageTextToText

    local = _is_local(path_or_id)
    src = str(Path(path_or_id).expanduser()) if local else str(path_or_id)
    if local:
        p = Path(src)
        if not p.is_dir():
            raise ModelLoadError(f"{src}: model directory not found")
        if is_adapter_dir(p):
            return load_merged(p, dtype=dtype, trust_remote_code=trust_remote_code)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{src}: no config.json - not a transformers checkpoint directory "
                                 f"(expected config.json, *.safetensors, tokenizer and processor files)")
        verify_content_hashes(p)  # a folder saved by save_model: every byte as written, or ContentMismatch
    kw = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, **kw, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src}: cannot load model/processor from {_where(local)}: {e}") from e
    model.eval()
    return model, load_processor(src, trust_remote_code=trust_remote_code)


def _where(local: bool) -> str:
    return "local directory" if local else "hub id (not a local directory; hub access may be offline)"


def load_processor(path_or_id: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The processor of a checkpoint (or adapter) directory / hub id, its tokenizer padding on the left."""
    from transformers import AutoProcessor

    local = _is_local(path_or_id)
    src = str(Path(path_or_id).expanduser()) if local else str(path_or_id)
    try:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code, local_files_only=local)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src}: cannot load model/processor from {_where(local)}: {e}") from e
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # some checkpoints ship without one; eos is the conventional stand-in
        tok.pad_token = tok.eos_token
    return processor


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, processor) from an adapter directory: its base model with the adapter merged in."""
    from peft import PeftModel

    path = Path(path)
    base = adapter_base(path)
    try:
        model, _ = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: is a LoRA adapter; its base model {base} cannot be loaded: "
                                      f"{e}") from e
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model.eval()
    return model, load_processor(path, trust_remote_code=trust_remote_code)


def save_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter merged as a plain checkpoint (safetensors + processor), atomically."""
    model, processor = load_merged(adapter_dir)
    return save_model(model, processor, out_dir)
