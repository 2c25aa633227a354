"""Read model directories in the Hugging Face layout (config.json, safetensors, tokenizer files): an export
``transformers`` loads, any GPT-2, Llama, BERT or T5 directory, or lmscale's own export of a family
``transformers`` has no class for (``config.json`` holding the lmscale model section under ``lmscale_model``,
the weights under lmscale's names).

Imports neither DeepSpeed nor Ray: generation and evaluation load models through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmscale.config import ConfigError, model_from_dict
from lmscale.errors import LmscaleError, UsageError
from lmscale.families import build_model
from lmscale.hf.convert import config_from_hf, from_hf
from lmscale.models import ModelConfig, load_checked

SAFETENSORS_INDEX = "model.safetensors.index.json"
LMSCALE_MODEL = "lmscale_model"
"""The ``config.json`` key of an lmscale-format export's model section."""


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
    if LMSCALE_MODEL in config:
        try:
            return model_from_dict(config[LMSCALE_MODEL], f"{path}: {LMSCALE_MODEL}"), config
        except ConfigError as err:
            raise LmscaleError(str(err)) from None
    return config_from_hf(config), config


def load_hf_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict]:
    """An lmscale model with the weights of an exported (or any GPT-2, Llama, BERT or T5 HF-format) directory."""
    directory = Path(directory)
    cfg, config = read_hf_config(directory)
    model = build_model(cfg)
    state = read_hf_state(directory)
    try:
        load_checked(model, state if LMSCALE_MODEL in config else from_hf(state, cfg), str(directory))
    except KeyError as err:
        raise LmscaleError(f"{directory}: weight {err} is missing (config.json and the weights disagree)") from None
    except ValueError as err:
        raise LmscaleError(str(err)) from None
    return model.to(dtype).eval(), config
