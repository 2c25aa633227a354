"""Several nodes on one machine: each "node" is a network namespace with its own address, joined to the other
by a veth pair, so ranks rendezvous and talk over gloo across a real (virtual) link, as on a cluster.

Needs root and iproute2 (CI runs as root). The namespaces, their /etc/netns files and every process in them
are removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from .conftest import REPO, ensure_debian_packages, keys_per_step, losses, metrics_records, run_cli, train_args

pytestmark = pytest.mark.slow

SUBNET = "10.231.0"


@dataclass(frozen=True)
class Node:
    namespace: str
    address: str
    hostname: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _remove_namespace(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@pytest.fixture
def two_nodes() -> Iterator[list[Node]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        reason = "network namespaces need root and iproute2"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must provide both, or the multi-node routes go untested")
        pytest.skip(f"{reason} (CI has both)")
    tag = f"lms{os.getpid() % 100000}"
    nodes = [Node(f"{tag}n{i}", f"{SUBNET}.{i}", f"{tag}node{i}") for i in (1, 2)]
    try:
        _ip("link", "add", f"{tag}v1", "type", "veth", "peer", "name", f"{tag}v2")
        for i, node in enumerate(nodes, 1):
            _ip("netns", "add", node.namespace)
            _ip("link", "set", f"{tag}v{i}", "netns", node.namespace)
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", f"{tag}v{i}")
            _ip("-n", node.namespace, "link", "set", f"{tag}v{i}", "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")
            # `ip netns exec` mounts these over /etc/hosts. Like a Debian host, each node's own name resolves to
            # 127.0.1.1 locally: the master's must still be reached over the veth by the other node.
            hosts = ["127.0.0.1 localhost"] + [
                f"{'127.0.1.1' if other is node else other.address} {other.hostname}" for other in nodes
            ]
            Path(f"/etc/netns/{node.namespace}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{node.namespace}/hosts").write_text("\n".join(hosts) + "\n")
        yield nodes
    finally:
        for node in nodes:
            _remove_namespace(node.namespace)
        subprocess.run(["ip", "link", "delete", f"{tag}v1"], capture_output=True)


def cpu_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


def start(node: Node, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", node.namespace, *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 420) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results.append((proc.returncode, err))
    return results


def train_on_nodes(nodes: list[Node], dataset: Path, run_dir: Path, nproc: int, port: int, *overrides: str) -> None:
    """``lmscale train --nnodes`` on every node, the later nodes first (they wait for node 0)."""
    base = [sys.executable, "-m", "launcher", *train_args(dataset, run_dir, nproc, *overrides)]
    procs = []
    for rank in reversed(range(len(nodes))):
        flags = ["--nnodes", str(len(nodes)), "--node-rank", str(rank), "--master-addr", nodes[0].address,
                 "--master-port", str(port)]  # fmt: skip
        procs.append(start(nodes[rank], [*base, *flags], cpu_env()))
    for code, err in finish(procs):
        assert code == 0, err[-4000:]


def sample_keys(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((run_dir / "sample_keys").glob("rank_*.jsonl"))}


def test_two_nodes_train_like_one_node_resume_across_nodes_and_run_under_srun(
    two_nodes: list[Node], dataset: Path, two_rank_reference: Path, tmp_path: Path
) -> None:
    reference = losses(two_rank_reference)
    assert sorted(reference) == list(range(1, 7))

    run_dir = tmp_path / "two-nodes"
    train_on_nodes(two_nodes, dataset, run_dir, 1, 29611, "trainer.max_steps=3")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    train_on_nodes(two_nodes, dataset, run_dir, 1, 29612, "trainer.max_steps=6")
    # The same ranks, samples and sums as one node: the same losses. (One node all-reduces through DeepSpeed's
    # shared-memory path, two nodes through gloo's ring, so the last bits may differ.)
    assert losses(run_dir) == pytest.approx(reference, abs=1e-6)
    assert sample_keys(run_dir) == sample_keys(two_rank_reference)
    events = [(r["step"], r["event"]) for r in metrics_records(run_dir) if "event" in r]
    assert events == [(0, "start"), (3, "checkpoint"), (3, "start"), (3, "resume"), (6, "checkpoint")]
    starts = [r for r in metrics_records(run_dir) if r.get("event") == "start"]
    assert all((s["world_size"], s["nodes"], s["started_by"]) == (2, 2, "launcher") for s in starts)
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["route"] == "nodes" and launch["world_size"] == 2

    # srun's route: the run directory prepared once, then one task per rank with the variables srun sets;
    # the master is the first host of the node list, whose name node 1 resolves to its own loopback.
    srun_dir = tmp_path / "srun"
    prepared = run_cli(*train_args(dataset, srun_dir, 2, "trainer.max_steps=6"), "--prepare-only")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert f"python -m lmscale.train.main {srun_dir}" in prepared.stdout
    prefix = two_nodes[0].hostname.removesuffix("1")
    slurm = {"SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": f"{prefix}[1-2]",
             "SLURM_JOB_ID": "77", "SLURM_LOCALID": "0"}  # fmt: skip
    procs = [
        start(node, [sys.executable, "-m", "lmscale.train.main", str(srun_dir)], cpu_env(**slurm, SLURM_PROCID=str(r)))
        for r, node in enumerate(two_nodes)
    ]
    for code, err in finish(procs):
        assert code == 0, err[-4000:]
    assert losses(srun_dir) == pytest.approx(reference, abs=1e-6)
    starts = [r for r in metrics_records(srun_dir) if r.get("event") == "start"]
    assert [(s["world_size"], s["nodes"], s["started_by"]) for s in starts] == [(2, 2, "slurm")]


def test_two_nodes_of_two_ranks_keep_the_global_batch(
    two_nodes: list[Node], dataset: Path, two_rank_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "2x2"
    train_on_nodes(two_nodes, dataset, run_dir, 2, 29621, "trainer.max_steps=6")
    # 4 ranks of one micro-batch each train on the samples 2 ranks of two micro-batches did, step for step.
    config = (run_dir / "config.yaml").read_text()
    assert "global_batch_size: 16" in config and "grad_accum_steps: null" in config
    assert keys_per_step(run_dir) == keys_per_step(two_rank_reference)
    # Other world size, other summation order: equal up to rounding.
    assert losses(run_dir) == pytest.approx(losses(two_rank_reference), abs=2e-4)


def test_a_dead_rank_on_one_node_stops_every_node(two_nodes: list[Node], dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "launcher", *train_args(dataset, run_dir, 1, "trainer.max_steps=100000",
                                                          "schedule.total_steps=100000", "checkpoint.every_steps=0")]  # fmt: skip
    flags = ["--nnodes", "2", "--master-addr", two_nodes[0].address, "--master-port", "29631"]
    node1 = start(two_nodes[1], [*base, *flags, "--node-rank", "1"], cpu_env())
    node0 = start(two_nodes[0], [*base, *flags, "--node-rank", "0"], cpu_env())
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 2):
        assert node0.poll() is None and node1.poll() is None, "a node stopped before training"
        time.sleep(0.5)
    victims = psutil.Process(node1.pid).children()  # the rank (its loader workers are its own children)
    assert len(victims) == 1
    killed_at = time.time()
    victims[0].kill()
    (code1, err1), (code0, err0) = finish([node1, node0], timeout=120)
    assert time.time() - killed_at < 60  # not the collective timeout (10 minutes)
    assert code1 == 137 and "lmscale: error: rank 1 (node 1) exited with code -9 (killed by signal SIGKILL)" in err1
    assert code0 != 0 and "lmscale: error:" in err0


@pytest.fixture
def ssh_nodes(two_nodes: list[Node], tmp_path: Path) -> Iterator[list[Node]]:
    """An sshd in each node namespace that takes a test key for root, and an ssh client configuration (in the
    namespaces' /etc/ssh) that uses it: what DeepSpeed's launcher and pdsh need to start ranks on the nodes.
    The machine's own /etc/ssh and /root/.ssh are not touched."""
    ensure_debian_packages({"sshd": "openssh-server", "pdsh": "pdsh", "ssh": "openssh-client"})
    keys = tmp_path / "ssh"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "id")], check=True)
    shutil.copy(keys / "id.pub", keys / "authorized_keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    for node in two_nodes:
        etc_ssh = Path(f"/etc/netns/{node.namespace}/ssh")  # mounted over /etc/ssh inside the namespace
        etc_ssh.mkdir(parents=True)
        (etc_ssh / "sshd_config").write_text(
            # 127.0.1.1 too: a node reaches itself by its own name, which resolves there (see two_nodes).
            f"ListenAddress {node.address}\nListenAddress 127.0.1.1\nHostKey {keys / 'host'}\nPermitRootLogin prohibit-password\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            f"PidFile {keys / node.namespace}.pid\n"
        )
        (etc_ssh / "ssh_config").write_text(
            f"Host *\n  IdentityFile {keys / 'id'}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n  BatchMode yes\n"
        )
        sshd = subprocess.Popen(["ip", "netns", "exec", node.namespace, shutil.which("sshd") or "sshd", "-D", "-e"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        assert sshd.poll() is None
    deadline = time.time() + 30
    for node in two_nodes:
        probe = ["ip", "netns", "exec", two_nodes[0].namespace, "ssh", node.hostname, "true"]
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.time() < deadline, f"sshd on {node.hostname} does not answer"
            time.sleep(0.3)
    yield two_nodes  # the namespaces' teardown kills the sshds with every other process in them


def test_deepspeeds_hostfile_launcher_starts_the_ranks_on_both_nodes(
    ssh_nodes: list[Node], dataset: Path, two_rank_reference: Path, tmp_path: Path
) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{node.hostname} slots=1\n" for node in ssh_nodes))
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "launcher", *train_args(dataset, run_dir, 1, "trainer.max_steps=6"),
            "--hostfile", str(hostfile)]  # fmt: skip
    [(code, err)] = finish([start(ssh_nodes[0], argv, cpu_env())])
    assert code == 0, err[-4000:]
    # pdsh ran DeepSpeed's per-node launcher over ssh on each node; the ranks met at node 1's address.
    assert losses(run_dir) == pytest.approx(losses(two_rank_reference), abs=1e-6)
    assert keys_per_step(run_dir) == keys_per_step(two_rank_reference)
    [started] = [r for r in metrics_records(run_dir) if r.get("event") == "start"]
    assert (started["world_size"], started["nodes"], started["started_by"]) == (2, 2, "launcher")
    assert json.loads((run_dir / "launch.json").read_text())["route"] == "hostfile"
