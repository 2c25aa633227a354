"""lmscale <-> Hugging Face for any model family, through the family's adapter (``lmscale.hf.gpt``: GPT-2 and
Llama; ``lmscale.hf.bert``: BERT)."""

from __future__ import annotations

from typing import Any

import torch

from lmscale.errors import LmscaleError
from lmscale.families import FAMILIES, family_of, family_reading
from lmscale.models import ModelConfig


def auto_class(cfg: ModelConfig) -> str:
    """The ``transformers`` auto class that loads the export."""
    return family_of(cfg).hf.auto_class(cfg)


def hf_config_dict(cfg: ModelConfig, special_tokens: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of the exported model; ``special_tokens``: the tokenizer's special tokens and ids."""
    return family_of(cfg).hf.config_dict(cfg, special_tokens)


def config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """The lmscale model section of an HF ``config.json`` (any model type a family's adapter reads)."""
    family = family_reading(str(config.get("model_type")))
    if family is None:
        known = ", ".join(t for f in FAMILIES.values() if f.hf is not None for t in f.hf.model_types)
        raise LmscaleError(f"config.json: model_type {config.get('model_type')!r} is not supported ({known})")
    return family.hf.config_from_hf(config)


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return family_of(cfg).hf.to_hf(sd, cfg)


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return family_of(cfg).hf.from_hf(sd, cfg)


def tied_keys(cfg: ModelConfig) -> set[str]:
    """Keys of the transformers model that it ties to others itself (absent from the exported state)."""
    return family_of(cfg).hf.tied_keys(cfg)
