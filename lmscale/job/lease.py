"""One live job per run directory: the lease ``RUN_DIR/lease.json``.

A job takes the lease before it writes anything in the run directory and keeps it until its ranks have exited:

- ``lmscale train`` (node 0 for every node of the job, and for DeepSpeed's hostfile launcher), the process of a
  local job (``lmscale submit --backend local``) and a Ray job's driver take it, and pass its id to their ranks
  (``--lease``), whose rank 0 checks that the file still holds it;
- ranks that anything else started (``srun`` in lmscale's Slurm script, torchrun or srun on a ``--prepare-only``
  run directory) have rank 0 take it.

The holder rewrites the file every ``RENEW_SECONDS``. Another start reads it, and is refused in one line while
the holder lives. It takes the lease over when the holder is gone:

- the holder ran on this machine, in this pid namespace (the same boot id and namespace), and its process is
  not running (or its pid now runs a process started after the lease: a recycled pid);
- the holder ran on another machine (or in another container) and has not renewed the lease for
  ``TIMEOUT_SECONDS``: the nodes' clocks
  must agree to well within that, as NTP keeps a cluster's;
- the holder is an earlier attempt of the same submitted job (the same job id, a lower attempt: a Slurm requeue,
  which starts only once the earlier attempt has ended), at once.

Only link(2) and rename(2) are relied on, each atomic on local filesystems and on those clusters share (NFS does
each on the server in one operation, Lustre on its metadata server): the lease is created by a hard link, which
fails if it exists (``lmscale.files.create_exclusive``); a gone holder's lease is removed only by the one
contender whose hard link of it to a name of that lease's own succeeded; renewal replaces the file by rename.
flock and fcntl locks are not used: NFS serves them through a separate lock manager whose lock of a crashed
client lives on until the server notices, and Lustre grants them only when mounted with ``-o flock``. A gone
holder must be recognisable from the file alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lmscale import run_layout
from lmscale.errors import LmscaleError, one_line
from lmscale.files import create_exclusive, remove, write_text

RENEW_SECONDS = 30.0
TIMEOUT_SECONDS = 300.0
"""How long a lease held on another machine stays live without a renewal: ten renewals, and well above what
an NFS client's attribute cache (60 s at most by default) can delay a renewal's visibility by."""
CLAIM_TRIES = 20
JOB_ID_VARIABLES = ("LMSCALE_JOB_ID", "SLURM_JOB_ID")
"""Where a process finds the id of the submitted job it belongs to (lmscale's local and Ray jobs set the first)."""


class RunDirInUse(LmscaleError):
    """Another job holds the run directory."""


class LeaseLost(LmscaleError):
    """This job's lease was taken over (it had not renewed it in time) or removed."""


def process_space() -> str:
    """Where this process's pids mean something: the machine's boot id and the pid namespace. Hosts can share
    a name (network namespaces, containers), and containers on one machine share its boot id but not their
    pids, so a holder's pid is only looked up where both agree."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def job_id_from_env() -> str | None:
    return next((os.environ[name] for name in JOB_ID_VARIABLES if os.environ.get(name)), None)


def attempt_from_env() -> int:
    """Which attempt of its job this process is: Slurm counts requeues in SLURM_RESTART_COUNT."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def clock(seconds: float) -> str:
    stamp = time.localtime(seconds)
    return time.strftime("%H:%M:%S" if stamp[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", stamp)


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the job that holds it."""

    lease_id: str
    holder: str
    """The process that holds it: "lmscale train", "rank 0", "local job", "Ray job driver"."""
    host: str
    process_space: str
    pid: int
    pid_started: float
    job_id: str | None
    attempt: int
    launch_id: str | None
    started_at: float
    renewed_at: float
    took_over: dict[str, Any] | None = None
    """The holder this one took the lease over from (its fields, ``described`` in words), and why it was gone
    (``reason``)."""

    @classmethod
    def this_process(cls, holder: str, job_id: str | None, launch_id: str | None) -> Holder:
        now = time.time()
        return cls(lease_id=uuid.uuid4().hex, holder=holder, host=socket.gethostname(),
                   process_space=process_space(),
                   pid=os.getpid(), pid_started=psutil.Process().create_time(), job_id=job_id,
                   attempt=attempt_from_env(), launch_id=launch_id, started_at=now, renewed_at=now)  # fmt: skip

    def who(self) -> str:
        process = f"{self.holder}, pid {self.pid}"
        return f"job {self.job_id} ({process})" if self.job_id else f"`{self.holder}` (pid {self.pid})"

    def describe(self) -> str:
        return f"{self.who()} on {self.host} since {clock(self.started_at)}"

    def gone(self, claimant: Holder) -> str | None:
        """Why ``claimant`` may take the lease over, or None while this holder lives."""
        if self.job_id is not None and self.job_id == claimant.job_id and self.attempt < claimant.attempt:
            return f"attempt {self.attempt} of the same job"
        if self.process_space == claimant.process_space:
            try:
                process = psutil.Process(self.pid)
                started = process.create_time()
                if process.status() == psutil.STATUS_ZOMBIE:
                    return f"pid {self.pid} has exited"
            except psutil.NoSuchProcess:
                return f"pid {self.pid} is not running"
            # create_time is rounded differently on each read: a recycled pid started well after the lease.
            return None if started <= self.pid_started + 1 else f"pid {self.pid} now runs another process"
        silent = time.time() - self.renewed_at
        return f"not renewed for {silent:.0f} s" if silent > TIMEOUT_SECONDS else None

    def refusal(self, run_dir: Path) -> str:
        """The line a start that finds the lease live prints."""
        how = f"`lmscale cancel {self.job_id}`" if self.job_id else f"stop it (kill {self.pid} on {self.host})"
        line = f"{run_dir} is in use by {self.describe()}; {how}, or wait"
        if self.process_space != process_space():
            silent = max(0.0, time.time() - self.renewed_at)
            line += (f" (its lease was renewed {silent:.0f} s ago; a lease not renewed for {TIMEOUT_SECONDS:.0f} s "
                     "is taken over)")  # fmt: skip
        return line


def lease_path(run_dir: Path) -> Path:
    return run_dir / run_layout.LEASE


def read(run_dir: Path) -> Holder | None:
    """The run directory's holder, or None when no job holds it."""
    return _parse(lease_path(run_dir))


def _parse(path: Path) -> Holder | None:
    try:
        raw = json.loads(path.read_text())
        return Holder(**{f.name: raw[f.name] for f in dataclasses.fields(Holder) if f.name in raw})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise LmscaleError(
            f"{path}: unreadable ({one_line(err)}); remove it once no job runs in {path.parent}"
        ) from None


def in_use(run_dir: Path) -> str | None:
    """The refusal a start on ``run_dir`` would get now, or None when it may start (the lease is free or its
    holder gone). What ``--prepare-only`` and ``lmscale submit`` check: they write there but hold nothing."""
    holder = read(run_dir)
    claimant = Holder.this_process("check", job_id_from_env(), None)
    return holder.refusal(run_dir) if holder is not None and holder.gone(claimant) is None else None


class Lease:
    """A lease this process holds: renewed in a background thread while held, removed on release."""

    def __init__(self, run_dir: Path, record: Holder) -> None:
        self.run_dir, self.record = run_dir, record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self.record.lease_id

    def renew(self) -> None:
        current = read(self.run_dir)
        if current is None or current.lease_id != self.id:
            by = f"by {current.describe()}" if current else "(removed)"
            raise LeaseLost(f"{lease_path(self.run_dir)}: this job's lease was taken over {by}")
        self.record = dataclasses.replace(self.record, renewed_at=time.time())
        write_text(lease_path(self.run_dir), json.dumps(dataclasses.asdict(self.record)) + "\n", unique=True)

    def keep(self, on_lost: Callable[[LeaseLost], None] | None = None) -> Lease:
        """Renew every RENEW_SECONDS until released; ``on_lost`` (default: one line, then the process ends
        without saving: another job owns the run directory now) when the lease is no longer this job's."""

        def renewing() -> None:
            while not self._stop.wait(RENEW_SECONDS):
                try:
                    self.renew()
                except LeaseLost as lost:
                    (on_lost or stop_the_process)(lost)
                    return
                except OSError:
                    continue  # a shared filesystem's hiccup: the next renewal tries again, long before the timeout

        self._thread = threading.Thread(target=renewing, name="lmscale-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError, LmscaleError):
            current = read(self.run_dir)
            if current is not None and current.lease_id == self.id:
                remove(lease_path(self.run_dir))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def stop_the_process(lost: LeaseLost) -> None:
    print(f"lmscale: error: {lost}; stopping without saving", file=sys.stderr, flush=True)
    os._exit(1)


def claim(run_dir: Path, holder: str, job_id: str | None = None, launch_id: str | None = None) -> Lease:
    """Take the run directory's lease for this process, or raise ``RunDirInUse`` naming its live holder. The
    returned lease is not renewed until ``keep()``."""
    path = lease_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mine = Holder.this_process(holder, job_id, launch_id)
    for _ in range(CLAIM_TRIES):
        try:
            if create_exclusive(path, json.dumps(dataclasses.asdict(mine)) + "\n"):
                return Lease(run_dir, mine)
        except OSError as err:
            raise LmscaleError(f"{path}: cannot create it ({one_line(err)})") from None
        current = read(run_dir)
        if current is None:
            continue  # released meanwhile
        reason = current.gone(mine)
        if reason is None:
            raise RunDirInUse(current.refusal(run_dir))
        # Whoever removes it (this process, or a contender first), the lease this one creates replaces it.
        previous = {k: v for k, v in dataclasses.asdict(current).items() if k != "took_over"}
        mine = dataclasses.replace(mine, took_over={**previous, "described": current.describe(), "reason": reason})
        _remove_stale(path, current)
    markers = sorted(path.parent.glob(f".{path.name}.gone-*"))
    if markers:  # left by a start that died between marking a gone holder's lease and removing it
        raise LmscaleError(f"{path}: {markers[0]} marks it as being taken over; remove both if no other start runs")
    raise LmscaleError(f"{path}: other jobs kept taking it while this one tried; start one job at a time")


def _remove_stale(path: Path, stale: Holder) -> None:
    """Remove ``stale``'s lease, as exactly one contender can: a hard link to a name of that lease's own, which
    fails for every contender but the first, marks it as being removed. The marker's content says whether the
    file linked was still ``stale``'s (a faster contender may have replaced it by its own meanwhile), and only
    then is it removed: nobody but the marker's maker removes a gone holder's lease, and the gone holder
    itself no longer renews or releases it."""
    marker = path.with_name(f".{path.name}.gone-{stale.lease_id}")
    try:
        os.link(path, marker)
    except FileNotFoundError:
        return  # removed meanwhile
    except FileExistsError:
        time.sleep(0.05)  # another contender is removing it: give it the moment that takes
        return
    try:
        if (_parse(marker) or stale).lease_id == stale.lease_id:
            remove(path)
    finally:
        remove(marker)
