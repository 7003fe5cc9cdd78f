"""bf16 autocast only where the hardware computes in bf16 natively.

Every stage's `amp` setting (default on, `--no-amp` for float32) means "bf16 autocast where it is fast".
On a CPU with AVX512-BF16 or AMX, bf16 autocast is 2.5-3x faster than float32 (descriptor and pair ViT,
measured on this project's first 2-core machine). On a CPU without them it is emulated and much slower:
the shipped descriptor (resnet10t, 160 px, batch 64, 2 cores, AMD EPYC with AVX2 only) embeds 59-65 img/s
in float32 and 10-11 img/s under bf16 autocast. So `amp` is resolved per device:

    with precision.autocast(device, amp):   # bf16 on CUDA with bf16 support or a CPU with native bf16
        y = model(x)

`PAIR_VIT_BF16=1` (or `0`) overrides the detection, e.g. to test the bf16 path on any machine.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags list AVX512-BF16 or AMX-BF16 (Linux); False where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in _NATIVE_CPU_FLAGS)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast is fast on `device` (see the module docstring); `PAIR_VIT_BF16` overrides."""
    forced = os.environ.get("PAIR_VIT_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and _cpu_has_native_bf16()


def use_bf16(device: torch.device | str, amp: bool) -> bool:
    """The precision an `amp` setting resolves to on `device`: True for bf16 autocast, False for float32."""
    if amp and not native_bf16(device):
        _log_fallback(torch.device(device).type)
        return False
    return bool(amp)


@functools.lru_cache(maxsize=None)
def _log_fallback(kind: str) -> None:
    log.info("bf16 autocast off on %s: no native bf16 there (emulated bf16 is slower than float32); "
             "set PAIR_VIT_BF16=1 to force it", kind)


def autocast(device: torch.device | str, amp: bool) -> contextlib.AbstractContextManager:
    """A bf16 autocast context on `device` if `use_bf16(device, amp)`, else a no-op context (float32)."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=use_bf16(kind, amp))
