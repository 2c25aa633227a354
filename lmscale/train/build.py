"""The run's model and engine, built from its plan over the engine seam (``lmscale.train.engine``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmscale.families import build_model as build_family_model
from lmscale.models import count_parameters
from lmscale.train import engine
from lmscale.train.ds_config import deepspeed_config
from lmscale.train.plan import RunPlan
from lmscale.train.spike import SkipStepAdamW, SpikeGuard


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
    ZeRO-3 the model is constructed partitioned, so no rank ever holds the whole model. Initial values are then
    written one parameter at a time into a gathered copy on rank 0 (drawn on the CPU from the seed, as in the
    other stages), and ``load_weights`` is called on rank 0 only.
    """
    generator = torch.Generator().manual_seed(plan.cfg.run.seed)
    if plan.cfg.zero.stage != 3:
        model = build_family_model(plan.model_config, generator)
        if load_weights is not None:
            model.load_state_dict(load_weights(), strict=False)
        return model, count_parameters(model)

    ds_config = deepspeed_config(plan, engine.accelerator_name())
    with engine.partitioned_construction(ds_config, offload_to_cpu=plan.cfg.zero.offload_params == "cpu"):
        # The initialisation inside the model touches empty local shards: the values are written below.
        model = build_family_model(plan.model_config)
    state = load_weights() if load_weights is not None and rank == 0 else None
    for name, param in model.named_parameters():
        with engine.writable(param, writer_rank=0):
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
    ds_config = deepspeed_config(plan, engine.accelerator_name(), load_universal)
    groups = param_groups(model, cfg.optim.weight_decay)
    if cfg.trainer.spike_sigma is None:
        return engine.initialize(model, ds_config, param_groups=groups), ds_config, None
    o = cfg.optim
    optimizer = SkipStepAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    built = engine.initialize(model, ds_config, optimizer=optimizer)
    guard = SpikeGuard(cfg.trainer.spike_sigma, cfg.trainer.spike_window, built.device)
    optimizer.step_factor = lambda: guard.step_factor(engine.pre_clip_grad_norm(built))
    return built, ds_config, guard
