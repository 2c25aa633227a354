"""What a family's Hugging Face file offers (``lmscale.hf.gpt``, ``lmscale.hf.bert``): one ``HFAdapter`` each,
which the family's registry entry holds (``lmscale.families``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFAdapter:
    model_types: tuple[str, ...]
    """The ``config.json`` model types the family reads (and writes)."""
    config_dict: Callable[[Any, dict[str, int]], dict[str, Any]]
    """``config_dict(cfg, special_tokens)``: the exported ``config.json`` (with ``model_type`` and
    ``architectures``), given the tokenizer's special tokens and ids."""
    config_from_hf: Callable[[dict[str, Any]], Any]
    """The lmscale model section of a ``config.json``; one line naming the field it cannot take."""
    to_hf: Callable[[StateDict, Any], StateDict]
    from_hf: Callable[[StateDict, Any], StateDict]
    auto_class: Callable[[Any], str]
    """The ``transformers`` auto class that loads the export."""
    tied_keys: Callable[[Any], set[str]]
    """Keys of the transformers model that it ties to others itself (absent from the exported state)."""
    tokenizer: Callable[[Path, Any], tuple[Any, dict[str, str]]]
    """``tokenizer(tokenizer_file, cfg)``: the ``PreTrainedTokenizerFast`` the export ships and its special
    tokens map."""
    parity_inputs: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    """The lmscale inputs of the export's logits check around a batch of token ids."""
    check_exportable: Callable[[Any], None] = lambda cfg: None
    """Raise one line when transformers has no class for this configuration."""
