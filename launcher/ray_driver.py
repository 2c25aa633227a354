"""The driver of an lmscale Ray job: ``python -m launcher.ray_driver RUN_DIR --nodes N --nproc R ...``,
the entrypoint ``lmscale submit --backend ray`` gives the Ray Jobs API.

It reserves the job's resources in one placement group, starts one actor per rank in it, and has each
actor run the per-rank entry point (``python -m lmscale.train.main RUN_DIR``) as a child process with the
rank's place in the job in its environment, exactly as ``lmscale train`` would: Ray stays in this driver
and the actors, never in a rank's training process.

Placement: one bundle per node holding its R ranks' CPUs and GPUs, spread over N distinct nodes
(``STRICT_SPREAD``; one node: ``PACK``), with the R rank actors of a node in its bundle. Per-rank bundles
cannot be asked to land R on each node, and the ranks of a node must number R for the topology (node rank,
local rank). The master address is the node address Ray itself uses for rank 0's node (never loopback on
a cluster). A node's ranks all see the node's GPUs that its actors were given (``CUDA_VISIBLE_DEVICES``,
as under torchrun, so NCCL can use NVLink between them), each picking its own by ``LOCAL_RANK``.

Failure: a rank that exits with an error, or whose actor or node dies, ends the attempt at once with the
rank's last error line: the other ranks wait in a collective for the dead one and could not save anyway, so
their actors are killed (and their rank processes with them). Up to ``--max-requeues`` times the driver
then starts the job again from the latest checkpoint (a rank saving after a preemption signal exits with 3,
and counts the same way); after that the job fails with that line.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launcher.jobs import record_exit
from launcher.rank_command import rank_argv
from lmscale.errors import LmscaleError
from lmscale.job import lease as run_dir_lease
from lmscale.job.exit_codes import EXIT_PEER_LOST, SAVED_AND_STOPPED
from lmscale.job.parent import LAUNCHER_PID, die_with_parent

PLACEMENT_TIMEOUT_SECONDS = 600
PEER_REPORT_SECONDS = 5.0
"""How long a failure that is only a lost peer waits for the peer's own exit, which names the cause."""


@ray.remote(max_concurrency=2)
class Rank:
    """One rank: its node's address, its GPUs, and its process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def placement(self) -> tuple[str, list[str]]:
        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        """(exit code, last error line) of the rank; its output goes on to the job's log as it comes."""
        # A rank must not outlive its actor (Ray kills actors, not their children, when a job stops).
        self.process = subprocess.Popen(argv, env={**os.environ, **env, LAUNCHER_PID: str(os.getpid())},
                                        stdout=sys.stdout, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=die_with_parent)  # fmt: skip
        last: collections.deque[str] = collections.deque(maxlen=1)
        assert self.process.stderr is not None
        for line in self.process.stderr:
            sys.stderr.write(line)
            if line.strip() and not line.startswith(" "):
                last.append(line.strip())
        return self.process.wait(), (last[0] if last else "")

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


