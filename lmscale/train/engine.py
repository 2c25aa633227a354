"""The one module that imports DeepSpeed: distributed start-up and the ZeRO engine."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from lmscale.models import build_model as build_family_model
from lmscale.models import count_parameters
from lmscale.train.ds_config import deepspeed_config
from lmscale.train.plan import RunPlan
from lmscale.train.spike import SkipStepAdamW, SpikeGuard
from lmscale.train.topology import Topology


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
    # DeepSpeed adopts the process group above (it only creates one when none exists).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    if cpu:
        release_cpu_allreduce_buffer(top.rank)


def shutdown_distributed() -> None:
    """Leave the process group after a clean finish (NCCL warns of leaked resources otherwise)."""
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm gains and the (tied) embedding rows keep their scale."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(
    plan: RunPlan, rank: int, load_weights: Callable[[], dict[str, torch.Tensor]] | None = None
) -> tuple[torch.nn.Module, int]:
    """The model of the run's family with its initial weights, and its parameter count.

    The weights come from ``run.seed`` alone (or from ``load_weights``, an lmscale state dict of some or all
    parameters, the others seeded), so every rank and every ZeRO stage starts from the same values. Under
    ZeRO-3 the model is constructed inside ``deepspeed.zero.Init``: each module's parameters are partitioned
    over the ranks as soon as the module exists, so no rank ever holds the whole model. Initial values are then
    written one parameter at a time into a gathered copy on rank 0 (drawn on the CPU from the seed, as in the
    other stages), and ``load_weights`` is called on rank 0 only.
    """
    generator = torch.Generator().manual_seed(plan.cfg.run.seed)
    if plan.cfg.zero.stage != 3:
        model = build_family_model(plan.model_config, generator)
        if load_weights is not None:
            model.load_state_dict(load_weights(), strict=False)
        return model, count_parameters(model)

    ds_config = deepspeed_config(plan, accelerator_name())
    remote = "cpu" if plan.cfg.zero.offload_params == "cpu" else None
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote):
        # Each block is partitioned as soon as it is built, so the initialisation inside the model touches empty
        # local shards: the values are written below.
        model = build_family_model(plan.model_config)
    state = load_weights() if load_weights is not None and rank == 0 else None
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                if state is not None and name in state:
                    value = state[name]
                else:
                    value = torch.empty(param.shape)
                    model.init_parameter(name, value, generator)
                param.data.copy_(value)
    return model, count_parameters(model)


def build_engine(
    plan: RunPlan, model: torch.nn.Module, load_universal: bool = False
) -> tuple[Any, dict[str, Any], SpikeGuard | None]:
    """Wrap the model in a DeepSpeed engine (ZeRO stage, precision, clipping and AdamW from the plan). With
    ``trainer.spike_sigma`` the optimizer is lmscale's skip-step AdamW, gated by the returned guard."""
    cfg = plan.cfg
    ds_config = deepspeed_config(plan, accelerator_name(), load_universal)
    groups = param_groups(model, cfg.optim.weight_decay)
    if cfg.trainer.spike_sigma is None:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        return engine, ds_config, None
    o = cfg.optim
    optimizer = SkipStepAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    guard = SpikeGuard(cfg.trainer.spike_sigma, cfg.trainer.spike_window, engine.device)
    # ZeRO sets the global gradient norm (before clipping) just before it steps the optimizer on its partition.
    optimizer.step_factor = lambda: guard.step_factor(engine.optimizer._global_grad_norm)
    return engine, ds_config, guard


def barrier() -> None:
    torch.distributed.barrier()


def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage and world size, via DeepSpeed's own utility."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(ckpt_dir) / tag
    if written_by_bf16_optimizer(tag_dir):
        return bf16_optimizer_state_dict(tag_dir)
    # It prints its progress to stdout, which is the result channel of `lmscale eval` and `export`.
    with contextlib.redirect_stdout(io.StringIO()):
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
