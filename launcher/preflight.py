"""Checks a job passes before it is queued: each failure is one line that names what to change.

A job that waits hours in a queue and then dies in its first minute on a typo costs a day; everything that
can be known on the submitting machine is checked here: the config, the dataset's manifest at the path the
job will read, the global batch against the number of ranks, the run directory, the device memory a rank
will need against what the job asks for, and the time limit against one checkpoint interval.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from lmscale.config import Config, grad_accum_steps
from lmscale.errors import LmscaleError
from lmscale.footprint import GB, MemoryEstimate, estimate_memory, step_seconds
from lmscale.train.peak import gpu_peak_flops

GPU_MEMORY_GB: list[tuple[str, float]] = [
    ("gh200", 96), ("h200", 141), ("h100", 80), ("b200", 180), ("a100-40", 40), ("a100_40", 40), ("a100", 80),
    ("a10g", 24), ("l40s", 48), ("l4", 24), ("a10", 24), ("v100", 32), ("4090", 24),
]  # fmt: skip
"""Memory of one GPU by Slurm GPU type (``--gpus-per-node h100:8``), matched by substring, most specific first."""
ASSUMED_MFU = 0.5
"""An optimistic utilisation for the time check: it only refuses a limit no real run could meet."""
STARTUP_SECONDS = 120.0
"""Allowance for loading the environment, the rendezvous, building the engine, and resuming."""


@dataclass(frozen=True)
class Resources:
    nodes: int
    nproc: int
    """Ranks per node."""
    gpus_per_node: int
    gpu_type: str | None
    gpu_memory_gb: float | None
    """Memory of one GPU: --gpu-memory, else from the GPU type."""
    cpus_per_task: int
    mem: str | None
    """Host memory per node, in Slurm's syntax (64G, 500M)."""
    time_seconds: int | None
    signal_lead_seconds: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc


def parse_gpus(value: str | None) -> tuple[int, str | None]:
    """``8`` or ``h100:8`` -> (count, type)."""
    if not value:
        return 0, None
    kind, _, count = value.rpartition(":")
    if not count.isdigit():
        raise LmscaleError(f"--gpus-per-node {value!r}: expected a count (8) or TYPE:COUNT (h100:8)")
    return int(count), kind or None


def gpu_memory_gb(gpu_type: str | None) -> float | None:
    if gpu_type is None:
        return None
    name = gpu_type.lower()
    return next((gb for key, gb in GPU_MEMORY_GB if key in name), None)


def parse_time(value: str | None) -> int | None:
    """Seconds in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    if value is None:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        raise LmscaleError(f"--time {value!r}: expected HH:MM:SS, MM, or D-HH:MM:SS")
    days, a, b, c = match.groups()
    numbers = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        hours, minutes, seconds = ([*numbers, 0, 0])[:3]
    elif len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:
        hours, minutes, seconds = 0, *([*numbers, 0])[:2]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_mem_gb(value: str) -> float:
    """GB in Slurm's memory syntax (default unit megabytes)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", value.strip().upper())
    if not match:
        raise LmscaleError(f"--mem {value!r}: expected a size such as 64G or 500M")
    scale = {"K": 1e-6, "M": 1e-3, "": 1e-3, "G": 1.0, "T": 1e3}[match.group(2)]
    return float(match.group(1)) * scale * 1.073741824  # Slurm's units are binary


def check_batch(cfg: Config, res: Resources) -> str | None:
    try:
        grad_accum_steps(cfg, res.world_size)
    except LmscaleError as err:
        return f"{err} ({res.nodes} nodes x {res.nproc} ranks)"
    return None


