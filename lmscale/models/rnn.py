"""Recurrent language models, the baselines the Transformer replaced: stacked Elman (``tanh``), LSTM or GRU
layers between a token embedding and a softmax head, tied to the embedding by default (Press and Wolf 2017),
with dropout on the embeddings, between layers and before the head (Zaremba et al. 2014).

Each layer is one ``torch.nn`` recurrent module (cuDNN's or oneDNN's fused kernels) in ``blocks``, so
activation checkpointing, compilation and ZeRO-3 act per layer as they do on a Transformer's blocks. A
training window starts from a zero state, so the model sees the same context as a Transformer of that
``seq_len``; generation carries the state from token to token instead of a KV cache.

Architecture only: no DeepSpeed, data, logging or checkpoint code lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmscale.models import initialise
from lmscale.models.loss import linear_cross_entropy

CELLS: dict[str, type[nn.RNNBase]] = {"tanh": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
GATES = {"tanh": 1, "lstm": 4, "gru": 3}
"""Weight matrices per direction of input and of state: one per gate (and the GRU's candidate)."""

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A layer's state: (1, B, d) hidden, with the LSTM's cell as the second of a pair."""


@dataclass(frozen=True)
class RNNConfig:
    """The ``model`` section of a recurrent language model, and the architecture it describes."""

    family: Literal["rnn"] = "rnn"
    cell: Literal["tanh", "lstm", "gru"] = "lstm"
    """Elman's tanh RNN, the LSTM (Hochreiter and Schmidhuber 1997) or the GRU (Cho et al. 2014)."""
    d_model: int = 256
    """The embedding and every layer's state size."""
    n_layers: int = 2
    seq_len: int | None = None
    """Tokens per training window (each starts from a zero state); default the dataset's seq_len."""
    vocab_size: int | None = None
    """Embedding rows; default the dataset tokenizer's vocabulary."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.1
    """Uniform initialisation in [-init_std, init_std] of the embedding and the recurrent weights (Zaremba
    et al. used 0.05 to 0.1); the untied head is drawn as the Transformers' are, with std 0.02."""
    init_from: str | None = None
    """An exported recurrent model directory to continue training from."""

    @property
    def data_format(self) -> str:
        return "causal"

    @property
    def flavor(self) -> str:
        """The cell, under the name the other families give their variants (logs)."""
        return self.cell

    @property
    def n_heads(self) -> int:
        """Attention heads: none, counted as one so that the checks every family shares hold."""
        return 1

    def problems(self) -> list[str]:
        return [] if self.cell in CELLS else [f"cell: {self.cell!r} is not one of {', '.join(CELLS)}"]

    def architecture(self) -> dict[str, object]:
        """The fields that decide what the weights mean: two models agreeing on them can swap weights."""
        return {"cell": self.cell, "vocab_size": self.vocab_size, "d_model": self.d_model,
                "n_layers": self.n_layers, "tie_embeddings": self.tie_embeddings}  # fmt: skip

    @property
    def position_limit(self) -> int | None:
        """None: the state carries any length of context (the weights do not limit it)."""
        return None

    @property
    def block_count(self) -> int:
        return self.n_layers

    def block_activation_elements(self) -> int:
        """Elements one layer keeps per token for its backward pass: its input and output, and its gates'
        activations (the LSTM's cell state too)."""
        return (2 + GATES[self.cell] + (1 if self.cell == "lstm" else 0)) * self.d_model


class RecurrentState:
    """Each layer's state after the tokens seen so far: what generation carries from step to step, where a
    Transformer keeps a KV cache."""

    def __init__(self, n_layers: int) -> None:
        self.layers: list[State | None] = [None] * n_layers
        self.seen = 0

    def length(self) -> int:
        return self.seen


class Layer(nn.Module):
    """One recurrent layer and the dropout on its output."""

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.rnn = CELLS[cfg.cell](cfg.d_model, cfg.d_model, batch_first=True)  # nn.RNN's default is tanh
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor | nn.utils.rnn.PackedSequence, state: State | None
    ) -> tuple[torch.Tensor | nn.utils.rnn.PackedSequence, State]:
        out, state = self.rnn(x, state)
        if isinstance(out, nn.utils.rnn.PackedSequence):
            return out._replace(data=self.dropout(out.data)), state
        return self.dropout(out), state


