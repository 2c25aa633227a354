"""``lmscale train``: validate and resolve the config, write it into the run directory, start the ranks.

Local ranks are started by the DeepSpeed launcher (``deepspeed.launcher.runner``), which sets RANK,
LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT for each ``python -m lmscale.train.main`` process. Without
a GPU the ranks are CPU processes talking over gloo (``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lmscale.config import Config, load_config
from lmscale.data.manifest import is_remote
from lmscale.errors import UsageError
from lmscale.export.export import RUN_TOKENIZER
from lmscale.train import checkpoint
from lmscale.train.ds_config import deepspeed_config
from lmscale.train.loop import LAUNCH_FILE
from lmscale.train.plan import RunPlan, check_same_sample_order, lanes_warning, plan_run


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve(config: str, overrides: list[str], world_size: int) -> tuple[Config, RunPlan, dict]:
    cfg = load_config(config, overrides)
    # Pin the run directory in the resolved config so every rank and every resume agrees on it.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(cfg.run.path)))
    plan = plan_run(cfg, world_size)
    return plan.cfg, plan, deepspeed_config(plan, "cuda" if gpu_count() else "cpu")


def launch_record() -> dict[str, str | None]:
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True)
    return {
        "launch_command": shlex.join(["lmscale", *sys.argv[1:]]),
        "git_commit": commit.stdout.strip() or None if commit.returncode == 0 else None,
        "git_dirty": str(bool(dirty.stdout.strip())) if dirty.returncode == 0 else None,
        "launched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_resume(cfg: Config, ckpt_dir: Path, resume: str) -> None:
    latest = checkpoint.latest_tag(ckpt_dir)
    if resume == "none" and latest:
        raise UsageError(
            f"{ckpt_dir}: the run already has checkpoints; use --resume auto to continue it or another run.name"
        )
    tag = latest if resume == "auto" else None if resume == "none" else resume
    if tag is not None:
        check_same_sample_order(cfg, checkpoint.read_state(ckpt_dir, tag)["config"], tag)


def rank_command(nproc: int, port: int, config_path: Path, resume: str) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(nproc), "--master_port", str(port),
        "--module", "lmscale.train.main", "--config", str(config_path), "--resume", resume,
    ]  # fmt: skip


def train(args: argparse.Namespace) -> int:
    gpus = gpu_count()
    nproc = args.nproc or max(gpus, 1)
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: must be at least 1")
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc}: this node has {gpus} GPUs")
    overrides = [*args.set, *([f"logging.peak_flops={args.peak_flops}"] if getattr(args, "peak_flops", None) else [])]
    cfg, plan, ds_config = resolve(args.config, overrides, nproc)
    if args.dry_run:
        print("# resolved lmscale config")
        print(cfg.to_yaml())
        print(f"# generated DeepSpeed config (world size {nproc})")
        print(json.dumps(ds_config, indent=2))
        return 0
    run_dir = cfg.run.path
    check_resume(cfg, run_dir / "checkpoints", args.resume)
    if warning := lanes_warning(cfg, nproc):
        print(f"lmscale: warning: {warning}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(cfg.to_yaml())
    (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    data_path = cfg.data.resolved_sources()[0].path
    if not is_remote(data_path):
        # Export needs the tokenizer; keep it with the run in case the dataset moves.
        shutil.copyfile(Path(data_path) / plan.manifests[0].tokenizer_file, run_dir / RUN_TOKENIZER)
    (run_dir / LAUNCH_FILE).write_text(json.dumps(launch_record(), indent=2) + "\n")
    env = dict(os.environ)
    if not gpus:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # CPU ranks share the cores: one thread pool per rank, not one per core per rank.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = rank_command(nproc, args.master_port or free_port(), config_path, args.resume)
    launcher = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: object) -> None:
        # The DeepSpeed launcher would kill the ranks (SIGTERM, then SIGKILL after 30 s) or die of SIGUSR1;
        # the ranks themselves checkpoint at the next step and exit with code 3.
        for rank in rank_processes(launcher.pid):
            rank.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    return launcher.wait()


def rank_processes(runner_pid: int) -> list[psutil.Process]:
    """The rank processes under the DeepSpeed runner: children of its per-node ``launch`` process."""
    try:
        tree = psutil.Process(runner_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    launchers = {p.pid for p in tree if "deepspeed.launcher.launch" in " ".join(p.cmdline())}
    return [p for p in tree if p.ppid() in launchers]
