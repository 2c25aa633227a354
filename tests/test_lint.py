"""The code stays ruff clean (lint and format), and the import boundaries hold."""

import subprocess
import sys

from .conftest import REPO


def test_ruff_lint_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_import_boundaries() -> None:
    """The training path never imports Ray; generation imports neither Ray nor DeepSpeed."""
    training = "import sys, lmscale.train.main, lmscale.data.stream; assert 'ray' not in sys.modules"
    inference = "import sys, launcher.infer; assert not {'ray', 'deepspeed'} & set(sys.modules)"
    for code in (training, inference):
        assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0, code