class RNN(nn.Module):
    def __init__(self, cfg: RNNConfig, generator: torch.Generator | None = None) -> None:
        """``generator`` draws the initial weights (default: torch's global RNG)."""
        super().__init__()
        assert cfg.vocab_size is not None and cfg.seq_len is not None, "the run plan fills in vocab_size and seq_len"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        initialise(self, generator)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initial value of parameter ``name``, written into ``p`` (the parameter, or a full-size stand-in for
        one that is partitioned across ranks)."""
        if name.startswith("lm_head"):
            nn.init.normal_(p, 0.0, 0.02, generator=generator)
        elif "bias" in name:
            nn.init.zeros_(p)
            if self.cfg.cell == "lstm" and name.endswith("bias_hh_l0"):
                # A forget gate open at the start lets gradients through early on (Jozefowicz et al. 2015).
                p[self.cfg.d_model : 2 * self.cfg.d_model] = 1.0
        else:
            nn.init.uniform_(p, -self.cfg.init_std, self.cfg.init_std, generator=generator)

    def new_cache(self, capacity: int) -> RecurrentState:
        """What generation carries between steps (``capacity``, the positions a KV cache would hold, is not
        needed: the state has one size)."""
        return RecurrentState(self.cfg.n_layers)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: RecurrentState | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), and None; with ``targets`` (B, T, -100 where not
        scored) instead None and the mean cross-entropy, computed in chunks (``lmscale.models.loss``).

        With a ``cache``, ``idx`` continues from its state, which is updated. ``pad_mask`` (B, T), True at real
        tokens, marks the left padding of a batch of prompts: each row's state starts at its first real token.
        """
        x = self.emb_dropout(self.tok_emb(idx))
        states = cache.layers if cache is not None else [None] * self.cfg.n_layers
        padded = pad_mask is not None and not bool(pad_mask.all())
        if padded:
            assert pad_mask is not None and all(s is None for s in states), "prompts are padded on the first call only"
            x, lengths = _right_aligned(x, pad_mask)
            x = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        new_states: list[State | None] = []
        for layer, state in zip(self.blocks, states, strict=True):
            x, state = layer(x, state)
            new_states.append(state)
        if padded:
            assert pad_mask is not None
            x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=idx.shape[1])
            x = _left_aligned(x, pad_mask)
        if cache is not None:
            cache.layers, cache.seen = new_states, cache.seen + idx.shape[1]
        if targets is None:
            return self.lm_head(x), None
        loss, _ = linear_cross_entropy(x, self.lm_head.weight, targets)
        return None, loss


def _right_aligned(x: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows (B, T, d) moved to the front, and each row's length."""
    lengths = pad_mask.sum(dim=1)
    T = x.shape[1]
    source = (torch.arange(T, device=x.device)[None, :] + (T - lengths)[:, None]) % T  # (B, T)
    return x.gather(1, source[..., None].expand_as(x)), lengths


def _left_aligned(x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Rows at the front (B, T, d) moved back behind their left padding."""
    lengths = pad_mask.sum(dim=1)
    T = x.shape[1]
    source = (torch.arange(T, device=x.device)[None, :] - (T - lengths)[:, None]) % T
    return x.gather(1, source[..., None].expand_as(x))


def flops_per_token(cfg: RNNConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token over the matrix products, as
    :func:`lmscale.models.gpt.flops_per_token` counts them: 6 per weight of each layer's input and state
    matrices (one of each per gate) and of the head, less the backward pass into each window's zero initial
    state, which nothing needs. Unlike attention's, the cost per token does not grow with ``seq_len``: the
    context is what the state keeps."""
    assert cfg.vocab_size is not None
    d, gate_rows = cfg.d_model, GATES[cfg.cell] * cfg.d_model
    weights = cfg.n_layers * 2 * gate_rows * d + d * cfg.vocab_size * predicted_fraction
    return 6.0 * weights - cfg.n_layers * 2.0 * gate_rows * d / seq_len
