"""Where this rank sits in the job, read from whatever started it.

Every launcher ends in the same per-rank entry point (``python -m lmscale.train.main RUN_DIR``); this module
turns the launcher's environment into one ``Topology`` and the variables ``torch.distributed`` reads:

- torchrun, the DeepSpeed launcher, lmscale's node launcher: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE`` (DeepSpeed: ``LOCAL_SIZE``), ``MASTER_ADDR``, ``MASTER_PORT``;
- Slurm's ``srun`` (one task per rank): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
  ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``; the master is the first host of
  ``SLURM_JOB_NODELIST`` and the port is derived from ``SLURM_JOB_ID`` (``MASTER_ADDR`` / ``MASTER_PORT``
  win when the job script sets them);
- nothing: a single rank on this machine.

Gloo and NCCL pick the network interface of the machine's host name, which on a cluster node is often the
wrong one (a management network, or 127.0.1.1 from /etc/hosts). Each rank instead takes the interface its
kernel routes to the master address over, unless ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` are set.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from lmscale.errors import LmscaleError

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000
"""Slurm ranks rendezvous on SLURM_PORT_BASE + job id mod SLURM_PORT_SPAN: below Linux's ephemeral ports
(32768+), and distinct for the jobs that can share a node at one time."""


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str
    """What started the rank: "launcher" (torchrun, DeepSpeed, lmscale), "slurm" or "single"."""

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def nnodes(self) -> int:
        return self.world_size // self.local_world_size


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise LmscaleError(f"environment variable {name}={value!r}: expected an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu[003-010,012],login1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise LmscaleError(f"SLURM_JOB_NODELIST={nodelist!r}: not a Slurm host list")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _tasks_on_first_node(env: Mapping[str, str], world_size: int) -> int:
    """Ranks per node under Slurm. SLURM_TASKS_PER_NODE reads like ``4(x2)`` or ``4,3``; uneven layouts
    have no single local world size, and only the first node's count matters for ``node_rank``."""
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    layout = env.get("SLURM_TASKS_PER_NODE", "")
    match = re.match(r"(\d+)", layout)
    return int(match.group(1)) if match else world_size


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """The topology the environment describes (``os.environ`` by default)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return Topology(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=world,
            local_world_size=next((_int(env, v) for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env), world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source="launcher",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        if "MASTER_ADDR" in env:
            master = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env:
            master = first_host(env["SLURM_JOB_NODELIST"])
        else:
            raise LmscaleError("Slurm rank without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master node")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        else:
            raise LmscaleError("Slurm rank without SLURM_JOB_ID or MASTER_PORT: cannot choose the rendezvous port")
        return Topology(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=world,
            local_world_size=_tasks_on_first_node(env, world),
            master_addr=master,
            master_port=port,
            source="slurm",
        )
    return Topology(0, 0, 1, 1, "127.0.0.1", _free_port(), "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_address(host: str) -> str:
    """The IPv4 address of ``host`` (a name or an address)."""
    try:
        return socket.gethostbyname(host)
    except OSError as err:
        raise LmscaleError(f"master address {host!r}: cannot resolve it ({err.strerror or err})") from None


def route_interface(master_addr: str, multi_node: bool) -> str | None:
    """The interface this machine reaches ``master_addr`` over (the kernel's route, found by connecting a UDP
    socket, which sends nothing). A master on this machine's loopback in a job of several nodes (its name
    resolves to 127.0.1.1 on the master itself) means the interface the other nodes reach: the first one up
    that has a non-loopback IPv4 address."""
    import psutil

    address = resolve_address(master_addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 9))
            local = s.getsockname()[0]
        except OSError as err:
            raise LmscaleError(f"master address {master_addr} ({address}): no route to it ({err.strerror})") from None
    addresses = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    if ipaddress.ip_address(local).is_loopback and multi_node:
        for name, addrs in addresses.items():
            up = name in stats and stats[name].isup
            if up and any(
                a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback for a in addrs
            ):
                return name
        return None
    for name, addrs in addresses.items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


def export_env(top: Topology, env: MutableMapping[str, str] | None = None) -> None:
    """Write the topology as the variables ``torch.distributed``'s env:// rendezvous and the collective
    backends read; interface variables the user set are kept."""
    env = os.environ if env is None else env
    env.update(
        RANK=str(top.rank),
        LOCAL_RANK=str(top.local_rank),
        WORLD_SIZE=str(top.world_size),
        LOCAL_WORLD_SIZE=str(top.local_world_size),
        LOCAL_SIZE=str(top.local_world_size),  # DeepSpeed's CPU accelerator counts its local devices by it
        MASTER_ADDR=top.master_addr,
        MASTER_PORT=str(top.master_port),
    )
    if "GLOO_SOCKET_IFNAME" in env and "NCCL_SOCKET_IFNAME" in env:
        return
    interface = route_interface(top.master_addr, multi_node=top.world_size > top.local_world_size)
    if interface is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
        env.setdefault("NCCL_SOCKET_IFNAME", interface)
