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
checkpoint (130 on Ctrl-C), otherwise the code of the rank that failed first (128 + the signal for a rank
that was killed, which is then named in one line; 4 when ranks only lost a peer in a collective, a hung
one; 1 when a rank of another node failed, named likewise).
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

from launcher.rank_command import rank_argv
from lmscale import run_layout
from lmscale.errors import LmscaleError
from lmscale.job.exit_codes import EXIT_PEER_LOST, LAUNCHER_REPORTS_PEERS, SAVED_AND_STOPPED
from lmscale.job.parent import LAUNCHER_PID, die_with_parent
from lmscale.job.signals import STOP_SIGNALS, StopRequest

READY_KEY = "lmscale/run_dir"
FAILED_KEY = "lmscale/failed"
DONE_KEY = "lmscale/done"
DONE_WAIT_SECONDS = 120.0
"""How long node 0 keeps the store up for the other nodes once its own ranks have exited."""
POLL_SECONDS = 0.5
PEER_REPORT_SECONDS = 5.0
"""How long a node whose ranks lost a peer waits for the peer's node to name the rank that failed."""
STOP_RESEND_SECONDS = 2.0
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
    stop_grace_seconds: float = 600.0
    """How long ranks asked to stop get to save and exit before they are killed."""

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
    """``base`` and the rank's place in the job, as torchrun sets them."""
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
        **{LAUNCHER_REPORTS_PEERS: "1", LAUNCHER_PID: str(os.getpid())},
    )
    return env


