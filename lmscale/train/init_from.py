"""``model.init_from``: the pretrained model a run starts from, either an exported Hugging Face directory or an
lmscale run directory (its latest checkpoint, consolidated from any ZeRO stage and world size)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmscale import run_layout
from lmscale.config import ConfigError, from_dict
from lmscale.errors import UsageError
from lmscale.families import build_model
from lmscale.hf.directory import load_hf_model, read_hf_config
from lmscale.models import ModelConfig
from lmscale.train import checkpoint

HEADS = ("pooler.", "classifier.", "mlm_")
"""Parameters of a task head: a model fine-tuned for another task (or pretrained) starts them afresh."""


@dataclass(frozen=True)
class Pretrained:
    path: Path
    model: ModelConfig
    tokenizer: Path
    tag: str | None
    """The checkpoint of a run directory; None for a Hugging Face directory."""


def pretrained(init_from: str | Path) -> Pretrained:
    path = Path(init_from)
    ckpt_dir = path / run_layout.CHECKPOINTS
    try:
        if ckpt_dir.is_dir():
            tag = checkpoint.latest_tag(ckpt_dir)
            if tag is None:
                raise UsageError(f"{path}: the run has no complete checkpoint")
            model = from_dict(checkpoint.read_state(ckpt_dir, tag)["config"]).model
            return Pretrained(path, model, path / run_layout.TOKENIZER, tag)
        model, _ = read_hf_config(path)
    except UsageError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    return Pretrained(path, model, path / "tokenizer.json", None)


def initial_weights(init_from: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The pretrained weights that fit the model ``cfg`` describes: all of them for continued pretraining; for
    fine-tuning the encoder, and a head only where it has the same shape (the same task). The model's other
    parameters keep their seeded initial values."""
    source = pretrained(init_from)
    if source.tag is not None:
        from lmscale.train.engine import consolidated_state_dict

        state = consolidated_state_dict(str(source.path / run_layout.CHECKPOINTS), source.tag)
    else:
        state = load_hf_model(source.path)[0].state_dict()
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    missing = [k for k in expected if k not in fitting and not k.startswith(HEADS)]
    if missing:
        raise ConfigError(f"model.init_from: {source.path} has no weight {missing[0]!r} of the shape this model needs")
    return fitting
