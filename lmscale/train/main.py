"""What each rank runs: ``python -m lmscale.train.main RUN_DIR``.

Every launcher ends here: ``lmscale train`` (its node launcher, one per node), the DeepSpeed launcher with a
hostfile, torchrun, ``srun``, or a Ray job. The rank reads its place in the job from the environment
(``lmscale.job.topology``) and the run from ``RUN_DIR/config.yaml``, which ``lmscale train`` (or
``--prepare-only``) wrote. That file keeps the global batch size; each start derives the micro-batches per
step from the world size it has, so the same run directory trains unchanged on any number of ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lmscale import run_layout
from lmscale.config import load_config, pin_run_dir
from lmscale.data.shard_cache import ShardCache
from lmscale.data.stream import ShardStream, StreamSource, split_shards
from lmscale.data.tokenizer import end_token_id, load_tokenizer
from lmscale.errors import AgreedError, LmscaleError, one_line
from lmscale.families import flops_per_token
from lmscale.footprint import estimate_memory
from lmscale.job import lease as run_dir_lease
from lmscale.job import topology
from lmscale.job.exit_codes import EXIT_PEER_LOST, LAUNCHER_REPORTS_PEERS, collective_failure, exit_process
from lmscale.job.lease import Lease
from lmscale.job.parent import die_with_parent, watch_launcher
from lmscale.job.signals import STOP_SIGNALS, StopRequest
from lmscale.tasks import Collate, task_of
from lmscale.train import checkpoint, memory
from lmscale.train.build import build_engine, build_model
from lmscale.train.downstream import ScoredTask, load_tasks
from lmscale.train.engine import barrier, device, init_distributed, shutdown_distributed
from lmscale.train.init_from import initial_weights
from lmscale.train.levers import apply_activation_checkpointing, compile_blocks
from lmscale.train.loop import Trainer
from lmscale.train.metrics import ConsoleSink, JsonlSink, MetricsLogger, Sink, TensorboardSink, WandbSink
from lmscale.train.peak import peak_flops, slow_precision
from lmscale.train.plan import RunPlan, check_same_sample_order, plan_run
from lmscale.train.spike import SpikeGuard
from lmscale.train.state import TrainState

log = logging.getLogger("lmscale")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def start_loader_worker(worker_id: int) -> None:
    """Loader workers leave stop requests to their rank: a worker killed by SIGTERM, or interrupted by the
    Ctrl-C its whole process group gets, would crash the rank before it saves. They exit with the rank, at once
    when it is killed (PyTorch's own check of the parent takes up to 5 s)."""
    die_with_parent()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def collator(plan: RunPlan, probability: float, examples: int | None = None) -> Collate:
    """The task's collator: masks drawn with ``probability`` where the task masks, only the first
    ``examples`` positions scored where it is given."""
    return task_of(plan.cfg.model).collator(plan.manifests[0], plan.cfg.run.seed, probability, examples)


def stream_options(plan: RunPlan, rank: int) -> dict[str, Any]:
    """What the training and validation streams of ``rank`` share."""
    cfg, manifest = plan.cfg, plan.manifests[0]
    return dict(
        sample_len=manifest.sample_len,
        dtype=manifest.dtype,
        micro_batch_size=plan.micro_batch_size,
        rank=rank,
        world_size=plan.world_size,
        seed=cfg.run.seed,
        strict=cfg.data.strict,
        cache=ShardCache(Path(cfg.data.cache_dir), int(cfg.data.cache_limit_gb * 1e9)) if cfg.data.cache_dir else None,
    )


def training_stream(plan: RunPlan, rank: int, start_position: int) -> ShardStream:
    cfg = plan.cfg
    return ShardStream(
        [
            StreamSource(split_shards(s.path, m, "train"), s.weight)
            for s, m in zip(cfg.data.resolved_sources(), plan.manifests, strict=True)
        ],
        start_position=start_position,
        shuffle=cfg.data.shuffle,
        lanes=cfg.data.lanes,
        collate=collator(plan, cfg.data.mlm_probability),
        **stream_options(plan, rank),
    )


def data_loaders(
    plan: RunPlan, rank: int, start_position: int, pin_memory: bool
) -> tuple[DataLoader, DataLoader | None]:
    cfg = plan.cfg
    sources = cfg.data.resolved_sources()
    manifest = plan.manifests[0]
    train = training_stream(plan, rank, start_position)
    workers = cfg.data.num_workers
    train_loader = DataLoader(
        train,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=start_loader_worker,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        # Page-locked batches let the copy to the GPU run asynchronously (non_blocking) beside the step.
        pin_memory=pin_memory,
    )
    val_record = manifest.splits.get("validation")
    if not cfg.trainer.eval_every_steps or val_record is None or not val_record.shards:
        if cfg.trainer.eval_every_steps:
            log.warning("%s has no validation samples: validation loss is not computed", sources[0].path)
        return train_loader, None
    batches, examples = cfg.trainer.eval_batches, None
    if task_of(cfg.model).every_example:
        # Every validation example once: the last micro-batches are filled up with positions that score nothing.
        examples = val_record.samples
        batches = -(-examples // (plan.micro_batch_size * plan.world_size))
    val = ShardStream(
        [StreamSource(split_shards(sources[0].path, manifest, "validation"))],
        shuffle=False,
        max_micro_batches=batches,
        collate=collator(plan, cfg.data.mlm_eval_probability, examples),
        **stream_options(plan, rank),
    )
    return train_loader, DataLoader(val, batch_size=None, num_workers=0, pin_memory=pin_memory)


def wandb_run_id(run_dir: Path, saved: str | None) -> str:
    """The checkpoint's id, else the run directory's (a job that died before its first save), else new."""
    id_file = run_dir / run_layout.WANDB_ID
    run_id = saved or (id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12])
    id_file.write_text(run_id)
    return run_id


def seed_dropout(ckpt_dir: Path, tag: str | None, rank: int, elastic: bool, seed: int, step: int) -> None:
    """The random state of the first step, set as the last thing before it: building the data loader's iterator
    and measuring the CPU peak draw from the generators, and would shift dropout if they ran after it.

    A resume on the same world size continues each rank's saved state, so it repeats the uninterrupted run bit
    for bit. Another world size has no per-rank state to continue: each rank reseeds from the run's seed, its
    rank and the step (the run goes on with other dropout masks than an uninterrupted one would have drawn)."""
    if tag is not None and not elastic:
        checkpoint.restore_rng(ckpt_dir, tag, rank)
    else:
        torch.manual_seed(seed * 1000 + rank + step)


def launch_info(run_dir: Path) -> dict:
    """The launch command and git commit that ``lmscale train`` recorded for this run."""
    path = run_dir / run_layout.LAUNCH
    return json.loads(path.read_text()) if path.is_file() else {}


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / run_layout.LOGS / run_layout.RANK_LOG.format(rank=rank)


def setup_logging(rank: int) -> None:
    """Rank 0's records on the console, and every rank's warnings there too; a rank's log file follows once
    its job holds the run directory (``log_to_file``)."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=logging.INFO, handlers=[console], format=log_format(rank))


def log_format(rank: int) -> str:
    return f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"


def log_to_file(run_dir: Path, rank: int) -> None:
    """All of this rank's records in its log file, when the run directory can take one."""
    path = rank_log_path(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError:
        return  # the start-up's own checks name an unwritable run directory
    handler.setFormatter(logging.Formatter(log_format(rank)))
    logging.getLogger().addHandler(handler)


@dataclass(frozen=True)
class Hold:
    """How this job holds its run directory."""

    lease: Lease | None
    """The lease rank 0 took (None on other ranks, and when the launcher holds it)."""
    took_over: dict[str, Any] | None
    """The holder whose lease this job took over because it was gone, and why."""


def hold_run_dir(plan: RunPlan, rank: int, lease_id: str | None) -> Hold:
    """Collective, before anything is written: rank 0 takes the run directory's lease, or checks that it still
    holds the one its launcher took (``lease_id``); another live job there stops every rank in one line."""
    run_dir, problem = plan.cfg.run.path, None
    lease: Lease | None = None
    holder: run_dir_lease.Holder | None = None
    if rank == 0:
        try:
            if lease_id is None:
                lease = run_dir_lease.claim(run_dir, "rank 0", run_dir_lease.job_id_from_env(),
                                            launch_info(run_dir).get("launch_id"))  # fmt: skip
                holder = lease.record
            elif (holder := run_dir_lease.read(run_dir)) is None or holder.lease_id != lease_id:
                held = f"holds {holder.describe()}'s" if holder else "is gone"
                problem = f"{run_dir_lease.lease_path(run_dir)}: the lease this rank's launcher took {held}"
        except LmscaleError as err:
            problem = str(err)
    checkpoint.agree(problem, rank)
    took_over = holder.took_over if holder else None
    if took_over:
        log.warning("took over %s from %s, which is gone (%s)", run_dir, took_over["described"], took_over["reason"])
    return Hold(lease.keep() if lease else None, took_over)


@dataclass(frozen=True)
class Start:
    """Where this start of the run begins: the checkpoint it resumes (None: a new run), what that checkpoint
    saved, whether it comes from another world size, and what start-up found on the way."""

    tag: str | None
    saved: dict[str, Any]
    elastic: bool
    """ZeRO partitions optimizer state by world size: another world size resumes from the universal form."""
    removed_partial_saves: list[str]
    rejected: list[tuple[str, str]]


def join_job(top: topology.Topology, run_dir: Path) -> RunPlan:
    """The run's plan for this world size, then the rendezvous. Planned before it: a world size the global
    batch does not divide fails at once on every rank."""
    config_path = run_dir / run_layout.CONFIG
    if not config_path.is_file():
        raise LmscaleError(
            f"{config_path}: missing (prepare the run directory with `lmscale train CONFIG --prepare-only`)"
        )
    plan = plan_run(pin_run_dir(load_config(config_path), run_dir), top.world_size)
    topology.export_env(top)
    init_distributed(top, plan.cfg.trainer.collective_timeout_minutes)
    if torch.cuda.is_available() and plan.cfg.trainer.precision == "fp32":
        # fp32 training means TF32 tensor-core matmuls (the rate MFU is measured against), as in every GPU stack.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return plan


def choose_start(plan: RunPlan, rank: int, resume: str) -> Start:
    """Collective: clear interrupted saves, check that checkpoints can be written (a directory that cannot take
    one fails the start, not the first save an hour later), and pick the verified checkpoint to resume."""
    ckpt_dir = plan.cfg.run.path / run_layout.CHECKPOINTS
    removed = checkpoint.remove_partial_saves(ckpt_dir) if rank == 0 else []
    if removed:
        log.warning("removed saves that a crash interrupted: %s", ", ".join(removed))
    checkpoint.agree(checkpoint.probe_writable(ckpt_dir, rank), rank)
    tag, rejected = checkpoint.choose(ckpt_dir, resume, rank)
    for bad, problem in rejected if rank == 0 else []:
        log.warning("checkpoint %s fails verification, trying an older one: %s", bad, problem)
    saved = checkpoint.read_state(ckpt_dir, tag) if tag else {}
    if tag:
        check_same_sample_order(plan.cfg, saved["config"], tag)
    elastic = bool(saved) and saved["world_size"] != plan.world_size
    if elastic and rank == 0:
        log.info("resuming a %d-rank checkpoint on %d ranks from its universal form", saved["world_size"],
                 plan.world_size)  # fmt: skip
    return Start(tag, saved, elastic, removed, rejected)


@dataclass(frozen=True)
class Built:
    """The model in its engine, and what building them cost rank 0's device beyond what it held before."""

    engine: Any
    ds_config: dict[str, Any]
    spike_guard: SpikeGuard | None
    parameters: int
    recomputed_blocks: int
    compile_seconds: float | None
    memory_gb: dict[str, float]


def build(plan: RunPlan, rank: int, start: Start) -> Built:
    """The model (seeded, or from ``model.init_from`` on a new run), its blocks recomputed and compiled as the
    config asks, in its DeepSpeed engine. Under ZeRO-3 the model's build costs a fraction of the full model,
    under stages 1-2 all of it."""
    cfg, rank_device = plan.cfg, device()
    init_from = cfg.model.init_from
    load_weights = (lambda: initial_weights(init_from, cfg.model)) if init_from and start.tag is None else None
    if rank == 0 and (slow := slow_precision(rank_device, cfg.trainer.precision)):
        log.warning(slow)
    baseline_gb = memory.in_use_gb(rank_device)
    model, n_params = build_model(plan, rank, load_weights)
    model_build_gb = memory.peak_gb(rank_device) - baseline_gb
    recomputed = apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    compile_seconds = None
    if cfg.trainer.compile:
        example = training_stream(plan, rank, 0).micro_batch(0)["inputs"]
        compile_seconds = compile_blocks(model, example, rank_device, PRECISIONS[cfg.trainer.precision])
    engine, ds_config, spike_guard = build_engine(plan, model, load_universal=start.elastic)
    used = {"runtime_gb": baseline_gb, "model_build_gb": model_build_gb,
            "engine_build_gb": memory.peak_gb(rank_device) - baseline_gb}  # fmt: skip
    return Built(engine, ds_config, spike_guard, n_params, len(recomputed), compile_seconds,
                 {name: round(value, 4) for name, value in used.items()})  # fmt: skip


def restore_state(plan: RunPlan, rank: int, start: Start, built: Built) -> TrainState:
    """The checkpoint's engine, optimizer, spike guard and position; a new run's zeros."""
    if start.tag is None:
        return TrainState()
    ckpt_dir = plan.cfg.run.path / run_layout.CHECKPOINTS
    saved = checkpoint.restore(built.engine, ckpt_dir, start.tag, rank, start.elastic, built.spike_guard)
    state = TrainState.from_dict(saved)
    state.resumes += 1
    return state


def run_info(plan: RunPlan, built: Built) -> dict[str, Any]:
    """What W&B records of the run besides its config."""
    peak, peak_source = peak_flops(built.engine.device, plan.cfg.trainer.precision, plan.cfg.logging.peak_flops)
    return {
        "deepspeed": built.ds_config,
        "world_size": plan.world_size,
        "parameters": built.parameters,
        "flops_per_token": flops_per_token(plan.model_config, plan.seq_len, plan.cfg.predicted_fraction),
        "peak_flops_per_rank": peak,
        "peak_flops_source": peak_source,
        **launch_info(plan.cfg.run.path),
    }


def open_metrics(plan: RunPlan, rank: int, state: TrainState, info: dict[str, Any]) -> MetricsLogger:
    """Rank 0's sinks (console, metrics.jsonl, TensorBoard if asked, W&B unless disabled); the other ranks log
    nothing."""
    if rank != 0:
        return MetricsLogger([])
    cfg, run_dir, model_cfg = plan.cfg, plan.cfg.run.path, plan.model_config
    state.wandb_id = wandb_run_id(run_dir, state.wandb_id or None)
    metrics_path = run_dir / run_layout.METRICS
    sinks: list[Sink] = [ConsoleSink(cfg.trainer.max_steps, state.step), JsonlSink(metrics_path, start_step=state.step)]
    if cfg.logging.tensorboard:
        sinks.append(TensorboardSink(run_dir / run_layout.TENSORBOARD, state.step))
    if cfg.logging.wandb.mode != "disabled":
        # What W&B may lack from earlier jobs, up to this job's first step (the JSONL sink kept those lines).
        replay = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        sinks.append(WandbSink(cfg, run_dir, state.wandb_id, info, replay))
    log.info(
        "model %s %s: %.2fM parameters, %d ranks, global batch %d x %d tokens, ZeRO stage %d, peak %.3g "
        "FLOP/s per rank (%s)", model_cfg.family, model_cfg.flavor, info["parameters"] / 1e6, plan.world_size,
        plan.global_batch_size, plan.seq_len, cfg.zero.stage, info["peak_flops_per_rank"] or float("nan"),
        info["peak_flops_source"],
    )  # fmt: skip
    return MetricsLogger(sinks)


def log_start(logger: MetricsLogger, top: topology.Topology, plan: RunPlan, hold: Hold, start: Start,
              built: Built, step: int) -> None:  # fmt: skip
    """The start event (what the start cost, the memory estimate) and what start-up found."""
    estimate = estimate_memory(plan.cfg, plan.world_size, plan.micro_batch_size, device().type, plan.seq_len)
    compiled = round(built.compile_seconds, 2) if built.compile_seconds is not None else None
    logger.event(
        step, "start", world_size=plan.world_size, nodes=top.nnodes, started_by=top.source, parameters=built.parameters,
        **built.memory_gb,
        full_model_fp32_gb=round(built.parameters * 4 / 1e9, 4), recomputed_blocks=built.recomputed_blocks,
        memory_estimate_gb=estimate.as_gb(), compile_seconds=compiled,
    )  # fmt: skip
    if hold.took_over:
        old = hold.took_over
        logger.event(step, "lease_taken_over", holder=old["described"], pid=old["pid"], host=old["host"],
                     job_id=old["job_id"], reason=old["reason"])  # fmt: skip
    if start.removed_partial_saves:
        logger.event(step, "removed_partial_saves", names=start.removed_partial_saves)
    for bad, problem in start.rejected:
        logger.event(step, "checkpoint_rejected", tag=bad, reason=problem)
    if start.tag is not None:
        logger.event(step, "resume", tag=start.tag, world_size=plan.world_size,
                     previous_world_size=start.saved["world_size"])  # fmt: skip


def downstream_tasks(plan: RunPlan) -> list[ScoredTask]:
    """``trainer.downstream``'s tasks, encoded with the run's tokenizer (the copy in the run directory)."""
    if not plan.cfg.trainer.downstream:
        return []
    tokenizer_file = plan.cfg.run.path / run_layout.TOKENIZER
    if not tokenizer_file.is_file():
        raise LmscaleError(f"trainer.downstream: {tokenizer_file} is missing (the run's copy of its tokenizer)")
    tokenizer = load_tokenizer(tokenizer_file)
    return load_tasks(plan.cfg.trainer.downstream, tokenizer, end_token_id(tokenizer))


def start_trainer(
    top: topology.Topology, run_dir: Path, resume: str, stop: StopRequest, lease_id: str | None = None
) -> Trainer:
    """A rank's start-up as named steps: the trainer, ready for its first step (tests drive it from here)."""
    rank = top.rank
    plan = join_job(top, run_dir)
    hold = hold_run_dir(plan, rank, lease_id)
    log_to_file(plan.cfg.run.path, rank)
    start = choose_start(plan, rank, resume)
    built = build(plan, rank, start)
    state = restore_state(plan, rank, start, built)
    pinned = device().type == "cuda"
    train_loader, val_loader = data_loaders(plan, rank, state.samples_seen, pin_memory=pinned)
    barrier()  # ranks measure a CPU peak together, as they will share the cores
    info = run_info(plan, built)
    logger = open_metrics(plan, rank, state, info)
    log_start(logger, top, plan, hold, start, built, state.step)
    trainer = Trainer(
        plan, built.engine, iter(train_loader), val_loader, logger, state, rank, plan.cfg.run.path,
        flops_per_token=info["flops_per_token"], peak_flops=info["peak_flops_per_rank"], stop=stop,
        spike_guard=built.spike_guard, loads_universal=start.elastic, lease=hold.lease,
        downstream=downstream_tasks(plan),
    )  # fmt: skip
    ckpt_dir = plan.cfg.run.path / run_layout.CHECKPOINTS
    seed_dropout(ckpt_dir, start.tag, rank, start.elastic, plan.cfg.run.seed, state.step)
    return trainer


def run(top: topology.Topology, run_dir: Path, resume: str, lease_id: str | None = None) -> int:
    if top.source != "single":
        watch_launcher(top.rank)
    # From here a stop signal is a request: honoured before the first step if it comes during start-up.
    stop = StopRequest()
    setup_logging(top.rank)
    trainer = start_trainer(top, run_dir, resume, stop, lease_id)
    exit_code = 1  # what W&B records if fit() raises
    try:
        exit_code = trainer.fit()
    finally:
        trainer.close(exit_code)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run directory `lmscale train` (or --prepare-only) wrote")
    parser.add_argument("--resume", default="auto", help="auto (latest checkpoint if any), none, or a tag")
    parser.add_argument("--lease", help="the run directory's lease its launcher holds (lmscale's launchers set it)")
    parser.add_argument("--local_rank", type=int, help="set by the DeepSpeed launcher; LOCAL_RANK is used")
    args = parser.parse_args(argv)
    rank = 0
    try:
        top = topology.detect()
        rank = top.rank
        code = run(top, args.run_dir, args.resume, args.lease)
    except LmscaleError as err:
        if not (isinstance(err, AgreedError) and err.quiet):
            print(f"lmscale: error: {one_line(err)}", file=sys.stderr)
        code = err.exit_code
    except Exception as err:  # the console gets one line, the rank's log the traceback
        code = report_crash(err, rank_log_path(args.run_dir, rank), rank)
    if code != EXIT_PEER_LOST:
        # Errors included: gloo's threads outliving the interpreter abort the rank (SIGABRT), which its launcher
        # would report in place of the rank's own line. Not with a peer gone: NCCL's shutdown would wait for it.
        shutdown_distributed()
    return code


def report_crash(err: Exception, log_path: Path, rank: int) -> int:
    """Write the traceback to the rank's log and one line to the console. A failed collective is the echo of
    another rank's failure, which its launcher names: rank 0 says it in one line, the others keep quiet (and
    rank 0 too when the launcher says it has it covered)."""
    try:
        with open(log_path, "a") as f:
            f.write("".join(traceback.format_exception(err)))
        where = f"; traceback in {log_path}"
    except OSError:
        where = ""
    reason = collective_failure(err)
    if reason is None:
        print(f"lmscale: error: rank {rank}: {type(err).__name__}: {one_line(err)}{where}", file=sys.stderr)
        return 1
    if rank == 0 and os.environ.get(LAUNCHER_REPORTS_PEERS) != "1":
        print(
            f"lmscale: error: rank {rank}: a collective failed ({reason}): a peer rank died, or hung longer than "
            f"trainer.step_timeout_minutes{where}",
            file=sys.stderr,
        )
    return EXIT_PEER_LOST


if __name__ == "__main__":
    exit_process(main())
