"""The family registry: one entry per model family (``gpt``, ``bert``, ``t5``, ``rnn``), holding everything the
rest of the code asks about it.

A run's ``model`` section names its family, whose config dataclass (in the family's model file) is the single
source of its fields and says which task it trains on (``data_format``, a ``lmscale.tasks`` entry). Its
entry adds the model builder, the FLOPs count MFU is measured against, the Hugging Face adapter (key table,
``config.json``, Auto class, tokenizer specials: the family's file in ``lmscale/hf/``) where transformers has
a class for it. What the commands may do with a model (generate, fine-tune) follows from the task it trains
on, so one family can hold a decoder and an encoder-decoder (``rnn``). Adding a family is a model file, a
Hugging Face file if transformers can load it, one entry here, and their tests; code outside
``lmscale/models/``, ``lmscale/hf/`` and the registries never compares a family's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmscale.hf import bert as hf_bert
from lmscale.hf import gpt as hf_gpt
from lmscale.hf import t5 as hf_t5
from lmscale.hf.adapter import HFAdapter
from lmscale.models import ModelConfig
from lmscale.models.bert import Bert, BertConfig
from lmscale.models.bert import flops_per_token as bert_flops
from lmscale.models.gpt import GPT, GPTConfig
from lmscale.models.gpt import flops_per_token as gpt_flops
from lmscale.models.rnn import RNNConfig
from lmscale.models.rnn_seq2seq import recurrent_flops_per_token, recurrent_model
from lmscale.models.t5 import T5, T5Config
from lmscale.models.t5 import flops_per_token as t5_flops


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    """The model section's dataclass: its fields, defaults, ``problems()`` and ``data_format``."""
    module: Callable[..., nn.Module]
    """``module(cfg, generator)``: the model with initial weights drawn from ``generator``."""
    flops_per_token: Callable[..., float]
    """``flops_per_token(cfg, seq_len, predicted_fraction)``: training FLOPs per token, for MFU."""
    hf: HFAdapter | None
    """How the export maps to a ``transformers`` class; None where transformers has none (the export is then
    lmscale's own directory, which ``lmscale generate`` and ``lmscale eval`` load)."""


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", GPTConfig, GPT, gpt_flops, hf_gpt.ADAPTER),
    "bert": Family("bert", BertConfig, Bert, bert_flops, hf_bert.ADAPTER),
    "t5": Family("t5", T5Config, T5, t5_flops, hf_t5.ADAPTER),
    "rnn": Family("rnn", RNNConfig, recurrent_model, recurrent_flops_per_token, None),
}


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.family]


def family_reading(model_type: str) -> Family | None:
    """The family whose Hugging Face adapter reads a ``config.json`` of ``model_type``."""
    return next((f for f in FAMILIES.values() if f.hf is not None and model_type in f.hf.model_types), None)


def build_model(cfg: ModelConfig, generator: torch.Generator | None = None) -> nn.Module:
    return family_of(cfg).module(cfg, generator)


def flops_per_token(cfg: ModelConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    return family_of(cfg).flops_per_token(cfg, seq_len, predicted_fraction)
