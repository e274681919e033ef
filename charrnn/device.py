"""Device and precision, chosen once at the edge and reported with the reason."""

from __future__ import annotations

import functools
import os

import torch

from charrnn.errors import UsageError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> tuple[torch.device, str]:
    """'auto' -> CUDA when present, else MPS, else CPU; explicit names are checked."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but this torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UsageError("--device mps was asked for but MPS is not available; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device, "asked for"


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512_BF16 or AMX), where bf16 beats fp32.

    CHARRNN_CPU_BF16=1 (or 0) makes `auto` decide as it would on a CPU with (or without)
    them, so that both paths can be run on any machine (the tests do)."""
    forced = os.environ.get("CHARRNN_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    cpu = torch.cpu
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    return False


@functools.lru_cache(maxsize=None)
def cpu_runs_bf16_lstm() -> bool:
    """Whether PyTorch's CPU LSTM (oneDNN's kernel) runs in bf16 here: it needs AVX-512,
    which a CPU without it lacks and ONEDNN_MAX_CPU_ISA=AVX2 withholds (how the tests
    play a CPU without it on one that has it)."""
    lstm = torch.nn.LSTM(1, 1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True


def resolve_dtype(spec: str, device: torch.device, lstm: bool = False) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None = plain fp32) for a --dtype value on a device. lstm: the
    path runs nn.LSTM under it (training, scoring), so `auto` picks bf16 on a CPU only
    where oneDNN's bf16 LSTM runs: under CHARRNN_CPU_BF16=1 on a CPU without AVX-512 those
    paths stay fp32, and the decoder's own kernels (lstm=False) take bf16."""
    if spec == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: this CUDA GPU supports bf16"
            return None, "auto: this CUDA GPU lacks bf16"
        if device.type == "cpu":
            forced = " (as CHARRNN_CPU_BF16 says)" if os.environ.get("CHARRNN_CPU_BF16", "").strip() in ("0", "1") else ""
            if cpu_has_fast_bf16():
                if lstm and not cpu_runs_bf16_lstm():
                    return None, "auto: fp32, as oneDNN here cannot run the bf16 LSTM (it needs AVX-512)" + forced
                return torch.bfloat16, "auto: this CPU has AVX512_BF16/AMX" + forced
            return None, "auto: this CPU lacks AVX512_BF16/AMX, so bf16 would be slower" + forced
        return None, f"auto: fp32 on {device.type}"
    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r} is not one of auto, fp32, bf16, fp16")
    if spec == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 is for GPUs; on a CPU use bf16 or fp32")
    return DTYPES[spec], "asked for"


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A mixed-precision context for the forward pass (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@functools.lru_cache(maxsize=None)
def optimizer_kernels(device_type: str) -> dict[str, bool]:
    """AdamW's fastest kernels on this kind of device: fused (all parameters in one kernel)
    where this torch builds them (CUDA; CPUs from torch 2.4), else foreach. On a 2-core CPU
    the fused step of a 2x256 LSTM takes ~2.3 ms of a ~48 ms training step against ~4.6
    for foreach (docs/benchmarks.md, "The optimizer's kernels")."""
    probe = torch.zeros(1, device=device_type, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, TypeError, ValueError):  # not built for this device or this torch
        return {"foreach": True}
    return {"fused": True}
