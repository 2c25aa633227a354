"""A rank's place in the job, from the environment each launcher sets."""

import json
from pathlib import Path

import pytest

from lmscale.errors import LmscaleError
from lmscale.job.topology import SLURM_PORT_BASE, SLURM_PORT_SPAN, detect, export_env, first_host, route_interface

from .conftest import TINY_OVERRIDES, run_cli


def test_torchrun_and_deepspeed_variables() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.7",
           "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # fmt: skip
    top = detect(env)  # a launcher inside a Slurm allocation: its variables win
    assert (top.rank, top.local_rank, top.world_size, top.local_world_size) == (5, 1, 8, 4)
    assert (top.master_addr, top.master_port, top.source) == ("10.0.0.7", 29400, "launcher")
    assert (top.node_rank, top.nnodes) == (1, 2)
    deepspeed = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "MASTER_ADDR": "h",
                        "MASTER_PORT": "1"})  # fmt: skip
    assert (deepspeed.local_world_size, deepspeed.node_rank) == (2, 1)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[003-010,012],login1", "gpu003"), ("node7", "node7"), ("a-b[1,4]", "a-b1"), ("x[09-11]", "x09"),
     ("n1,n2", "n1")],
)  # fmt: skip
def test_first_host_of_a_slurm_host_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_srun_variables() -> None:
    env = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[17-18]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    top = detect(env)
    assert (top.rank, top.local_rank, top.world_size, top.local_world_size) == (6, 2, 8, 4)
    assert top.master_addr == "gpu17" and top.source == "slurm" and top.node_rank == 1
    assert top.master_port == SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN
    # Every rank of the job derives the same port; another job gets another one.
    assert detect({**env, "SLURM_PROCID": "0"}).master_port == top.master_port
    assert detect({**env, "SLURM_JOB_ID": "123457"}).master_port != top.master_port
    # A job script that exports the master address and port overrides the derived ones.
    mine = detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "40000"})
    assert (mine.master_addr, mine.master_port) == ("10.1.2.3", 40000)
    assert detect({**env, "SLURM_NTASKS_PER_NODE": "2"}).local_world_size == 2


def test_bad_or_missing_variables_are_one_line_errors() -> None:
    with pytest.raises(LmscaleError, match=r"environment variable RANK='one': expected an integer"):
        detect({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(LmscaleError, match="SLURM_JOB_NODELIST or MASTER_ADDR"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})
    with pytest.raises(LmscaleError, match="master address 'no-such-host.invalid': cannot resolve it"):
        route_interface("no-such-host.invalid", multi_node=True)


def test_no_launcher_is_a_single_rank() -> None:
    top = detect({})
    assert (top.rank, top.world_size, top.master_addr, top.source) == (0, 1, "127.0.0.1", "single")
    assert 0 < top.master_port < 65536


def test_exported_variables_keep_the_interfaces_a_user_chose() -> None:
    top = detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "29555"})  # fmt: skip
    env: dict[str, str] = {}
    export_env(top, env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29555"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"  # the route to a local master
    chosen = {"NCCL_SOCKET_IFNAME": "ib0"}
    export_env(top, chosen)
    assert chosen["NCCL_SOCKET_IFNAME"] == "ib0" and chosen["GLOO_SOCKET_IFNAME"] == "lo"


def test_prepare_only_sizes_the_global_batch_for_the_whole_job(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}"]  # micro-batch 4 x 2 per step
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", "8", "--nnodes", "4", "--prepare-only"]
    result = run_cli(*args, *(a for s in sets for a in ("--set", s)))
    assert result.returncode == 0, result.stderr
    assert f"prepared {run_dir} for 32 ranks (global batch 256 sequences" in result.stdout
    config = (run_dir / "config.yaml").read_text()
    assert "global_batch_size: 256" in config and "grad_accum_steps: null" in config
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["route"] == "prepare-only" and launch["world_size"] == 32
    for bad, message in (
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2: must be in [0, --nnodes=2)"),
        (["--nnodes", "2"], "--nnodes: several nodes need --master-addr (the address of node 0 the others reach)"),
        (["--hostfile", str(tmp_path / "none")], f"--hostfile {tmp_path / 'none'}: file not found"),
    ):
        result = run_cli("train", "configs/gpt-tiny.yaml", *bad, *(a for s in sets for a in ("--set", s)))
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"lmscale: error: {message}"
