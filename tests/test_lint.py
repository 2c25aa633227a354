"""The code stays ruff clean (lint and format), and the import boundaries hold."""

import re
import subprocess
import sys

from .conftest import REPO


def test_ruff_lint_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_import_boundaries() -> None:
    """The training path never imports Ray (nor wandb until rank 0 logs); generation and evaluation import
    neither Ray nor DeepSpeed; one module imports DeepSpeed."""
    training = "import sys, lmscale.train.main, lmscale.data.stream; assert not {'ray', 'wandb'} & set(sys.modules)"
    inference = (
        "import sys, launcher.infer, lmscale.inference.evaluate; assert not {'ray', 'deepspeed'} & set(sys.modules)"
    )
    for code in (training, inference):
        assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0, code
    importers = {
        path.relative_to(REPO).as_posix()
        for path in [*(REPO / "lmscale").rglob("*.py"), *(REPO / "launcher").rglob("*.py")]
        if re.search(r"^\s*(import|from) deepspeed\b", path.read_text(), re.MULTILINE)
    }
    assert importers == {"lmscale/train/engine.py"}
