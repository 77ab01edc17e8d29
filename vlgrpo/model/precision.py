"""The compute precision a run uses: ``train.mixed_precision`` resolved for the hardware it runs on.

    from vlgrpo.model.precision import resolve_precision
    precision = resolve_precision("auto")      # "bf16", "fp16" or "no", and one log line saying why

``auto`` picks bf16 on a GPU that supports it, fp16 on any other GPU, and on a CPU bf16 only where the CPU
has native bf16 instructions (AVX512-BF16 or AMX on x86, the ``bf16`` feature on Arm); elsewhere bf16
autocast is emulated and runs slower than fp32 (measured: a 10-step pilot took 60 s in bf16 and 32 s in fp32
on an AVX2-only CPU), so it picks fp32 (``no``). An explicit ``bf16`` / ``fp16`` / ``no`` is kept as given.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("vlgrpo.precision")

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


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


def choose_precision(requested: str, *, cuda: bool, cuda_bf16: bool,
                     flags: frozenset[str]) -> tuple[str, str]:
    """(precision, reason) for ``requested`` on a machine described by the arguments (no probing here)."""
    if requested != "auto":
        return requested, "as train.mixed_precision says"
    if cuda:
        return ("bf16", "the GPU supports bf16") if cuda_bf16 else ("fp16", "the GPU has no bf16")
    native = sorted(NATIVE_BF16_FLAGS & flags)
    if native:
        return "bf16", f"the CPU has native bf16 ({', '.join(native)})"
    return "no", "the CPU has no native bf16 (AVX512-BF16 / AMX): bf16 would be emulated, slower than fp32"


def describe_precision(requested: str) -> tuple[str, str]:
    """(precision, one line saying what was chosen and why) for ``requested`` on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    precision, why = choose_precision(requested, cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                                      flags=frozenset() if cuda else cpu_flags())
    shown = "fp32" if precision == "no" else precision
    return precision, f"mixed precision: {shown} (train.mixed_precision: {requested}; {why})"


def resolve_precision(requested: str) -> str:
    """``requested`` for this machine ("bf16", "fp16" or "no"), logged with the reason."""
    precision, line = describe_precision(requested)
    log.info("%s", line)
    return precision
