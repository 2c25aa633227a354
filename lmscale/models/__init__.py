"""Model families behind one registry: the run's ``model`` section names a family (``gpt``, ``bert``), whose
config dataclass is the single source of its fields; everything that builds, counts or converts a model
looks the family up here instead of assuming one. Each config says which shards it trains on
(``data_format``: ``causal``, ``mlm`` or ``classification``, as ``manifest.json`` records them).

What every family's module offers the trainer: ``forward(idx, targets, ...)`` returns the logits without
targets and, with them, the predicted ids of the scored positions (None where the family scores no accuracy)
and the loss; its repeated layers are the ``nn.ModuleList`` ``blocks``, which activation checkpointing and
compilation act on (``lmscale.train.levers``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmscale.models.bert import Bert, BertConfig
from lmscale.models.bert import flops_per_token as bert_flops
from lmscale.models.gpt import GPT, GPTConfig
from lmscale.models.gpt import flops_per_token as gpt_flops

ModelConfig = GPTConfig | BertConfig


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    module: Callable[..., nn.Module]
    """``module(cfg, generator)``: the model with initial weights drawn from ``generator``."""
    flops_per_token: Callable[..., float]
    """``flops_per_token(cfg, seq_len, predicted_fraction)``: training FLOPs per token, for MFU."""


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", GPTConfig, GPT, gpt_flops),
    "bert": Family("bert", BertConfig, Bert, bert_flops),
}


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.family]


def build_model(cfg: ModelConfig, generator: torch.Generator | None = None) -> nn.Module:
    return family_of(cfg).module(cfg, generator)


def flops_per_token(cfg: ModelConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    return family_of(cfg).flops_per_token(cfg, seq_len, predicted_fraction)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied ones once), full size even when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a full state dict, naming the first key or shape that does not fit (a checkpoint of another model)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ValueError(f"{origin}: no weight {key!r} (a checkpoint of another model?)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{origin}: {key} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)} "
                "(a checkpoint of another model shape)"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{origin}: unexpected weight {unexpected[0]!r} (a checkpoint of another model?)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


__all__ = [
    "FAMILIES", "GPT", "Bert", "BertConfig", "Family", "GPTConfig", "ModelConfig", "build_model",
    "count_parameters", "family_of", "flops_per_token", "load_checked",
]  # fmt: skip
