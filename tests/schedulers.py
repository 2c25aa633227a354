"""Real schedulers for the tests: a single-node Slurm (munged, slurmctld, slurmd from Debian's packages) and a
local Ray head with token authentication, each started by a session fixture that stops every process it
started, by PID, also when a test fails. Needs root (CI runs as root)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from .conftest import ensure_debian_packages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must provide it, or the scheduler routes go untested")
    pytest.skip(reason)


def _stop(processes: list[psutil.Process], grace: float = 10.0) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)


def _wait_for(what: str, ready: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up in {timeout:g} s:\n{log.read_text()[-3000:] if log.is_file() else ''}")
        time.sleep(0.5)


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path
    env: dict[str, str]
    """The environment that points Slurm's commands (and lmscale's) at this cluster: SLURM_CONF."""

    def run(self, *command: str) -> str:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True).stdout

    def job_field(self, job_id: str, field: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=self.env, capture_output=True,
                             text=True).stdout  # fmt: skip
        for part in out.split():
            if part.startswith(f"{field}="):
                return part.split("=", 1)[1]
        return ""


SLURM_CONF = """\
ClusterName=lmscale-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd in the foreground (their PIDs are ours), configured for this machine as
    one node of 4 CPUs, with state, logs and munge socket in a temporary directory."""
    if os.geteuid() != 0:
        _unavailable("a Slurm cluster needs root")
    ensure_debian_packages({"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-client",
                            "munged": "munge"})  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="lmslurm-", dir="/tmp"))
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=_free_port(), d_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_at = time.time()
    log = (root / "daemons.log").open("w")
    daemons: list[subprocess.Popen] = []
    cluster = SlurmCluster(conf, env)
    try:
        daemons.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
             f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge.log", f"--seed-file={root}/munge/seed"],
            stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        _wait_for("munged", (root / "munge" / "munge.socket").exists, 30, root / "munge.log")
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stdout=log,
                                        stderr=subprocess.STDOUT))  # fmt: skip
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", "localhost"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT))  # fmt: skip

        def idle() -> bool:
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return sinfo.stdout.strip() == "idle"

        _wait_for("Slurm", idle, 60, root / "slurmctld.log")
        yield cluster
    finally:
        # Jobs first (their steps' processes belong to slurmstepd, not to the daemons), then the daemons.
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
        _stop([psutil.Process(d.pid) for d in daemons if d.poll() is None])
        leftovers = [p for p in psutil.process_iter(["name", "create_time"])
                     if p.info["name"] == "slurmstepd" and p.info["create_time"] >= started_at]  # fmt: skip
        _stop(leftovers)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class RayHead:
    address: str
    """The GCS, HOST:PORT (``lmscale prepare --ray-address``)."""
    dashboard: str
    """The Jobs API, http://HOST:PORT (``lmscale submit --backend ray --address``)."""
    temp_dir: Path
    """Ray's temp directory of this head (RAY_TMPDIR): where its ray_current_cluster file is."""
    env: dict[str, str]
    """An environment that holds the head's token (RAY_AUTH_TOKEN_PATH)."""


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """``ray start --head --block`` on loopback with token authentication, in a session of its own whose
    every process (GCS, raylet, dashboard, workers, their children) is stopped at the end."""
    root = Path(tempfile.mkdtemp(prefix="lmsray-", dir="/tmp"))  # short: Ray's socket paths have a size limit
    token = root / "token"
    token.write_text(secrets.token_hex(16))
    gcs, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(token)}
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(root / "t")}
    log_path = root / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
             "--dashboard-agent-listen-port", str(_free_port()), "--temp-dir", str(root / "t"), "--disable-usage-stats"],
            env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"

    def answers() -> bool:
        # The Jobs API's own listing, with the token as Ray's client sends it (a plain request: cheap to repeat).
        request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token.read_text()}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _wait_for("the Ray head", answers, 90, log_path)
        yield RayHead(f"127.0.0.1:{gcs}", url, root / "t", env)
    finally:
        session = [p for p in psutil.process_iter() if _session(p) == head.pid]
        _stop(session, grace=3.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except OSError:
        return None
