"""The one-command GPU check (``benchmarks/gpu_check.py``): on a GPU the real thing, on CPU its smoke run."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


def run_check(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def passed_checks(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("PASS", "FAIL"))]


@pytest.mark.slow
def test_the_check_runs_end_to_end_on_cpu_ranks(tmp_path: Path) -> None:
    result = run_check("--tiny", "--steps", "10", "--workdir", str(tmp_path / "check"), timeout=900)
    checks = passed_checks(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(checks) == 6 and all(line.startswith("PASS") for line in checks), checks
    assert "| 3 |" in result.stdout  # a throughput row per ZeRO stage


@pytest.mark.gpu
def test_the_gpu_check_passes_on_a_gpu(tmp_path: Path) -> None:
    result = run_check("--workdir", str(tmp_path / "check"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(line.startswith("PASS") for line in passed_checks(result.stdout))