def outcome(ref: ray.ObjectRef) -> tuple[int, str]:
    """(exit code, last error line) of a finished rank."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        return 1, f"its actor died ({type(err).__name__}: the node was lost or killed)"


class Attempt:
    """One start of the job's ranks: placed, started, watched until they are all done or one fails."""

    def __init__(self, args: argparse.Namespace, lease_id: str) -> None:
        self.args, self.lease_id = args, lease_id
        bundle = {"CPU": args.nproc * args.cpus_per_rank}
        if args.gpus_per_rank:
            bundle["GPU"] = args.nproc * args.gpus_per_rank
        strategy = "STRICT_SPREAD" if args.nodes > 1 else "PACK"
        self.group = placement_group([dict(bundle) for _ in range(args.nodes)], strategy=strategy)
        print(f"lmscale: waiting for {args.nodes} nodes with {bundle} each", flush=True)
        if not self.group.wait(PLACEMENT_TIMEOUT_SECONDS):
            remove_placement_group(self.group)
            raise SystemExit(
                f"lmscale: error: the cluster did not offer {args.nodes} nodes with {bundle} each within "
                f"{PLACEMENT_TIMEOUT_SECONDS} s"
            )
        self.ranks = [
            Rank.options(
                num_cpus=args.cpus_per_rank,
                num_gpus=args.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=node),
            ).remote()
            for node in range(args.nodes)
            for _ in range(args.nproc)
        ]

    def environments(self) -> list[dict[str, str]]:
        args = self.args
        places = ray.get([rank.placement.remote() for rank in self.ranks])
        port = ray.get(self.ranks[0].free_port.remote())
        envs = []
        for index, (_, gpus) in enumerate(places):
            node = index // args.nproc
            node_gpus = sorted({g for _, ids in places[node * args.nproc : (node + 1) * args.nproc] for g in ids})
            env = {
                "RANK": str(index), "LOCAL_RANK": str(node_gpus.index(gpus[0]) if gpus else index % args.nproc),
                "WORLD_SIZE": str(len(self.ranks)), "LOCAL_WORLD_SIZE": str(args.nproc), "GROUP_RANK": str(node),
                "MASTER_ADDR": places[0][0], "MASTER_PORT": str(port),
            }  # fmt: skip
            if node_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            else:
                env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, int(args.cpus_per_rank))))
            envs.append(env)
        return envs

    def run(self, stopping: threading.Event) -> tuple[int, str]:
        """(exit code, what went wrong): 0 when every rank finished, 3 when they saved after a preemption
        signal, else the first failing rank's code and last error line."""
        argv = rank_argv(self.args.run_dir, lease=self.lease_id)
        pending = {rank.run.remote(argv, env): i for i, (rank, env) in enumerate(zip(self.ranks, self.environments(),
                                                                                       strict=True))}  # fmt: skip
        codes: list[int] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if stopping.is_set():
                self.signal(signal.SIGTERM)
            finished = [(pending.pop(ref), *outcome(ref)) for ref in done]
            codes += [code for _, code, _ in finished]
            failures = [f for f in finished if f[1] not in (0, *SAVED_AND_STOPPED)]
            if failures and pending and all(code == EXIT_PEER_LOST for _, code, _ in failures):
                # A rank that lost a peer in a collective is the echo: the peer's own exit follows at once.
                late, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PEER_REPORT_SECONDS)
                failures += [(pending.pop(ref), *outcome(ref)) for ref in late]
            if failures:
                # The others are stuck in a collective with the dead rank and cannot save: close() kills
                # their actors, and with them the rank processes.
                index, code, last_line = min(failures, key=lambda f: (f[1] in (0, EXIT_PEER_LOST), f[0]))
                return code, f"rank {index} exited with code {code}: {last_line}"
        return next((code for code in SAVED_AND_STOPPED if code in codes), 0), ""

    def signal(self, signum: int) -> None:
        for rank in self.ranks:
            rank.signal.remote(signum)

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        remove_placement_group(self.group)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--cpus-per-rank", type=float, default=1)
    parser.add_argument("--gpus-per-rank", type=float, default=0)
    parser.add_argument("--max-requeues", type=int, default=0)
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args(argv)

    stopping = threading.Event()
    # `ray job stop` (lmscale cancel) sends SIGTERM here: the ranks get it and save if they have time.
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    # The driver holds the run directory over all the job's attempts, before it asks the cluster for anything.
    try:
        lease = run_dir_lease.claim(args.run_dir, "Ray job driver", args.job_id)
    except LmscaleError as err:
        print(f"lmscale: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    with lease.keep():
        ray.init(logging_level="WARNING")
        return run_attempts(args, stopping, lease.id)


def run_attempts(args: argparse.Namespace, stopping: threading.Event, lease_id: str) -> int:
    attempt = 0
    while True:
        print(f"lmscale: job {args.job_id} attempt {attempt}: {args.nodes} nodes x {args.nproc} ranks", flush=True)
        current = Attempt(args, lease_id)
        try:
            code, problem = current.run(stopping)
        finally:
            current.close()
        record_exit(args.run_dir, args.job_id, attempt, code, ended=stopping.is_set())
        if code == 0 or stopping.is_set():
            return code
        if attempt >= args.max_requeues:
            if problem:
                print(f"lmscale: error: {problem}", file=sys.stderr, flush=True)
            return code
        attempt += 1
        why = problem or "the ranks saved after a preemption signal"
        print(f"lmscale: {why}; restarting from the latest checkpoint ({attempt} of {args.max_requeues})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