def check_run_dir(run_dir: Path) -> str | None:
    """The run directory, or the nearest directory above it that exists, takes a new file."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"run.dir {run_dir}: {existing} is not a directory"
    probe = existing / f".lmscale-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"run.dir {run_dir}: cannot write in {existing} ({err.strerror})"
    return None


def memory_estimate(cfg: Config, res: Resources, seq_len: int | None = None) -> MemoryEstimate | None:
    """A rank's estimated peak on the job's devices (GPUs, or CPU ranks without them) for samples of
    ``seq_len`` tokens (default the model's positions); None while the model's shape is not resolved."""
    if cfg.model.vocab_size is None or cfg.model.seq_len is None:
        return None
    device = "cuda" if res.gpus_per_node else "cpu"
    return estimate_memory(cfg, res.world_size, cfg.trainer.micro_batch_size, device, seq_len)


def check_memory(cfg: Config, res: Resources, seq_len: int | None = None) -> str | None:
    """A rank's estimated peak against one GPU's memory, or on CPU nodes the node's ranks against --mem."""
    estimate = memory_estimate(cfg, res, seq_len)
    if estimate is None:
        return None
    what = (
        f"a rank needs about {estimate.total / GB:.1f} GB ({estimate.describe()}; {estimate.parameters / 1e6:.1f}M "
        f"parameters, ZeRO-{cfg.zero.stage}, {cfg.trainer.precision}, micro-batch {cfg.trainer.micro_batch_size})"
    )
    if res.gpus_per_node:
        if res.gpu_memory_gb is None:
            return None
        if estimate.total > res.gpu_memory_gb * GB:
            return (
                f"GPU memory: {what}, more than a {res.gpu_memory_gb:g} GB GPU: lower trainer.micro_batch_size, raise "
                "zero.stage, or add ranks"
            )
        return None
    if res.mem is None:
        return None
    per_node = estimate.total * res.nproc
    if per_node > parse_mem_gb(res.mem) * GB:
        return f"--mem {res.mem}: {what}, {per_node / GB:.1f} GB for the {res.nproc} ranks of a node"
    return None


def check_time(cfg: Config, res: Resources, tokens_per_step: int) -> str | None:
    """The time limit must leave room for one checkpoint interval at an optimistic utilisation (GPUs of a
    known type), and for the preemption warning in any case."""
    if res.time_seconds is None:
        return None
    margin = STARTUP_SECONDS + res.signal_lead_seconds
    if res.time_seconds <= margin:
        return (
            f"--time {res.time_seconds}s: no longer than start-up ({STARTUP_SECONDS:g}s) plus the preemption warning "
            f"(--signal-lead {res.signal_lead_seconds}s); the job could not save once"
        )
    peak = gpu_peak_flops(res.gpu_type.upper(), cfg.trainer.precision) if res.gpu_type else None
    if not res.gpus_per_node or peak is None:
        return None
    per_step = step_seconds(cfg, tokens_per_step, res.world_size, peak, ASSUMED_MFU)
    interval = cfg.checkpoint.every_steps * per_step
    if interval + margin > res.time_seconds:
        return (
            f"--time {res.time_seconds}s: one checkpoint interval ({cfg.checkpoint.every_steps} steps) takes at least "
            f"{interval / 60:.0f} min at {ASSUMED_MFU:.0%} MFU on {res.world_size} {res.gpu_type} GPUs, plus "
            f"{margin / 60:.0f} min to start and save; ask for more time or lower checkpoint.every_steps"
        )
    return None


def check_stop_latency(cfg: Config, res: Resources, tokens_per_step: int) -> str | None:
    """A stop signal is acted on at the next sync step (every ``logging.every_steps``): at an optimistic
    utilisation, that wait must leave at least half the scheduler's warning (``--signal-lead``) for the save."""
    peak = gpu_peak_flops(res.gpu_type.upper(), cfg.trainer.precision) if res.gpu_type else None
    if not res.gpus_per_node or peak is None:
        return None
    wait = cfg.logging.every_steps * step_seconds(cfg, tokens_per_step, res.world_size, peak, ASSUMED_MFU)
    if wait > res.signal_lead_seconds / 2:
        return (
            f"logging.every_steps: {cfg.logging.every_steps} steps take at least {wait:.0f}s at {ASSUMED_MFU:.0%} MFU "
            f"on {res.world_size} {res.gpu_type} GPUs, and a stop signal waits for the next logged step: more than "
            f"half of --signal-lead {res.signal_lead_seconds}s, too little left to save; lower logging.every_steps "
            "or raise --signal-lead"
        )
    return None
