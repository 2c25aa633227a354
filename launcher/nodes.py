"""One node's share of a job: start its ranks, watch them, pass signals on, and end with the job's exit code.

``lmscale train`` runs this once per node (once in all without ``--nnodes``). The job's rendezvous is
torch's TCPStore at ``--master-addr:--master-port``, hosted by node 0's launcher for the life of the job and
bound on all interfaces; the ranks join it as clients (``TORCHELASTIC_USE_AGENT_STORE``, as under torchrun),
so it exists before any rank starts. Through the store:

- node 0 publishes the run directory once it has written it; the other nodes wait for that, check that
  their own resolution of the command line gives the same config, and only then start their ranks;
- a rank that fails marks the job failed, and every node stops its ranks at once instead of letting them
  wait out the collective timeout on a dead peer;
- each node says when its ranks are done, and node 0 keeps the store up until every node has (a store that
  disappears while a node's ranks still run means node 0 died: that node stops too).

Exit codes: 0 when every rank finished, 3 when they stopped on a preemption signal after saving a
checkpoint, otherwise the code of the first rank that failed (128 + the signal for a rank that was killed,
which is then named in one line; 1 when a rank of another node failed, named likewise).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.distributed import TCPStore

from lmscale.errors import LmscaleError
from lmscale.train.loop import EXIT_PREEMPTED

READY_KEY = "lmscale/run_dir"
FAILED_KEY = "lmscale/failed"
DONE_KEY = "lmscale/done"
DONE_WAIT_SECONDS = 120.0
"""How long node 0 keeps the store up for the other nodes once its own ranks have exited."""
POLL_SECONDS = 0.5
KILL_GRACE_SECONDS = 15.0
"""How long ranks told to stop (a peer failed) get to exit before they are killed."""


@dataclass(frozen=True)
class NodeSpec:
    nnodes: int
    node_rank: int
    nproc: int
    """Ranks on this node."""
    master_addr: str
    master_port: int | None
    """None on a single node: the store takes a free port."""
    timeout_minutes: float
    """How long a node waits for node 0 (its store, then its run directory)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc


def open_store(spec: NodeSpec) -> TCPStore:
    timeout = datetime.timedelta(minutes=spec.timeout_minutes)
    where = f"{spec.master_addr}:{spec.master_port}"
    if spec.node_rank == 0:
        try:
            # The server listens on every interface whatever the host name; the name only matters to clients.
            return TCPStore(spec.master_addr, spec.master_port or 0, is_master=True, timeout=timeout,
                            wait_for_workers=False)  # fmt: skip
        except (RuntimeError, OSError) as err:
            raise LmscaleError(f"rendezvous {where}: cannot listen there ({one_reason(err)})") from None
    try:
        return TCPStore(spec.master_addr, spec.master_port, is_master=False, timeout=timeout)
    except (RuntimeError, OSError) as err:
        raise LmscaleError(
            f"rendezvous {where}: node 0 did not answer within {spec.timeout_minutes:g} min ({one_reason(err)}); "
            "start `lmscale train --node-rank 0` there, and check that this node reaches it"
        ) from None


