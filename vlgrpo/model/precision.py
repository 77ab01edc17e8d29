"""The compute precision a run uses: ``train.mixed_precision`` resolved for the hardware it runs on.

    from vlgrpo.model.precision import resolve_precision
    precision = resolve_precision("auto", "models/base")   # "bf16", "fp16" or "no", and a log line saying why

``auto`` picks bf16 on a GPU that supports it, fp16 on any other GPU, and on a CPU bf16 only where the CPU
has native bf16 instructions (AVX512-BF16 or AMX on x86, the ``bf16`` feature on Arm) and the model is big
enough for it to pay; elsewhere fp32 (``no``). Without native bf16, bf16 autocast is emulated and runs slower
than fp32 (a 10-step pilot took 60 s in bf16 and 32 s in fp32 on an AVX2-only CPU). With it, a small model's
matrices are too small for the faster maths to pay for autocast's casts: on a 2-core AMD EPYC with
avx512_bf16, runs alternating, fp32 was 1.4-2.5x faster than bf16 at 0.6M parameters (the default tiny model; about equal in a third try),
about equal at 6M, and 1.8x slower at 23M; so below ``CPU_BF16_MIN_PARAMS`` ``auto`` keeps fp32. An explicit
``bf16`` / ``fp16`` / ``no`` is kept as given.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("vlgrpo.precision")

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Below this many parameters fp32 beats bf16 autocast even on a CPU with native bf16 (module docstring).
CPU_BF16_MIN_PARAMS = 10_000_000


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in ``cpuinfo``; empty where there is no such file."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_precision(requested: str, *, cuda: bool, cuda_bf16: bool, flags: frozenset[str],
                     num_params: int | None = None) -> tuple[str, str]:
    """(precision, reason) for ``requested`` on a machine described by the arguments (no probing here);
    ``num_params``: the model's parameter count where known (None: treated as big enough for bf16)."""
    if requested != "auto":
        return requested, "as train.mixed_precision says"
    if cuda:
        return ("bf16", "the GPU supports bf16") if cuda_bf16 else ("fp16", "the GPU has no bf16")
    native = sorted(NATIVE_BF16_FLAGS & flags)
    if not native:
        return "no", "the CPU has no native bf16 (AVX512-BF16 / AMX): bf16 would be emulated, slower than fp32"
    if num_params is not None and num_params < CPU_BF16_MIN_PARAMS:
        return "no", (f"the CPU has native bf16 ({', '.join(native)}), but the model has only "
                      f"{num_params / 1e6:.1f}M parameters: below {CPU_BF16_MIN_PARAMS // 1_000_000}M fp32 is "
                      f"faster on CPU")
    return "bf16", f"the CPU has native bf16 ({', '.join(native)})"


def checkpoint_num_params(model_dir: str | Path) -> int | None:
    """Parameters stored in a checkpoint folder's safetensors files, read from their headers (no weights
    are loaded); None for a hub id, a folder without safetensors, or an unreadable file."""
    import json
    import struct

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    total = 0
    try:
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for name, meta in header.items():
                if name != "__metadata__":
                    n = 1
                    for d in meta["shape"]:
                        n *= int(d)
                    total += n
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total


def describe_precision(requested: str, model_dir: str | Path | None = None) -> tuple[str, str]:
    """(precision, one line saying what was chosen and why) for ``requested`` on this machine, for the model
    in ``model_dir`` (its size matters on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    num_params = checkpoint_num_params(model_dir) if model_dir is not None and requested == "auto" else None
    precision, why = choose_precision(requested, cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                                      flags=frozenset() if cuda else cpu_flags(), num_params=num_params)
    shown = "fp32" if precision == "no" else precision
    return precision, f"mixed precision: {shown} (train.mixed_precision: {requested}; {why})"


def resolve_precision(requested: str, model_dir: str | Path | None = None) -> str:
    """``requested`` for this machine and the model in ``model_dir`` ("bf16", "fp16" or "no"), logged with
    the reason."""
    precision, line = describe_precision(requested, model_dir)
    log.info("%s", line)
    return precision
