"""``lmscale train``: validate and resolve the config, write the run directory, start the ranks.

Routes (every one ends in ``python -m lmscale.train.main RUN_DIR`` on each rank):

- one node: ``--nproc G``; this process hosts the rendezvous and starts G ranks (``launcher.nodes``);
- several nodes: the same command on every node with ``--nnodes N --node-rank R --master-addr HOST``;
  node 0 writes the run directory, the others wait for it through the rendezvous;
- ``--hostfile``: DeepSpeed's own multi-node launcher (pdsh/ssh) starts the ranks on the listed hosts;
- ``--prepare-only``: write the run directory and print the per-rank command, for any other scheduler.

Without a GPU the ranks are CPU processes talking over gloo (``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from torch.distributed import TCPStore

from launcher.nodes import NodeSpec, cpu_rank_env, open_store, publish_run_dir, run_node, wait_for_run_dir
from launcher.rank_command import RANK_MODULE, rank_args, rank_argv
from launcher.resolve import resolve_for_ranks
from lmscale import run_layout
from lmscale.config import Config, load_config
from lmscale.data.manifest import dataset_tokenizer
from lmscale.errors import LmscaleError, UsageError
from lmscale.files import replacing, write_text
from lmscale.footprint import GB, estimate_memory
from lmscale.job import lease as run_dir_lease
from lmscale.job.signals import StopRequest
from lmscale.train import checkpoint
from lmscale.train.plan import RunPlan, check_same_sample_order, lanes_warning

DEFAULT_MULTI_NODE_PORT = 29500


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_record(world_size: int, route: str) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True)
    return {
        "launch_command": shlex.join(["lmscale", *sys.argv[1:]]),
        "launch_id": uuid.uuid4().hex,
        "route": route,
        "world_size": world_size,
        "git_commit": commit.stdout.strip() or None if commit.returncode == 0 else None,
        "git_dirty": str(bool(dirty.stdout.strip())) if dirty.returncode == 0 else None,
        "launched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_resume(cfg: Config, ckpt_dir: Path, resume: str) -> None:
    """Refuse before any rank starts what the ranks would refuse: see ``checkpoint.resume_tag``."""
    tag = checkpoint.resume_tag(ckpt_dir, resume)
    if tag is not None:
        check_same_sample_order(cfg, checkpoint.read_state(ckpt_dir, tag)["config"], tag)


def write_run_dir(cfg: Config, plan: RunPlan, ds_config: dict, launch: dict) -> Path:
    """The run directory every rank reads: config, DeepSpeed config, tokenizer, launch record (last)."""
    run_dir = cfg.run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    # Other nodes read these files over a shared filesystem: never let them see half of one.
    write_text(run_dir / run_layout.CONFIG, cfg.to_yaml())
    write_text(run_dir / run_layout.DEEPSPEED, json.dumps(ds_config, indent=2) + "\n")
    # Export and eval need the tokenizer; keep it with the run (checked against the manifest), wherever the
    # dataset is and in case it moves.
    tokenizer = dataset_tokenizer(cfg.data.resolved_sources()[0].path, plan.manifests[0])
    with replacing(run_dir / run_layout.TOKENIZER) as tmp:
        tmp.write_bytes(tokenizer)
    write_text(run_dir / run_layout.LAUNCH, json.dumps(launch, indent=2) + "\n")
    return run_dir


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile: one ``host slots=N`` per line, ``#`` comments."""
    hosts = []
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--hostfile {path}: file not found")
    for number, line in enumerate(file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise UsageError(f"--hostfile {path}:{number}: expected `HOST slots=N`, got {line!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise UsageError(f"--hostfile {path}: lists no hosts")
    return hosts


def print_prepared(run_dir: Path, world_size: int, cfg: Config, resume: str) -> None:
    command = shlex.join(rank_argv(run_dir, resume, python="python"))
    print(f"prepared {run_dir} for {world_size} ranks (global batch {cfg.trainer.global_batch_size} sequences; "
          "any world size that divides it works)")  # fmt: skip
    print("start every rank with:")
    print(f"  {command}")
    print("with its place in the job in the environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    print("(torchrun, the DeepSpeed launcher) or SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (srun), e.g.")
    print(f"  srun --ntasks-per-node=GPUS --kill-on-bad-exit=1 {command}")
    print(f"  torchrun --nnodes N --node-rank R --master-addr HOST --nproc-per-node GPUS -m {RANK_MODULE} {run_dir}")
    print(f"rank 0 takes the run directory's lease ({run_dir / run_layout.LEASE}): one job at a time runs there")


def check_topology(args: argparse.Namespace, gpus: int) -> tuple[int, int]:
    """(ranks on this node, world size) from the command line."""
    nproc = args.nproc or max(gpus, 1)
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: must be at least 1")
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc}: this node has {gpus} GPUs")
    if args.nnodes < 1:
        raise UsageError(f"--nnodes {args.nnodes}: must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank}: must be in [0, --nnodes={args.nnodes})")
    if args.nnodes > 1 and not args.master_addr and not args.prepare_only:
        raise UsageError("--nnodes: several nodes need --master-addr (the address of node 0 the others reach)")
    if args.hostfile:
        if args.nnodes > 1:
            raise UsageError("--hostfile: DeepSpeed's launcher places the nodes; do not combine it with --nnodes")
        return nproc, sum(slots for _, slots in read_hostfile(args.hostfile))
    return nproc, args.nnodes * nproc


def train(args: argparse.Namespace, early: StopRequest | None = None) -> int:
    """``lmscale train``; ``early`` holds a stop signal that arrived before the ranks could be told."""
    gpus = gpu_count()
    nproc, world_size = check_topology(args, gpus)
    overrides = [*args.set, *([f"logging.peak_flops={args.peak_flops}"] if args.peak_flops else [])]
    # A config prepared on a login node without GPUs is still for the GPU nodes that will run it.
    accelerator = "cpu" if not gpus and not args.prepare_only else "cuda"
    cfg, plan, ds_config = resolve_for_ranks(
        args.config, overrides, world_size, accelerator, args.finetune, write_labelled=args.node_rank == 0
    )
    if args.dry_run:
        print("# resolved lmscale config")
        print(cfg.to_yaml())
        print(f"# generated DeepSpeed config (world size {world_size})")
        print(json.dumps(ds_config, indent=2))
        estimate = estimate_memory(cfg, world_size, cfg.trainer.micro_batch_size, accelerator, plan.seq_len)
        print(f"# estimated peak memory per {accelerator} rank: {estimate.total / GB:.2f} GB")
        print(f"#   {estimate.describe()}")
        return 0
    route = "hostfile" if args.hostfile else "prepare-only" if args.prepare_only else "nodes"
    if args.node_rank == 0:
        check_resume(cfg, cfg.run.path / run_layout.CHECKPOINTS, args.resume)
        if warning := lanes_warning(cfg, world_size):
            print(f"lmscale: warning: {warning}", file=sys.stderr)
    launch = launch_record(world_size, route)
    if args.prepare_only:
        # The ranks that start from it take the lease; a live job there must not have its files rewritten.
        if refusal := run_dir_lease.in_use(cfg.run.path):
            raise run_dir_lease.RunDirInUse(refusal)
        run_dir = write_run_dir(cfg, plan, ds_config, launch)
        print_prepared(run_dir, world_size, cfg, args.resume)
        return 0
    env = cpu_rank_env(nproc) if not gpus else dict(os.environ)
    spec = NodeSpec(
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        nproc=nproc,
        master_addr=args.master_addr or "127.0.0.1",
        master_port=args.master_port or (DEFAULT_MULTI_NODE_PORT if args.nnodes > 1 else None),
        timeout_minutes=cfg.trainer.collective_timeout_minutes,
        stop_grace_seconds=args.stop_grace_s,
    )
    if spec.node_rank != 0:
        store = open_store(spec)
        return run_node(spec, store, join_prepared_run(cfg, store, spec), args.resume, env, early=early)
    # Node 0 holds the run directory for every node of the job until its ranks have exited.
    lease = run_dir_lease.claim(cfg.run.path, "lmscale train", run_dir_lease.job_id_from_env(), launch["launch_id"])
    with lease.keep():
        run_dir = write_run_dir(cfg, plan, ds_config, launch)
        if args.hostfile:
            return deepspeed_hostfile_launch(args, run_dir, env, lease.id)
        store = open_store(spec)
        publish_run_dir(store, run_dir, launch["launch_id"])
        return run_node(spec, store, run_dir, args.resume, env, early=early, lease_id=lease.id)


def join_prepared_run(cfg: Config, store: TCPStore, spec: NodeSpec) -> Path:
    """On a node other than 0: the run directory node 0 wrote, once this node can read all of it, checked
    against this node's own resolution of the command line (the same config must start every node)."""
    run_dir, launch_id = wait_for_run_dir(store, spec)
    deadline = time.monotonic() + 60
    # A shared filesystem may show this node the previous launch's files for a moment: wait for this one's.
    while True:
        launch_file = run_dir / run_layout.LAUNCH
        try:
            seen = json.loads(launch_file.read_text()).get("launch_id")
        except (OSError, ValueError):
            seen = None
        if seen == launch_id:
            break
        if time.monotonic() > deadline:
            raise LmscaleError(
                f"{launch_file}: node 0 wrote launch {launch_id}, this node reads {seen}: is {run_dir} on a "
                "filesystem every node mounts?"
            )
        time.sleep(1)
    theirs = config_fields(load_config(run_dir / run_layout.CONFIG).to_dict())
    for name, value in config_fields(cfg.to_dict()).items():
        if theirs.get(name) != value:
            raise UsageError(
                f"{name}: {value!r} on node {spec.node_rank}, {theirs.get(name)!r} in node 0's "
                f"{run_dir / run_layout.CONFIG}: start every node with the same config and --set values"
            )
    return run_dir


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """``section.key`` -> value; a section a config leaves out (None, as pretraining does ``task``) is one entry."""
    fields: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            fields.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            fields[section] = values
    return fields


def deepspeed_hostfile_launch(args: argparse.Namespace, run_dir: Path, env: dict[str, str], lease_id: str) -> int:
    """DeepSpeed's launcher starts ``lmscale.train.main`` on every host of the hostfile (pdsh/ssh for several
    hosts, which must all mount the run directory); SIGTERM and SIGUSR1 reach this host's ranks."""
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", args.hostfile,
        *(["--master_addr", args.master_addr] if args.master_addr else []),
        "--master_port", str(args.master_port or DEFAULT_MULTI_NODE_PORT),
        "--module", RANK_MODULE, *rank_args(run_dir, args.resume, lease_id),
    ]  # fmt: skip
    runner = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: object) -> None:
        # DeepSpeed's runner would kill the ranks (SIGTERM, then SIGKILL after 30 s) or die of SIGUSR1;
        # the ranks themselves checkpoint at the next step and exit with code 3.
        for rank in rank_processes(runner.pid):
            rank.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    return runner.wait()


def rank_processes(runner_pid: int) -> list[psutil.Process]:
    """The rank processes under the DeepSpeed runner: children of its per-node ``launch`` process."""
    try:
        tree = psutil.Process(runner_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    launchers = {p.pid for p in tree if "deepspeed.launcher.launch" in " ".join(p.cmdline())}
    return [p for p in tree if p.ppid() in launchers]
