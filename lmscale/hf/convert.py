"""lmscale <-> Hugging Face for every model family: the transformers class, ``config.json`` and key table of
each (``lmscale.hf.gpt``: GPT-2 and Llama; ``lmscale.hf.bert``: BERT)."""

from __future__ import annotations

from typing import Any

import torch

from lmscale.data.tokenizer import EOT
from lmscale.errors import LmscaleError
from lmscale.hf import bert as hf_bert
from lmscale.hf import gpt as hf_gpt
from lmscale.models import BertConfig, GPTConfig, ModelConfig


def auto_class(cfg: ModelConfig) -> str:
    """The ``transformers`` auto class that loads the export."""
    if isinstance(cfg, GPTConfig):
        return "AutoModelForCausalLM"
    return "AutoModelForSequenceClassification" if cfg.num_labels else "AutoModelForMaskedLM"


def hf_config_dict(cfg: ModelConfig, special_tokens: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of the exported model; ``special_tokens``: the tokenizer's special tokens and ids."""
    if isinstance(cfg, GPTConfig):
        end = special_tokens.get(EOT, special_tokens.get("[SEP]"))
        assert end is not None
        return hf_gpt.hf_config_dict(cfg, end)
    return hf_bert.hf_config_dict(cfg, special_tokens)


def config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """The lmscale model section of an HF ``config.json`` (GPT-2, Llama or BERT)."""
    if config.get("model_type") == "bert":
        return hf_bert.bert_config_from_hf(config)
    if config.get("model_type") in ("gpt2", "llama"):
        return hf_gpt.gpt_config_from_hf(config)
    raise LmscaleError(f"config.json: model_type {config.get('model_type')!r} is not supported (gpt2, llama or bert)")


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return hf_gpt.to_hf(sd, cfg) if isinstance(cfg, GPTConfig) else hf_bert.to_hf(sd, cfg)


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return hf_gpt.from_hf(sd, cfg) if isinstance(cfg, GPTConfig) else hf_bert.from_hf(sd, cfg)


def tied_keys(cfg: ModelConfig) -> set[str]:
    """Keys of the transformers model that it ties to others itself (absent from the exported state)."""
    if isinstance(cfg, BertConfig):
        return set() if cfg.num_labels else {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    return {"lm_head.weight"} if cfg.tie_embeddings else set()
