"""The device's peak FLOP/s, the denominator of MFU: a table of known GPUs, or a measurement on CPU; and
whether a CPU computes in bf16 natively."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags of a native bf16 dot product (Intel AMX, AVX512-BF16). Without one, oneDNN emulates bf16 matrix
products in fp32 with conversions around them: up to 100x slower than fp32 on AVX2-only hosts."""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def cpu_description() -> str:
    """What decides CPU throughput and the precision to choose: torch's vector capability and the native bf16
    flags, printed by every benchmark."""
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()] or ["no native bf16"]
    return f"cpu capability {torch.backends.cpu.get_cpu_capability()} ({', '.join(native)}), {os.cpu_count()} cores"


# Dense (no sparsity) tensor-core peaks from the vendors' datasheets in FLOP/s, (bf16, fp32 training), matched
# by substring of torch.cuda.get_device_name(), most specific first. fp32 training runs its matmuls in TF32
# (lmscale turns it on), at half the bf16 rate; V100 has neither bf16 nor TF32, so fp32 is its plain rate.
GPU_PEAKS: list[tuple[str, float | None, float]] = [
    ("H200", 989.4e12, 494.7e12),
    ("H100 PCIe", 756.0e12, 378.0e12),
    ("H100", 989.4e12, 494.7e12),
    ("GH200", 989.4e12, 494.7e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("V100", None, 15.7e12),
]


def gpu_peak_flops(name: str, precision: str) -> float | None:
    for key, bf16, fp32 in GPU_PEAKS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def slow_precision(device: torch.device, precision: str) -> str | None:
    """A warning for bf16 training on a CPU that has no native bf16, else None."""
    if device.type != "cpu" or precision != "bf16" or cpu_native_bf16():
        return None
    return (
        f"trainer.precision: bf16 on a CPU without native bf16 ({cpu_description()}): its matrix products are "
        "emulated, up to 100x slower than fp32"
    )


def measure_cpu_peak_flops(
    size: int = 1024, seconds: float = 1.0, windows: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of matrix products in ``dtype`` on this process's threads: the ceiling a CPU rank can reach.

    The best of several short windows, so that a burst of other work (another rank starting a loader
    worker) lowers one window, not the estimate. Ranks should measure together, after a barrier, since
    they share the cores when they train.
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(windows):
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / windows:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * size**3 * count / elapsed)
    return best


def peak_flops(device: torch.device, precision: str, override: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s per rank, where the number came from)."""
    if override:
        return override, "logging.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        return peak, f"datasheet {name}" if peak else f"unknown GPU {name} (set --peak-flops)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_cpu_peak_flops(dtype=dtype), f"measured {precision} matmul"
