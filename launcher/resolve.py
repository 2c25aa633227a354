"""Config resolution, in one place, for every command that starts a run (``train``, ``finetune``, ``submit``):
the YAML with its ``--set`` overrides, validated, local paths made absolute -> a fine-tuning config's labelled
data prepared (``launcher.finetune``) -> the plan against the datasets and a world size (``lmscale.train.plan``),
or a submission target's when its data is not reachable yet -> the config the run directory keeps, and the
DeepSpeed config of the ranks. A rank reads the kept config back (``lmscale.train.main.join_job``) and plans
it for the world size it has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from launcher.preflight import Resources
from lmscale.config import Config, ConfigError, grad_accum_steps, load_config, pin_run_dir
from lmscale.data.manifest import is_remote
from lmscale.errors import UsageError
from lmscale.train.ds_config import deepspeed_config
from lmscale.train.plan import RunPlan, plan_run, read_manifests


def resolve_config(
    config: str, overrides: list[str], finetune: bool | None = None, write_labelled: bool = True
) -> Config:
    """The validated config with local paths made absolute, so that ranks started from any directory (srun,
    another node) find them. A fine-tuning config (with a finetune section) gets its data prepared by this process
    (``write_labelled``) or waits for it; ``finetune`` says which kind the command takes (None: either)."""
    cfg = load_config(config, overrides)
    cfg = pin_run_dir(cfg, cfg.run.path.absolute())
    if finetune is not None and finetune != (cfg.finetune is not None):
        raise UsageError(
            f"{config}: a fine-tuning config (with a finetune section) runs with `lmscale finetune`"
            if cfg.finetune is not None
            else f"{config}: `lmscale finetune` needs a finetune section (finetune.train: labelled examples)"
        )
    if cfg.finetune is not None:
        from launcher.finetune import resolve_task

        cfg = resolve_task(cfg, write_labelled)
    if cfg.data.path is not None and not is_remote(cfg.data.path):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).absolute())))
    sources = [
        s if is_remote(s.path) else dataclasses.replace(s, path=str(Path(s.path).absolute())) for s in cfg.data.sources
    ]
    downstream = []
    for i, task in enumerate(cfg.trainer.downstream):
        if not Path(task.path).is_file():
            raise ConfigError(f"trainer.downstream[{i}].path: {task.path}: file not found")
        downstream.append(dataclasses.replace(task, path=str(Path(task.path).absolute())))
    trainer = dataclasses.replace(cfg.trainer, downstream=downstream)
    cache_dir = str(Path(cfg.data.cache_dir).absolute()) if cfg.data.cache_dir else None
    data = dataclasses.replace(cfg.data, sources=sources, cache_dir=cache_dir)
    return dataclasses.replace(cfg, data=data, trainer=trainer)


def kept_config(plan: RunPlan) -> Config:
    """The config as the run directory keeps it: the global batch (micro x accumulation x world size when the
    YAML gave no global batch) and no accumulation, which every start of a rank derives from its world size."""
    trainer = dataclasses.replace(plan.cfg.trainer, global_batch_size=plan.global_batch_size, grad_accum_steps=None)
    return dataclasses.replace(plan.cfg, trainer=trainer)


def resolve_for_ranks(
    config: str,
    overrides: list[str],
    world_size: int,
    accelerator: str,
    finetune: bool | None = None,
    write_labelled: bool = True,
) -> tuple[Config, RunPlan, dict]:
    """The config as the run directory keeps it, its plan for ``world_size`` ranks, and the DeepSpeed config."""
    plan = plan_run(resolve_config(config, overrides, finetune, write_labelled), world_size)
    return kept_config(plan), plan, deepspeed_config(plan, accelerator)


def plan_for_target(cfg: Config, res: Resources) -> tuple[RunPlan, str | None]:
    """The plan, or, when the dataset cannot be read yet, a plan without it and the reason (a dry run still
    renders everything that does not depend on the data)."""
    try:
        read_manifests(cfg)
    except ConfigError as err:
        accum = grad_accum_steps(cfg, res.world_size)
        unresolved = [f for f, v in (("model.vocab_size", cfg.model.vocab_size), ("model.seq_len", cfg.model.seq_len))
                      if v is None]  # fmt: skip
        reason = str(err) + (f"; unresolved until it is: {', '.join(unresolved)}" if unresolved else "")
        resolved = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, grad_accum_steps=accum))
        return RunPlan(resolved, res.world_size, []), reason
    return plan_run(cfg, res.world_size), None
