"""Memory and speed levers applied to a built model from outside its family's file, as torchtitan applies
them: activation checkpointing of every N-th block, and each block compiled with ``torch.compile``.

Both act in place on the model's ``blocks`` (every family keeps its repeated layers there) and rename no
parameter, so the state dict, DeepSpeed's checkpoints and the export are the same with and without them: a
checkpoint of a compiled or recomputing run resumes in a plain one, and the reverse.

- **Recomputation** wraps a block's forward in ``torch.utils.checkpoint`` (non-reentrant): the backward pass
  runs the block again instead of keeping its activations, with the random state of the first run restored,
  so dropout draws the same masks and the losses equal those of a run that keeps everything.
- **Compilation** compiles each block's call (``nn.Module.compile``, which keeps the module and its names) and
  runs one forward and backward of a real micro-batch before the engine exists, outside the random streams
  the run draws from, so the time it takes is known at start-up instead of hiding in the first step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recomputed_blocks(setting: str | int, n_layers: int) -> list[int]:
    """The indices of the blocks ``trainer.activation_checkpointing`` recomputes: none, all (``full``) or
    every N-th from the first."""
    every = {"none": 0, "full": 1}[setting] if isinstance(setting, str) else setting
    return list(range(0, n_layers, every)) if every else []


def recompute_in_backward(block: nn.Module) -> None:
    """Keep only ``block``'s inputs in training; its activations are recomputed in the backward pass."""
    forward = block.forward

    @functools.wraps(forward)
    def recomputing_forward(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputing_forward


def apply_activation_checkpointing(model: nn.Module, setting: str | int) -> list[int]:
    """Recompute the blocks ``setting`` names; returns their indices."""
    chosen = recomputed_blocks(setting, len(model.blocks))
    for index in chosen:
        recompute_in_backward(model.blocks[index])
    return chosen


def compile_blocks(
    model: nn.Module, example: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> float:
    """Compile every block of ``model`` and run one forward and backward of ``example`` (a micro-batch of
    the run's shape) on ``device`` with the parameters in ``dtype``, as the engine will hold them; returns
    the seconds it took. The random state, and every gradient, is as it was before."""
    for block in model.blocks:
        block.compile()
    # The engine casts parameters, not buffers (rotary tables stay fp32), and moves the model to the device:
    # doing both first lets the compiled graphs see the tensors they will train on.
    for param in model.parameters():
        param.data = param.data.to(device=device, dtype=dtype)
    model.to(device)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _, loss = model(**{name: value.to(device) for name, value in example.items()})
        loss.backward()
    synchronize(device)
    for param in model.parameters():
        param.grad = None
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    sync: Callable[[], None] | None = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and sync is not None:
        sync()
