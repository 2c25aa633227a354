"""The engine seam, the one module that imports DeepSpeed: distributed start-up, ZeRO-3 construction, the
engine, the consolidated weights of a checkpoint, and the few private names of DeepSpeed and torch the
trainer needs. It knows nothing of lmscale's configs: ``lmscale.train.build`` composes it from the run plan."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class _QuietCpuFallback(logging.Filter):
    """Drops the warning DeepSpeed logs on every import where it finds no accelerator and falls back to the
    CPU (export, eval, the CPU ranks): that fallback is how lmscale runs without a GPU, not a problem. Its
    logger exists before DeepSpeed configures it, so the filter holds; its detection is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_QuietCpuFallback())

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from lmscale.job.topology import Topology  # noqa: E402


def accelerator_name() -> str:
    return get_accelerator().device_name()


def init_distributed(top: Topology, timeout_minutes: float) -> None:
    """Join the job's process group (env:// rendezvous at MASTER_ADDR:MASTER_PORT, which ``topology.export_env``
    has set). CPU ranks talk over gloo, GPUs over NCCL. ``timeout_minutes`` bounds every collective, so a
    rank whose peer died fails in minutes instead of waiting on it for the backend's default half hour."""
    cpu = accelerator_name() == "cpu"
    backend = "gloo" if cpu else get_accelerator().communication_backend_name()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    bound: dict[str, Any] = {}
    if not cpu:
        get_accelerator().set_device(top.local_rank)
        # Binds the communicator to this rank's GPU and creates it now, so an NCCL set-up problem fails here.
        bound["device_id"] = torch.device(accelerator_name(), top.local_rank)
    torch.distributed.init_process_group(backend, timeout=timeout, **bound)
    # ZeRO's collectives call torch's all_gather_into_tensor, which torch 2.13 deprecates with a FutureWarning
    # at every first call from a new place: the rank's console would hold DeepSpeed's problem, not the run's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # DeepSpeed adopts the process group above (it only creates one when none exists). On CPU ranks it builds
    # its shared-memory all-reduce and prints so on stdout, once per rank.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    if cpu:
        release_cpu_allreduce_buffer(top.rank)


def shutdown_distributed() -> None:
    """Leave the process group, if this rank joined one. Without it NCCL warns of leaked resources, and gloo's
    threads can abort the process as it exits."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """The device this rank trains on: its GPU, or the CPU."""
    return torch.device(get_accelerator().current_device_name())


def release_cpu_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm buffer per rank (about 70 MB) and never unlinks it, so
    every run would leave its buffers in memory until a reboot (enough runs fill the machine's RAM). Once
    every rank has mapped its peers' buffers, which each does before its start-up returns, the names can go:
    the mappings live on until the processes exit."""
    torch.distributed.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


@contextlib.contextmanager
def partitioned_construction(ds_config: dict[str, Any], offload_to_cpu: bool) -> Iterator[None]:
    """ZeRO-3: every module built inside is partitioned over the ranks as soon as it exists, so no rank ever
    holds the whole model (its parameters are empty local shards until written through ``writable``)."""
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="cpu" if offload_to_cpu else None):
        yield


def writable(param: torch.nn.Parameter, writer_rank: int = 0) -> contextlib.AbstractContextManager:
    """A partitioned parameter gathered whole; what ``writer_rank`` writes into it is partitioned again on exit."""
    return deepspeed.zero.GatheredParameters([param], modifier_rank=writer_rank)


def initialize(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    param_groups: list[dict[str, Any]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Any:
    """The DeepSpeed engine around ``model``: with ``param_groups`` the optimizer the config names, else
    ``optimizer``."""
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups, optimizer=optimizer, config=ds_config
    )
    return engine


def pre_clip_grad_norm(engine: Any) -> torch.Tensor | float | None:
    """The global gradient norm before clipping, as ZeRO sets it just before stepping the optimizer on its
    partition. DeepSpeed 0.19 has no public reader for it at that moment (``get_global_grad_norm`` is set
    after the step), so this reads the optimizer's private attribute; tests/test_private_apis.py fails if
    the name disappears."""
    return engine.optimizer._global_grad_norm


def set_collective_timeout(minutes: float) -> None:
    """Bound every later collective (gloo and NCCL alike) of every process group this rank belongs to:
    DeepSpeed reduces gradients over groups of its own, not the default one. torch 2.13 has no public call
    that changes a live group's timeout, so this uses ``_set_pg_timeout`` over the private registry of
    groups; tests/test_private_apis.py fails if either name disappears."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    timeout = datetime.timedelta(minutes=minutes)
    for group in list(_world.pg_map):
        _set_pg_timeout(timeout, group)


def barrier() -> None:
    torch.distributed.barrier()


def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage and world size, via DeepSpeed's own utility."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(ckpt_dir) / tag
    if written_by_bf16_optimizer(tag_dir):
        return bf16_optimizer_state_dict(tag_dir)
    # It prints its progress to stdout, which is the result channel of `lmscale eval` and `export`, and draws
    # progress bars on stderr beside their own.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


BF16_OPTIMIZER_FILES = "bf16_zero_pp_rank_"
"""What DeepSpeed names every rank's optimizer file in a bf16 run, whichever optimizer wrote it."""


def written_by_bf16_optimizer(tag_dir: Path) -> bool:
    """ZeRO's optimizers record their stage in the file; DeepSpeed's BF16_Optimizer does not."""
    first = tag_dir / f"{BF16_OPTIMIZER_FILES}0_mp_rank_00_optim_states.pt"
    if not first.is_file():
        return False
    saved = torch.load(first, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
    return "zero_stage" not in saved


def bf16_optimizer_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint written by DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and
    fp32 gradient accumulation), whose files DeepSpeed's zero_to_fp32 does not read: each rank's file holds
    its flat fp32 partition per parameter group and where each parameter's fragment lies in it."""
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    files = sorted(
        tag_dir.glob(f"{BF16_OPTIMIZER_FILES}*_optim_states.pt"),
        key=lambda path: int(path.name.removeprefix(BF16_OPTIMIZER_FILES).split("_")[0]),
    )
    fragments: dict[str, list[torch.Tensor]] = {}
    for path in files:  # in rank order: a parameter split across ranks continues in the next rank's partition
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        groups = zip(saved["single_partition_of_fp32_groups"], saved["param_slice_mappings"], strict=True)
        for partition, places in groups:
            for name, place in places.items():
                fragments.setdefault(name, []).append(partition.narrow(0, place.start, place.numel))
    module = model_states["module"]
    state = {name: module[name].float() for name in model_states["buffer_names"] if name in module}
    for shapes in model_states["param_shapes"]:
        for name, shape in shapes.items():
            state[name] = torch.cat(fragments[name]).view(shape).clone()
    for alias, source in model_states["shared_params"].items():
        state[alias] = state[source]
    return state
