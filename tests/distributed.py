"""Distributed tests without the command line: spawn N processes from pytest, each a rank of one gloo job, and run a
module-level function in every one of them (OLMo-core's style). What each returns comes back to the test; a
rank's failure fails the test with that rank's traceback, and no process outlives the call."""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.nodes import cpu_rank_env

from .conftest import GLOBAL_BATCH_OVERRIDES, REPO

RANK_TIMEOUT_SECONDS = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    import torch.distributed as dist

    from lmscale.job.exit_codes import exit_process

    try:
        outcome = (rank, "ok", fn(rank, *args))
    except BaseException:  # the test gets the traceback, whatever the rank raised
        outcome = (rank, "error", traceback.format_exc())
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the loader's queues unregister their semaphores as they go: the exit below skips that
    results.put(outcome)
    results.close()
    results.join_thread()  # the result is in the pipe: the rank may go
    # As a rank the launchers start would: without the interpreter's seconds of library finalizers.
    exit_process(0 if outcome[1] == "ok" else 1)


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` spawned ranks (fresh interpreters, as a launcher would start them):
    the list of their results, by rank. ``fn`` and its results must pickle."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    ranks = [
        context.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results))
        for rank in range(world_size)
    ]
    # The environment the node launcher gives CPU ranks (thread pools sized to a share of the cores), in place
    # before a rank's interpreter loads its OpenMP runtime, which reads it once: runs here and through the
    # command line then compute alike, to the bit.
    saved = dict(os.environ)
    os.environ.update(cpu_rank_env(world_size))
    try:
        for process in ranks:
            process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcome) < world_size:
            try:
                rank, status, value = results.get(timeout=RANK_TIMEOUT_SECONDS)
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(outcome))} gave no result "
                                     f"in {RANK_TIMEOUT_SECONDS:.0f} s") from None  # fmt: skip
            outcome[rank] = (status, value)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return [outcome[rank][1] for rank in range(world_size)]


def prepare_run(run_dir: Path, nproc: int, overrides: list[str]) -> Path:
    """The run directory as ``lmscale train --prepare-only`` writes it for ``nproc`` ranks, in this process."""
    from launcher.parser import build_parser
    from launcher.train import train

    argv = ["train", str(REPO / "configs" / "gpt-tiny.yaml"), "--nproc", str(nproc), "--prepare-only"]
    for item in [*overrides, f"run.dir={run_dir}"]:
        argv += ["--set", item]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train(build_parser().parse_args(argv)) == 0
    return run_dir


def fit(
    rank: int, run_dir: Path, stop: tuple[int, int] | None = None, poison: tuple[int, int] | None = None
) -> dict[str, Any]:
    """One rank of the run: its own start-up (``start_trainer``), then ``fit``. ``stop`` = (rank, step): that
    rank alone gets SIGUSR1 before that step. ``poison`` = (rank, step): that rank's loss of that step is NaN.
    A rank whose run fails returns the error's line."""
    from lmscale.errors import LmscaleError
    from lmscale.job import topology
    from lmscale.job.signals import StopRequest
    from lmscale.train.main import start_trainer

    trainer = start_trainer(topology.detect(), run_dir, "auto", StopRequest())
    step_once, forward_once = trainer.train_step, trainer.forward

    def train_step() -> Any:
        if stop is not None and stop == (rank, trainer.state.step + 1):
            os.kill(os.getpid(), signal.SIGUSR1)
        return step_once()

    def forward(inputs: Any, hits: Any) -> Any:
        loss = forward_once(inputs, hits)
        return loss * float("nan") if poison == (rank, trainer.state.step + 1) else loss

    trainer.train_step, trainer.forward = train_step, forward  # type: ignore[method-assign]
    code, error = 1, None
    try:
        code = trainer.fit()
    except LmscaleError as err:
        error = str(err)
    finally:
        trainer.close(code)
    return {"code": code, "error": error, "state": trainer.state.to_dict(), "rollbacks": trainer.rollbacks}


def train_ranks(run_dir: Path, nproc: int, overrides: list[str], **fit_args: Any) -> list[dict[str, Any]]:
    """``lmscale train`` without the command line: the run directory prepared here, ``nproc`` ranks spawned
    from pytest each running its start-up and the loop; their ``fit`` results."""
    prepare_run(run_dir, nproc, overrides)
    return run_ranks(fit, run_dir, fit_args.get("stop"), fit_args.get("poison"), world_size=nproc)


def train_in_process(dataset: Path, run_dir: Path, nproc: int, *overrides: str) -> list[dict[str, Any]]:
    """What ``run_cli(*train_args(dataset, run_dir, nproc, *overrides))`` trains (a GLOBAL_BATCH_OVERRIDES run),
    without the command line; every rank must finish."""
    results = train_ranks(run_dir, nproc, [*GLOBAL_BATCH_OVERRIDES, f"data.path={dataset}", *overrides])
    assert [r["code"] for r in results] == [0] * nproc, results
    return results
