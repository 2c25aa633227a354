"""Read and write Hugging Face-format model directories (config.json, safetensors, tokenizer files).

Imports neither DeepSpeed nor Ray: generation and evaluation load models through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmscale.errors import LmscaleError, UsageError
from lmscale.families import build_model
from lmscale.hf.convert import config_from_hf, from_hf
from lmscale.models import ModelConfig, load_checked

SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = directory / SAFETENSORS_INDEX
    if not index.is_file():
        raise UsageError(f"{directory}: no model.safetensors or {SAFETENSORS_INDEX} (not an exported model)")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def read_hf_config(directory: Path) -> tuple[ModelConfig, dict]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise UsageError(f"{directory}: model directory does not exist")
    if not path.is_file():
        raise UsageError(f"{path}: missing (not a Hugging Face-format model directory)")
    config = json.loads(path.read_text())
    return config_from_hf(config), config


def load_hf_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict]:
    """An lmscale model with the weights of an exported (or any GPT-2, Llama or BERT HF-format) directory."""
    directory = Path(directory)
    cfg, config = read_hf_config(directory)
    model = build_model(cfg)
    try:
        load_checked(model, from_hf(read_hf_state(directory), cfg), str(directory))
    except KeyError as err:
        raise LmscaleError(f"{directory}: weight {err} is missing (config.json and the weights disagree)") from None
    except ValueError as err:
        raise LmscaleError(str(err)) from None
    return model.to(dtype).eval(), config
