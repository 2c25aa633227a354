"""The one module that imports DeepSpeed: distributed start-up and the ZeRO engine."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from lmscale.models import GPT
from lmscale.train.ds_config import deepspeed_config
from lmscale.train.plan import RunPlan


def accelerator_name() -> str:
    return get_accelerator().device_name()


def init_distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size). CPU ranks talk over gloo; GPUs over NCCL."""
    backend = "gloo" if accelerator_name() == "cpu" else get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator_name() != "cpu":
        get_accelerator().set_device(local_rank)
    else:
        release_cpu_allreduce_buffer(torch.distributed.get_rank())
    return torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size()


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


def build_engine(plan: RunPlan, model: GPT, load_universal: bool = False) -> tuple[Any, dict[str, Any]]:
    """Wrap the model in a DeepSpeed engine (ZeRO stage, precision, clipping and AdamW from the plan)."""
    ds_config = deepspeed_config(plan, accelerator_name(), load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, plan.cfg.optim.weight_decay), config=ds_config
    )
    return engine, ds_config


def barrier() -> None:
    torch.distributed.barrier()


def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage and world size, via DeepSpeed's own utility."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints its progress to stdout, which is the result channel of `lmscale eval` and `export`.
    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
