"""The recurrent encoder-decoder with attention, the translation model the Transformer replaced (Bahdanau et
al. 2015; Luong et al. 2015), trained on the same span corruption and source/target pairs as T5 and generated
from by the same search (``lmscale.models.seq2seq_search``).

- **Encoder**: the shared token embedding, then ``n_layers`` bidirectional layers of the cell, each direction
  d_model/2 wide, so that each input position's state (both directions) is d_model wide. Padding is packed
  away, so the backward direction starts at each input's last real token.
- **Decoder**: ``n_decoder_layers`` of the cell over the targets shifted right. Each layer starts from a
  projection of the encoder's backward state at the first input token, which has read the whole input,
  through tanh (Bahdanau et al.).
- **Attention** over the encoder's states, for each output of the top decoder layer (Luong et al.'s global
  attention). The score is ``dot`` (scaled by d_model^-0.5) or ``additive`` (Bahdanau et al.'s
  v . tanh(W_q h + W_k s)). The softmax over the real inputs weights the states into a context, and
  tanh(W_c [context; output]) is what the head reads.

The context is not fed back into the next step's input (Luong's input feeding). Training can then run each
decoder layer as one fused kernel over the whole target, which input feeding would make wait for every
step's attention. Additive attention holds a (targets x inputs x d_model) tensor per sequence, which is
cheap for sentences and grows with their product.

``blocks`` holds the encoder's layers, then the decoder's, as T5's does. Architecture only: no DeepSpeed,
data, logging or checkpoint code lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from lmscale.models import initialise
from lmscale.models.encoder_decoder import EncoderDecoderLM
from lmscale.models.rnn import GATES, RNN, Layer, Recurrent, RecurrentState, RNNConfig, State
from lmscale.models.rnn import flops_per_token as language_model_flops


class DecoderState(RecurrentState):
    """What generation carries between decoding steps: each decoder layer's state, and the attention's keys
    of the inputs, computed on the first step."""

    def __init__(self, n_layers: int) -> None:
        super().__init__(n_layers)
        self.keys: torch.Tensor | None = None


class Attention(nn.Module):
    """Luong et al.'s global attention over the encoder's states, with a dot or an additive score."""

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.additive = cfg.attention == "additive"
        if self.additive:
            self.query = nn.Linear(d, d, bias=False)
            self.key = nn.Linear(d, d)
            self.energy = nn.Linear(d, 1, bias=False)
        self.combine = nn.Linear(2 * d, d, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """What each decoder output is scored against, for the encoder's states ``memory`` (B, S, d)."""
        return self.key(memory) if self.additive else memory * memory.shape[-1] ** -0.5

    def forward(
        self, hidden: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, pad_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The attentional outputs (B, T, d) of the decoder's ``hidden`` (B, T, d); ``pad_mask`` (B, S), True at
        the real inputs."""
        if self.additive:
            scores = self.energy(torch.tanh(self.query(hidden)[:, :, None] + keys[:, None])).squeeze(-1)
        else:
            scores = hidden @ keys.transpose(1, 2)
        if pad_mask is not None:
            scores = scores.masked_fill(~pad_mask[:, None], float("-inf"))
        context = torch.softmax(scores.float(), dim=-1).type_as(memory) @ memory
        return self.dropout(torch.tanh(self.combine(torch.cat([context, hidden], dim=-1))))


class RNNEncoderDecoder(EncoderDecoderLM, Recurrent):
    """The bidirectional encoder, the decoder and its attention; the forward pass is every encoder-decoder's
    (``lmscale.models.encoder_decoder``)."""

    def __init__(self, cfg: RNNConfig, generator: torch.Generator | None = None) -> None:
        """``generator`` draws the initial weights (default: torch's global RNG)."""
        layers = [*(Layer(cfg, bidirectional=True) for _ in range(cfg.n_layers)),
                  *(Layer(cfg) for _ in range(cfg.decoder_layers))]  # fmt: skip
        super().__init__(cfg, layers)
        self.bridge = nn.Linear(cfg.d_model // 2, cfg.decoder_layers * cfg.d_model)
        self.attention = Attention(cfg)
        initialise(self, generator)

    def encode(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's states (B, S, d) for input ids ``idx`` (B, S), right-padded where ``pad_mask`` is
        False (zero at the padding)."""
        x: torch.Tensor | nn.utils.rnn.PackedSequence = self.emb_dropout(self.tok_emb(idx))
        padded = pad_mask is not None and not bool(pad_mask.all())
        if padded:
            assert pad_mask is not None
            lengths = pad_mask.sum(dim=1).cpu()
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        for layer in self.blocks[: self.cfg.n_layers]:
            x, _ = layer(x, None)
        if isinstance(x, nn.utils.rnn.PackedSequence):
            x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=idx.shape[1])
        return x

    def initial_states(self, memory: torch.Tensor) -> list[State | None]:
        """Each decoder layer's first state, from the encoder's backward direction at the first input."""
        d, layers = self.cfg.d_model, self.cfg.decoder_layers
        start = torch.tanh(self.bridge(memory[:, 0, d // 2 :]))  # (B, layers * d)
        hidden = start.view(-1, layers, d).transpose(0, 1).contiguous()
        if self.cfg.cell == "lstm":
            return [(h[None], torch.zeros_like(h[None])) for h in hidden]
        return [h[None] for h in hidden]

    def new_decoder_cache(self, capacity: int) -> DecoderState:
        """What generation carries between decoding steps (``capacity``, the outputs' budget, is not needed:
        the state has one size)."""
        return DecoderState(self.cfg.decoder_layers)

    def decode(
        self,
        decoder_idx: torch.Tensor,
        memory: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        cache: DecoderState | None = None,
    ) -> torch.Tensor:
        """The attentional outputs (B, T, d) for the decoder's inputs ``decoder_idx`` (B, T) after ``memory``,
        the encoder's states of inputs with ``pad_mask``. With a ``cache`` ``decoder_idx`` continues from its
        state, which is updated."""
        x = self.emb_dropout(self.tok_emb(decoder_idx))
        started = cache is not None and cache.seen > 0
        states = cache.layers if cache is not None and started else self.initial_states(memory)
        new_states: list[State | None] = []
        for layer, state in zip(self.blocks[self.cfg.n_layers :], states, strict=True):
            x, state = layer(x, state)
            new_states.append(state)
        keys = cache.keys if cache is not None and cache.keys is not None else self.attention.keys(memory)
        if cache is not None:
            cache.layers, cache.keys, cache.seen = new_states, keys, cache.seen + decoder_idx.shape[1]
        return self.attention(x, memory, keys, pad_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight


def recurrent_model(cfg: RNNConfig, generator: torch.Generator | None = None) -> nn.Module:
    """The ``rnn`` family's model: the language model, or with ``encoder_decoder`` the encoder-decoder."""
    return RNNEncoderDecoder(cfg, generator) if cfg.encoder_decoder else RNN(cfg, generator)


def recurrent_flops_per_token(cfg: RNNConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """The ``rnn`` family's training FLOPs (forward + backward) per input token over the matrix products. The
    encoder-decoder's are counted as T5's (``lmscale.models.t5``), for ``seq_len`` inputs and
    ``cfg.target_len`` targets, 6 per weight and token:

    - the encoder's two directions over the inputs, less the backward pass into their zero initial states;
    - the bridge, once per sequence;
    - the decoder's layers, the attention's query and combination, and the head (over the scored share)
      over the targets;
    - the additive attention's keys over the inputs;
    - the scores and the context, targets times inputs times d_model each.

    The language model's count is :func:`lmscale.models.rnn.flops_per_token`."""
    if not cfg.encoder_decoder:
        return language_model_flops(cfg, seq_len, predicted_fraction)
    assert cfg.vocab_size is not None and cfg.target_len is not None
    d, gates, S, T = cfg.d_model, GATES[cfg.cell], seq_len, cfg.target_len
    half = d // 2
    encoder = cfg.n_layers * 2 * gates * half * (d + half)  # both directions, input and state matrices
    decoder = cfg.decoder_layers * 2 * gates * d * d
    additive = cfg.attention == "additive"
    per_target = decoder + (d * d if additive else 0) + 2 * d * d + d * cfg.vocab_size * predicted_fraction
    per_input = encoder + (d * d if additive else 0)
    pairs = 2 * T * S * d  # the scores (dot products, or the additive energy's) and the context
    weights = per_input * S + per_target * T + half * cfg.decoder_layers * d + pairs
    zero_start = cfg.n_layers * 2 * 2.0 * gates * half * half  # each direction's state matrix, once
    return (6.0 * weights - zero_start) / S
