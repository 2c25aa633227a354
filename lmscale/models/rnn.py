"""Recurrent language models, the baselines the Transformer replaced: stacked Elman (``tanh``), LSTM or GRU
layers between a token embedding and a softmax head, tied to the embedding by default (Press and Wolf 2017),
with dropout on the embeddings, between layers and before the head (Zaremba et al. 2014). The config also
describes the recurrent encoder-decoder with attention (``encoder_decoder: true``), whose model is in
``lmscale.models.rnn_seq2seq``.

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
    """The embedding and every layer's state size (an encoder layer's two directions together)."""
    n_layers: int = 2
    """Layers of the language model, or of the encoder."""
    encoder_decoder: bool = False
    """A bidirectional encoder and a decoder that attends to its states (``lmscale.models.rnn_seq2seq``),
    trained on span corruption or source/target pairs as T5 is, instead of a language model."""
    attention: Literal["dot", "additive"] = "additive"
    """How the encoder-decoder's decoder scores the encoder's states: Luong et al.'s dot product (scaled by
    d_model^-0.5) or Bahdanau et al.'s additive score."""
    n_decoder_layers: int | None = None
    """Layers of the encoder-decoder's decoder; default n_layers."""
    seq_len: int | None = None
    """Tokens per training window (each starts from a zero state), or the encoder's inputs; default the
    dataset's seq_len."""
    target_len: int | None = None
    """The encoder-decoder's decoder positions; the run plan fills in the dataset's target length."""
    decoder_start_id: int = 0
    """The encoder-decoder's first decoder input: the tokenizer's padding id, as T5's; the run plan fills it
    in."""
    vocab_size: int | None = None
    """Embedding rows; default the dataset tokenizer's vocabulary."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.1
    """Uniform initialisation in [-init_std, init_std] of the embedding and the recurrent weights (Zaremba
    et al. used 0.05 to 0.1); the untied head is drawn as the Transformers' are, with std 0.02."""
    init_from: str | None = None
    """An exported recurrent model directory (or an lmscale run directory, for fine-tuning) to start from."""
    data_format: Literal["causal", "span_corruption", "seq2seq"] | None = None
    """What it trains on: causal shards for the language model; span corruption (default) or source/target
    pairs (``lmscale finetune`` sets it) for the encoder-decoder."""

    def __post_init__(self) -> None:
        if self.data_format is None:
            object.__setattr__(self, "data_format", "span_corruption" if self.encoder_decoder else "causal")

    @property
    def flavor(self) -> str:
        """The cell, under the name the other families give their variants (logs, the export's name)."""
        return f"{self.cell} encoder-decoder, {self.attention} attention" if self.encoder_decoder else self.cell

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def n_heads(self) -> int:
        """Attention heads: none, counted as one so that the checks every family shares hold."""
        return 1

    def problems(self) -> list[str]:
        found = [] if self.cell in CELLS else [f"cell: {self.cell!r} is not one of {', '.join(CELLS)}"]
        if (self.data_format == "causal") == self.encoder_decoder:
            found.append(
                f"data_format: {'an encoder-decoder' if self.encoder_decoder else 'a language model'} does not "
                f"train on {self.data_format} shards"
            )
        if self.encoder_decoder and self.d_model % 2:
            found.append(f"d_model: the encoder's two directions split it in halves, got an odd {self.d_model}")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            found.append(f"n_decoder_layers: must be > 0, got {self.n_decoder_layers}")
        return found

    def architecture(self) -> dict[str, object]:
        """The fields that decide what the weights mean: two models agreeing on them can swap weights."""
        layers = {"encoder_decoder": self.encoder_decoder, "attention": self.attention,
                  "decoder_layers": self.decoder_layers} if self.encoder_decoder else {}  # fmt: skip
        return {"cell": self.cell, "vocab_size": self.vocab_size, "d_model": self.d_model,
                "n_layers": self.n_layers, "tie_embeddings": self.tie_embeddings, **layers}  # fmt: skip

    @property
    def position_limit(self) -> int | None:
        """None: the state carries any length of context (the weights do not limit it)."""
        return None

    @property
    def block_count(self) -> int:
        return self.n_layers + (self.decoder_layers if self.encoder_decoder else 0)

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

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the states of the beams that continue, in their new order."""
        self.layers = [None if state is None else _rows(state, rows) for state in self.layers]


def _rows(state: State, rows: torch.Tensor) -> State:
    """A layer's state (1, B, d) for the batch rows ``rows``."""
    if isinstance(state, tuple):
        return state[0][:, rows], state[1][:, rows]
    return state[:, rows]


class Layer(nn.Module):
    """One recurrent layer and the dropout on its output; ``bidirectional``, its two directions are each half
    of d_model wide, so that their outputs together are d_model."""

    def __init__(self, cfg: RNNConfig, bidirectional: bool = False) -> None:
        super().__init__()
        state = cfg.d_model // 2 if bidirectional else cfg.d_model
        # nn.RNN's default is the tanh cell
        self.rnn = CELLS[cfg.cell](cfg.d_model, state, batch_first=True, bidirectional=bidirectional)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor | nn.utils.rnn.PackedSequence, state: State | None
    ) -> tuple[torch.Tensor | nn.utils.rnn.PackedSequence, State]:
        out, state = self.rnn(x, state)
        if isinstance(out, nn.utils.rnn.PackedSequence):
            return out._replace(data=self.dropout(out.data)), state
        return self.dropout(out), state


class Recurrent(nn.Module):
    """What both recurrent models hold: the token embedding and its dropout, their layers (``blocks``), and a
    head tied to the embedding by default, initialised by :func:`init_recurrent`. A model adds its other
    parts, then draws the initial weights (``lmscale.models.initialise``)."""

    def __init__(self, cfg: RNNConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        assert cfg.vocab_size is not None, "the run plan fills in vocab_size"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(blocks)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initial value of parameter ``name``, written into ``p`` (the parameter, or a full-size stand-in for
        one that is partitioned across ranks)."""
        init_recurrent(self.cfg, name, p, generator)


class RNN(Recurrent):
    def __init__(self, cfg: RNNConfig, generator: torch.Generator | None = None) -> None:
        """``generator`` draws the initial weights (default: torch's global RNG)."""
        assert cfg.seq_len is not None, "the run plan fills in seq_len"
        super().__init__(cfg, [Layer(cfg) for _ in range(cfg.n_layers)])
        initialise(self, generator)

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


@torch.no_grad()
def init_recurrent(cfg: RNNConfig, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Either recurrent model's initial weights: uniform in [-init_std, init_std], biases at zero but the LSTM's
    forget gates, the untied head with std 0.02."""
    if name.startswith("lm_head"):
        nn.init.normal_(p, 0.0, 0.02, generator=generator)
    elif "bias" in name:
        nn.init.zeros_(p)
        if cfg.cell == "lstm" and "bias_hh_l0" in name:
            # A forget gate open at the start lets gradients through early on (Jozefowicz et al. 2015).
            state = p.shape[0] // GATES["lstm"]  # gates in the order input, forget, cell, output
            p[state : 2 * state] = 1.0
    else:
        nn.init.uniform_(p, -cfg.init_std, cfg.init_std, generator=generator)


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
