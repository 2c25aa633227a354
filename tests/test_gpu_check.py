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


@pytest.mark.slow
def test_the_scale_benchmark_runs_every_kind_of_row_on_cpu_ranks(tmp_path: Path) -> None:
    """benchmarks/gpu_scale.py's plan with small shapes: every lmscale row reports throughput, its measured peak
    and the estimate beside it, and the transformers rows train the same model (equal first losses)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_scale", "--tiny", "--steps", "4",
                             "--workdir", str(tmp_path / "scale")], cwd=REPO, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    ours = [r for r in rows if r[0].strip().startswith(("124M", "1.3B", "Llama"))]
    assert [r[0].strip().split(",")[0] for r in ours] == ["124M", "124M", "1.3B Llama", "Llama tiny"]
    for name, tokens_per_s, _mfu, peak, estimate, _compile in ours:
        assert float(tokens_per_s.replace(",", "")) > 0 and float(peak) > 0 and float(estimate) > 0, name
    assert "compiled" in ours[1][0] and float(ours[1][5]) > 0  # the compile time from the start event
    theirs = [r for r in rows if r[0].strip().startswith(("gpt2", "llama"))]
    assert len(theirs) == 2 and all("DIFFER" not in r[4] and r[3].strip().endswith("x") for r in theirs), theirs


@pytest.mark.gpu
def test_the_gpu_check_passes_on_a_gpu(tmp_path: Path) -> None:
    result = run_check("--workdir", str(tmp_path / "check"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(line.startswith("PASS") for line in passed_checks(result.stdout))
