"""The code stays ruff clean (lint and format), and the training path does not import Ray."""

import subprocess
import sys

from .conftest import REPO


def test_ruff_lint_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_training_path_imports_neither_ray_nor_generation_deepspeed() -> None:
    code = (
        "import sys, lmscale.train.main, lmscale.data.stream;"
        "assert 'ray' not in sys.modules, 'ray';"
        "import launcher.infer;"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"DS_ACCELERATOR": "cpu", "PATH": ""}).returncode == 0
    no_deepspeed = "import sys, launcher.infer, lmscale.inference.generate; assert 'deepspeed' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", no_deepspeed], cwd=REPO).returncode == 0
