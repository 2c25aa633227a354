"""Distributed tests without the command line: spawn N processes from pytest, each a rank of one gloo job, and run a
module-level function in every one of them (OLMo-core's style). What each returns comes back to the test; a
rank's failure fails the test with that rank's traceback, and no process outlives the call."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

RANK_TIMEOUT_SECONDS = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
    )  # fmt: skip
    try:
        results.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # the test gets the traceback, whatever the rank raised
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


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
    for process in ranks:
        process.start()
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
