"""What each rank runs: ``python -m lmscale.train.main --config runs/<name>/config.yaml``.

Started by the DeepSpeed launcher, ``srun`` or a Ray job; the launcher has already validated the config
and written the resolved copy into the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import uuid
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lmscale.config import Config, load_config
from lmscale.data.stream import ShardStream, StreamSource, split_shards
from lmscale.errors import LmscaleError, one_line
from lmscale.export.hf_dir import load_hf_model
from lmscale.models import GPT, flops_per_token
from lmscale.train import checkpoint
from lmscale.train.engine import barrier, build_engine, init_distributed
from lmscale.train.loop import LAUNCH_FILE, Trainer, TrainState
from lmscale.train.metrics import ConsoleSink, JsonlSink, MetricsLogger, Sink, WandbSink, last_logged_step
from lmscale.train.peak import peak_flops
from lmscale.train.plan import RunPlan, check_same_sample_order, plan_run

log = logging.getLogger("lmscale")


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave preemption to their rank: a worker killed by SIGTERM would crash the rank
    before it saves. They exit with the rank."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def data_loaders(plan: RunPlan, rank: int, start_position: int) -> tuple[DataLoader, DataLoader | None]:
    cfg = plan.cfg
    sources = cfg.data.resolved_sources()
    manifest = plan.manifests[0]
    common = dict(
        sample_len=manifest.sample_len,
        dtype=manifest.dtype,
        micro_batch_size=plan.micro_batch_size,
        rank=rank,
        world_size=plan.world_size,
        seed=cfg.run.seed,
        strict=cfg.data.strict,
    )
    train = ShardStream(
        [
            StreamSource(split_shards(s.path, m, "train"), s.weight)
            for s, m in zip(sources, plan.manifests, strict=True)
        ],
        start_position=start_position,
        shuffle=cfg.data.shuffle,
        lanes=cfg.data.lanes,
        **common,
    )
    workers = cfg.data.num_workers
    train_loader = DataLoader(
        train,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    val_record = manifest.splits.get("validation")
    if not cfg.trainer.eval_every_steps or val_record is None or not val_record.shards:
        if cfg.trainer.eval_every_steps:
            log.warning("%s has no validation samples: validation loss is not computed", sources[0].path)
        return train_loader, None
    val = ShardStream(
        [StreamSource(split_shards(sources[0].path, manifest, "validation"))],
        shuffle=False,
        max_micro_batches=cfg.trainer.eval_batches,
        **common,
    )
    return train_loader, DataLoader(val, batch_size=None, num_workers=0)


def resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint.latest_tag(ckpt_dir)
    checkpoint.read_state(ckpt_dir, resume)
    return resume


def wandb_run_id(run_dir: Path, saved: str | None) -> str:
    """The checkpoint's id, else the run directory's (a job that died before its first save), else new."""
    id_file = run_dir / "wandb_id"
    run_id = saved or (id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12])
    id_file.write_text(run_id)
    return run_id


def launch_info(run_dir: Path) -> dict:
    """The launch command and git commit that ``lmscale train`` recorded for this run."""
    path = run_dir / LAUNCH_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run(cfg: Config, resume: str) -> int:
    rank, _, world_size = init_distributed()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    plan = plan_run(cfg, world_size)
    cfg = plan.cfg
    run_dir = cfg.run.path
    ckpt_dir = run_dir / "checkpoints"

    tag = resume_tag(ckpt_dir, resume)
    saved = checkpoint.read_state(ckpt_dir, tag) if tag else {}
    if tag:
        check_same_sample_order(cfg, saved["config"], tag)
    # ZeRO partitions optimizer state by world size: another world size resumes from the universal form.
    elastic = bool(saved) and saved["world_size"] != world_size
    if elastic:
        if rank == 0:
            log.info("resuming a %d-rank checkpoint on %d ranks: converting %s", saved["world_size"], world_size, tag)
            checkpoint.convert_to_universal(ckpt_dir, tag)
        barrier()

    if torch.cuda.is_available() and cfg.trainer.precision == "fp32":
        # fp32 training means TF32 tensor-core matmuls (the rate MFU is measured against), as in every GPU stack.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Same seed on every rank: identical initial weights before ZeRO partitions them.
    torch.manual_seed(cfg.run.seed)
    model = GPT(plan.model_config())
    if cfg.model.init_from and tag is None:
        # Continued pretraining: start from a Hugging Face-format model (a checkpoint resume supersedes it).
        pretrained, _ = load_hf_model(cfg.model.init_from)
        model.load_state_dict(pretrained.state_dict())
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    engine, ds_config = build_engine(plan, model, load_universal=elastic)

    state = TrainState()
    # Dropout differs per rank; restored from the checkpoint below when the world size is unchanged.
    torch.manual_seed(cfg.run.seed * 1000 + rank)
    if tag is not None:
        checkpoint.load(engine, ckpt_dir, tag, rank, universal=elastic)
        state = TrainState(
            step=saved["step"],
            samples_seen=saved["samples_seen"],
            tokens_seen=saved["tokens_seen"],
            resumes=saved.get("resumes", 0) + 1,
            skipped_shards=saved.get("skipped_shards", []),
        )
        if elastic:
            torch.manual_seed(cfg.run.seed * 1000 + rank + state.step)
    train_loader, val_loader = data_loaders(plan, rank, state.samples_seen)

    model_cfg = plan.model_config()
    barrier()  # ranks measure a CPU peak together, as they will share the cores
    peak, peak_source = peak_flops(engine.device, cfg.trainer.precision, cfg.logging.peak_flops)
    run_info = {
        "deepspeed": ds_config,
        "world_size": world_size,
        "parameters": n_params,
        "flops_per_token": flops_per_token(model_cfg, plan.seq_len),
        "peak_flops_per_rank": peak,
        "peak_flops_source": peak_source,
        **launch_info(run_dir),
    }
    sinks: list[Sink] = []
    if rank == 0:
        state.wandb_id = wandb_run_id(run_dir, saved.get("wandb_id"))
        metrics_path = run_dir / "metrics.jsonl"
        logged_through = last_logged_step(metrics_path)  # before this job drops the steps it will retrain
        sinks = [ConsoleSink(cfg.trainer.max_steps, state.step), JsonlSink(metrics_path, start_step=state.step)]
        if cfg.logging.wandb.mode != "disabled":
            sinks.append(WandbSink(cfg, run_dir, state.wandb_id, run_info, logged_through))
        log.info(
            "model %s: %.2fM parameters, %d ranks, global batch %d x %d tokens, ZeRO stage %d, peak %.3g FLOP/s per "
            "rank (%s)", model_cfg.flavor, n_params / 1e6, world_size, plan.global_batch_size, plan.seq_len,
            cfg.zero.stage, peak or float("nan"), peak_source,
        )  # fmt: skip
    logger = MetricsLogger(sinks)
    if tag is not None:
        logger.event(state.step, "resume", tag=tag, world_size=world_size, previous_world_size=saved["world_size"])

    trainer = Trainer(
        plan,
        engine,
        iter(train_loader),
        val_loader,
        logger,
        state,
        rank,
        run_dir,
        flops_per_token=run_info["flops_per_token"],
        peak_flops=peak,
        loads_universal=elastic,
    )
    exit_code = 1  # what W&B records if fit() raises
    try:
        exit_code = trainer.fit()
        return exit_code
    finally:
        trainer.close()
        logger.close(exit_code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the resolved config written by `lmscale train`")
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--local_rank", type=int, help="set by the DeepSpeed launcher; LOCAL_RANK is used")
    args = parser.parse_args(argv)
    try:
        return run(load_config(args.config), args.resume)
    except LmscaleError as err:
        print(f"lmscale: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
