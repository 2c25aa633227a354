"""The model families' architectures, one file each (``gpt``, ``bert``, ``t5``), and what applies to any of them.
Their registry entries (builder, FLOPs, Hugging Face adapter, what the commands do with them) are in
``lmscale.families``. Each config says which shards it trains on (``data_format``: a ``lmscale.tasks``
entry, as ``manifest.json`` records it).

What every family's module offers the trainer: ``forward(idx, targets, ...)`` returns the logits without
targets and, with them, the predicted ids of the scored positions (None where the family scores no accuracy)
and the loss; its repeated layers are the ``nn.ModuleList`` ``blocks``, which activation checkpointing and
compilation act on (``lmscale.train.levers``)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class ModelConfig(Protocol):
    """What code outside a family's own files reads of any family's ``model`` section (a frozen dataclass in
    the family's model file, listed in ``lmscale.families``)."""

    family: str
    flavor: str
    vocab_size: int | None
    seq_len: int | None
    d_model: int
    n_layers: int
    n_heads: int
    dropout: float
    init_std: float
    init_from: str | None

    @property
    def data_format(self) -> str:
        """The ``lmscale.tasks`` entry it trains on, as ``manifest.json`` records it."""
        ...

    def problems(self) -> list[str]:
        """What is wrong with the section, each as ``field: reason``."""
        ...

    def architecture(self) -> dict[str, object]:
        """The fields that decide what the weights mean."""
        ...

    def block_activation_elements(self) -> int:
        """Elements one block keeps per token for its backward pass (the memory estimate's unit)."""
        ...

    @property
    def position_limit(self) -> int | None:
        """The longest input its weights can take, if they limit it (learned position embeddings)."""
        ...

    @property
    def block_count(self) -> int:
        """The repeated layers the model's ``blocks`` holds (an encoder-decoder's two stacks together)."""
        ...


def initialise(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Every parameter's initial value, drawn by the family's ``init_parameter(name, tensor, generator)`` (which
    ZeRO-3's partitioned construction calls one parameter at a time instead)."""
    for name, p in model.named_parameters():
        model.init_parameter(name, p, generator)


def encoder_decoder_inputs(idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """An encoder-decoder's inputs for checks that compare two models (the export's): ``idx`` (B >= 2, S) with
    the second row padded from its middle on, so that the check covers the padding mask, and decoder inputs
    of the same ids reversed."""
    pad_mask = torch.ones_like(idx, dtype=torch.bool)
    pad_mask[1, idx.shape[1] // 2 :] = False
    return {"idx": idx, "pad_mask": pad_mask, "decoder_idx": idx.flip(1)}


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