def one_reason(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def publish_run_dir(store: TCPStore, run_dir: Path, launch_id: str) -> None:
    store.set(READY_KEY, json.dumps({"run_dir": str(run_dir), "launch_id": launch_id}))


def wait_for_run_dir(store: TCPStore, spec: NodeSpec) -> tuple[Path, str]:
    """The run directory node 0 published, and its launch id."""
    try:
        store.wait([READY_KEY], datetime.timedelta(minutes=spec.timeout_minutes))
    except (RuntimeError, OSError) as err:
        raise LmscaleError(
            f"rendezvous {spec.master_addr}:{spec.master_port}: node 0 did not publish its run directory within "
            f"{spec.timeout_minutes:g} min ({one_reason(err)})"
        ) from None
    record = json.loads(store.get(READY_KEY))
    return Path(record["run_dir"]), record["launch_id"]


def rank_env(spec: NodeSpec, local_rank: int, port: int, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update(
        RANK=str(spec.node_rank * spec.nproc + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_WORLD_SIZE=str(spec.nproc),
        GROUP_RANK=str(spec.node_rank),
        MASTER_ADDR=spec.master_addr,
        MASTER_PORT=str(port),
        # The store above is the job's: ranks connect to it instead of rank 0 hosting one.
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    return env


def rank_argv(run_dir: Path, resume: str) -> list[str]:
    return [sys.executable, "-m", "lmscale.train.main", str(run_dir), "--resume", resume]


class NodeRanks:
    """The rank processes of this node, with signal forwarding and failure propagation through the store."""

    def __init__(self, spec: NodeSpec, store: TCPStore, argv: list[str], base_env: dict[str, str]) -> None:
        self.spec, self.store = spec, store
        port = spec.master_port or store.port
        self.procs = [subprocess.Popen(argv, env=rank_env(spec, local, port, base_env)) for local in range(spec.nproc)]
        self.codes: dict[int, int] = {}

    def send(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def global_rank(self, local: int) -> int:
        return self.spec.node_rank * self.spec.nproc + local

    def wait(self) -> int:
        failure: tuple[int, str | None] | None = None  # (exit code, what to print when the rank could not)
        while len(self.codes) < len(self.procs):
            for local, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None or local in self.codes:
                    continue
                self.codes[local] = code
                if code not in (0, EXIT_PREEMPTED) and failure is None:
                    reason = f"rank {self.global_rank(local)} (node {self.spec.node_rank}) exited with code {code}"
                    # A rank that exits reports its own error; one killed by a signal never got to say anything.
                    failure = (code, None) if code > 0 else (128 - code, f"{reason} (killed by a signal)")
                    self._mark_failed(reason)
                    self._stop_all()
            if failure is None and (peer := self._peer_failed()) is not None:
                failure = (1, f"stopped: {peer}")
                self._stop_all()
            time.sleep(POLL_SECONDS)
        self._finish_with_the_job()
        # Node 0 answers for the job: a node that failed after node 0's ranks had finished fails it too.
        if failure is None and self.spec.node_rank == 0 and (peer := self._peer_failed()) is not None:
            failure = (1, f"failed: {peer}")
        if failure is not None:
            if failure[1] is not None:
                print(f"lmscale: error: {failure[1]}", file=sys.stderr)
            return failure[0]
        return EXIT_PREEMPTED if EXIT_PREEMPTED in self.codes.values() else 0

    def _finish_with_the_job(self) -> None:
        """Say this node is done; node 0, whose process holds the store, stays until every node has said so,
        so that a node whose ranks finish a moment later does not take the store's end for a failure."""
        with contextlib.suppress(RuntimeError, OSError):
            self.store.set(f"{DONE_KEY}/{self.spec.node_rank}", "1")
            if self.spec.node_rank == 0:
                keys = [f"{DONE_KEY}/{node}" for node in range(self.spec.nnodes)]
                self.store.wait(keys, datetime.timedelta(seconds=DONE_WAIT_SECONDS))

    def _mark_failed(self, reason: str) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.store.set(FAILED_KEY, reason)

    def _peer_failed(self) -> str | None:
        try:
            if self.store.check([FAILED_KEY]):
                return self.store.get(FAILED_KEY).decode()
        except (RuntimeError, OSError):
            return "the rendezvous store on node 0 is gone" if self.spec.node_rank else None
        return None

    def _stop_all(self) -> None:
        """Ask the surviving ranks to stop, then kill those stuck in a collective with the dead peer."""
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(POLL_SECONDS)
        self.send(signal.SIGKILL)
        for local, proc in enumerate(self.procs):
            self.codes.setdefault(local, proc.wait())


def run_node(
    spec: NodeSpec, store: TCPStore, argv: list[str], env: dict[str, str], forwarded: set[int] | None = None
) -> int:
    """Start this node's ranks and wait for them; SIGTERM, SIGUSR1 and SIGINT go to every rank, which
    checkpoint at the next step and exit with code 3. The signals this process passed on are added to
    ``forwarded``."""
    ranks = NodeRanks(spec, store, argv, env)
    previous: dict[int, Callable | int | None] = {}

    def forward(signum: int, frame: object) -> None:
        if forwarded is not None:
            forwarded.add(signum)
        ranks.send(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        previous[sig] = signal.signal(sig, forward)
    try:
        return ranks.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cpu_rank_env(nproc: int) -> dict[str, str]:
    """Environment of CPU ranks: DeepSpeed's CPU accelerator, and one thread pool per rank sized to its
    share of the cores (not one per core per rank)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env
