"""This rank's memory on the device it trains on: GPU memory allocated, or the CPU process's resident set."""

from __future__ import annotations

import resource

import torch


def in_use_gb(device: torch.device) -> float:
    """Memory held now."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def peak_gb(device: torch.device) -> float:
    """The most this process has held so far (on CPU: the kernel's high-water mark of its resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def metric_gb(device: torch.device) -> float:
    """The ``memory_gb`` of the step metrics: the most this rank has held so far (peak GPU memory allocated, or
    the CPU process's peak resident set), the figure an activation-memory lever lowers."""
    return peak_gb(device)