def before_rank_starts() -> None:
    """In a rank process before it runs Python: it dies with this launcher (``lmscale.job.parent``), and stop
    signals are ignored (the disposition survives exec) until the rank installs its handler, so that one
    arriving during its imports does not kill it before it could checkpoint. The launcher re-sends the stop
    until the ranks exit."""
    die_with_parent()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class NodeRanks:
    """The rank processes of this node, with signal forwarding and failure propagation through the store."""

    def __init__(self, spec: NodeSpec, store: TCPStore, run_dir: Path, resume: str, base_env: dict[str, str],
                 lease_id: str | None) -> None:  # fmt: skip
        self.spec, self.store, self.run_dir = spec, store, run_dir
        port = spec.master_port or store.port
        argv = rank_argv(run_dir, resume, lease=lease_id)
        self.procs = [subprocess.Popen(argv, env=rank_env(spec, local, port, base_env), preexec_fn=before_rank_starts)
                      for local in range(spec.nproc)]  # fmt: skip
        self.codes: dict[int, int] = {}
        self.stop_signal: int | None = None
        self.stop_since = self.stop_sent = 0.0
        self.abandoned = False

    def request_stop(self, signum: int) -> None:
        """A stop signal for the job. The first is passed to every rank, and again every STOP_RESEND_SECONDS
        while they run: a rank still starting up ignores it until it can checkpoint. The same signal again (a
        second Ctrl-C) kills them without waiting for their checkpoint."""
        if signum == self.stop_signal:
            self.abandoned = True
            self.send(signal.SIGKILL)
            return
        if self.stop_signal is None:
            self.stop_since = time.monotonic()
        self.stop_signal = signum
        self.stop_sent = time.monotonic()
        self.send(signum)

    def _press_stop(self) -> tuple[int, str] | None:
        """Re-send the stop signal to ranks still running; past the grace, kill them and say so."""
        if self.stop_signal is None or self.abandoned:
            return None
        now = time.monotonic()
        if now - self.stop_since > self.spec.stop_grace_seconds:
            self.send(signal.SIGKILL)
            name, grace = signal.Signals(self.stop_signal).name, self.spec.stop_grace_seconds
            return 1, (f"stopped: the ranks did not save and exit within --stop-grace-s={grace:g} after {name}; "
                       "killed (the run resumes from its last complete checkpoint)")  # fmt: skip
        if now - self.stop_sent > STOP_RESEND_SECONDS:
            self.stop_sent = now
            self.send(self.stop_signal)
        return None

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
            exited = {local: code for local, proc in enumerate(self.procs)
                      if local not in self.codes and (code := proc.poll()) is not None}  # fmt: skip
            self.codes.update(exited)
            failed = [(local, code) for local, code in exited.items() if code not in (0, *SAVED_AND_STOPPED)]
            if failed and failure is None:
                # The rank that died is the cause; peers it left in a collective exit with EXIT_PEER_LOST at
                # about the same time, and are named only when nothing else failed (a hung peer).
                local, code = min(failed, key=lambda item: (item[1] == EXIT_PEER_LOST, item[0]))
                peer = self._wait_for_peer_failure() if code == EXIT_PEER_LOST else None
                if peer is not None:
                    failure = (1, f"stopped: {peer}")
                else:
                    failure = self._failure(local, code)
                    self._mark_failed(self._exited(local, code))
                self._stop_all()
            if failure is None and (peer := self._peer_failed()) is not None:
                failure = (1, f"stopped: {peer}")
                self._stop_all()
            if failure is None and (late := self._press_stop()) is not None:
                failure = late
            time.sleep(POLL_SECONDS)
        if self.abandoned:
            name = signal.Signals(self.stop_signal or signal.SIGINT).name
            failure = (128 + (self.stop_signal or signal.SIGINT), f"stopped without a checkpoint: a second {name}")
        self._finish_with_the_job()
        # Node 0 answers for the job: a node that failed after node 0's ranks had finished fails it too.
        if failure is None and self.spec.node_rank == 0 and (peer := self._peer_failed()) is not None:
            failure = (1, f"failed: {peer}")
        if failure is not None:
            if failure[1] is not None:
                print(f"lmscale: error: {failure[1]}", file=sys.stderr)
            return failure[0]
        # Ranks that saved and stopped agree on why: a scheduler's signal (3) or Ctrl-C (130).
        return next((code for code in SAVED_AND_STOPPED if code in self.codes.values()), 0)

    def _exited(self, local: int, code: int) -> str:
        return f"rank {self.global_rank(local)} (node {self.spec.node_rank}) exited with code {code}"

    def _failure(self, local: int, code: int) -> tuple[int, str | None]:
        """(the node's exit code, the line to print) for a failed rank. A rank that exits with an error has
        printed it; one killed by a signal never got to, and one that lost a peer leaves it to this launcher."""
        reason = self._exited(local, code)
        if code < 0:
            return 128 - code, f"{reason} (killed by signal {signal.Signals(-code).name})"
        if code == EXIT_PEER_LOST:
            log = self.run_dir / run_layout.LOGS / run_layout.RANK_LOG.format(rank=self.global_rank(local))
            return code, (
                f"{reason}: a collective failed (a peer rank died, or hung longer than trainer.step_timeout_minutes; "
                f"traceback in {log})"
            )
        return code, None

    def _finish_with_the_job(self) -> None:
        """Say this node is done; node 0, whose process holds the store, stays until every node has said so,
        so that a node whose ranks finish a moment later does not take the store's end for a failure."""
        with contextlib.suppress(RuntimeError, OSError):
            self.store.set(f"{DONE_KEY}/{self.spec.node_rank}", "1")
            if self.spec.node_rank == 0:
                keys = [f"{DONE_KEY}/{node}" for node in range(self.spec.nnodes)]
                self.store.wait(keys, datetime.timedelta(seconds=DONE_WAIT_SECONDS))

    def _wait_for_peer_failure(self) -> str | None:
        """The failure another node reports for the rank whose loss ended a collective here (a peer dies
        first, then its node says so): waited for briefly, as it may come a moment after the symptom."""
        deadline = time.monotonic() + PEER_REPORT_SECONDS
        while self.spec.nnodes > 1 and time.monotonic() < deadline:
            if (peer := self._peer_failed()) is not None:
                return peer
            time.sleep(POLL_SECONDS / 5)
        return None

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
    spec: NodeSpec,
    store: TCPStore,
    run_dir: Path,
    resume: str,
    env: dict[str, str],
    forwarded: set[int] | None = None,
    early: StopRequest | None = None,
    lease_id: str | None = None,
) -> int:
    """Start this node's ranks and wait for them; SIGTERM, SIGUSR1 and SIGINT go to every rank, which
    checkpoint at the next step and exit with code 3 (130 for SIGINT). The signals this process passed on are
    added to ``forwarded``; one that ``early`` caught before the ranks existed is passed on as they start.
    ``lease_id``: the run directory's lease this process holds for the ranks (node 0's)."""
    ranks = NodeRanks(spec, store, run_dir, resume, env, lease_id)
    previous: dict[int, Callable | int | None] = {}

    def forward(signum: int, frame: object) -> None:
        if forwarded is not None:
            forwarded.add(signum)
        ranks.request_stop(signum)

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, forward)
    if early is not None and early.signal_name is not None:
        forward(signal.Signals[early.signal_name], None)
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
