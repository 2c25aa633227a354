"""Encoder-decoder Transformer in the T5 v1.1 style (Raffel et al. 2020; the v1.1 changes of the T5 repository).

- Pre-LN with RMSNorm (no bias, no mean subtraction), no biases anywhere, dropout on the residual branches.
- Relative position buckets instead of position embeddings: one learned bias per (bucket, head), added to the
  attention scores; bidirectional in the encoder, causal in the decoder, one table per stack, computed once per
  forward and shared by the stack's layers. Scores are not divided by sqrt(head size) (T5 folds that into the
  initialisation of the queries).
- Gated-GELU feed-forward (tanh GELU of one projection times another), the LM head untied from the shared
  embedding by default (v1.1; tied, the decoder's output is scaled by d_model^-0.5 as in the original T5).

The decoder reads the targets shifted right behind ``decoder_start_id`` (the padding id, as in T5). Its
repeated layers are ``blocks``: the encoder's, then the decoder's, so that activation checkpointing and
compilation (``lmscale.train.levers``) treat both stacks.

Architecture only: no DeepSpeed, data, logging or checkpoint code lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmscale.models import initialise
from lmscale.models.encoder_decoder import EncoderDecoderLM
from lmscale.models.layers import KVCache, RMSNorm


@dataclass(frozen=True)
class T5Config:
    """The ``model`` section of a T5 run, and the architecture it describes."""

    family: Literal["t5"] = "t5"
    flavor: Literal["v1_1"] = "v1_1"
    d_model: int = 256
    n_layers: int = 4
    """Layers of the encoder."""
    n_decoder_layers: int | None = None
    """Layers of the decoder; default n_layers."""
    n_heads: int = 4
    d_kv: int | None = None
    """Size of one attention head; default d_model / n_heads."""
    d_ff: int | None = None
    """Feed-forward hidden size; default 8/3 * d_model rounded to 64 (the gated layer's two projections)."""
    seq_len: int | None = None
    """Encoder input positions; default the dataset's (span corruption: the corrupted input length)."""
    target_len: int | None = None
    """Decoder positions; default the dataset's target length."""
    vocab_size: int | None = None
    """Embedding rows; default the dataset tokenizer's vocabulary."""
    relative_buckets: int = 32
    relative_max_distance: int = 128
    tie_embeddings: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 1.0
    """Scale of the initialisation, T5's ``initializer_factor``: each matrix is drawn with the std that keeps
    its outputs at unit variance, times this."""
    decoder_start_id: int = 0
    """The decoder's first input: the tokenizer's padding id (T5's convention); the run plan fills it in."""
    init_from: str | None = None
    """A Hugging Face-format T5 directory (or an lmscale run directory, for fine-tuning) to start from."""
    data_format: Literal["span_corruption", "seq2seq"] = "span_corruption"
    """What it trains on: span corruption (pretraining) or source/target pairs (``lmscale finetune`` sets it)."""

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_kv if self.d_kv is not None else self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def position_limit(self) -> int | None:
        """None: relative position buckets take inputs of any length."""
        return None

    @property
    def block_count(self) -> int:
        return self.n_layers + self.decoder_layers

    def block_activation_elements(self) -> int:
        """Elements one block keeps per token for its backward pass, counted as GPT's (``lmscale.models.gpt``):
        norms, q, k, v, the attention output and residual sums, and the gated feed-forward's three
        intermediates. A decoder block's cross-attention adds about as much again; this counts the average."""
        inner = self.n_heads * self.head_dim
        self_attention = 2 * self.d_model + 4 * inner
        feed_forward = 2 * self.d_model + 3 * self.ff_dim
        return self_attention + feed_forward + (self_attention // 2)

    def problems(self) -> list[str]:
        found = []
        if self.d_kv is None and self.d_model % self.n_heads:
            found.append(f"n_heads: {self.n_heads} does not divide d_model={self.d_model} (or set d_kv)")
        if self.relative_buckets < 2:
            found.append(f"relative_buckets: must be at least 2, got {self.relative_buckets}")
        if self.relative_max_distance <= self.relative_buckets // 4:
            found.append(
                f"relative_max_distance: must exceed a quarter of relative_buckets, got {self.relative_max_distance}"
            )
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            found.append(f"n_decoder_layers: must be > 0, got {self.n_decoder_layers}")
        return found

    def architecture(self) -> dict[str, object]:
        """The fields that decide what the weights mean: two models agreeing on them can swap them."""
        return {"flavor": self.flavor, "vocab_size": self.vocab_size, "d_model": self.d_model,
                "n_layers": self.n_layers, "decoder_layers": self.decoder_layers, "n_heads": self.n_heads,
                "head_dim": self.head_dim, "ff_dim": self.ff_dim, "relative_buckets": self.relative_buckets,
                "relative_max_distance": self.relative_max_distance, "tie_embeddings": self.tie_embeddings,
                "norm_eps": self.norm_eps}  # fmt: skip


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each (key position - query position): exact for small distances, then logarithmic up
    to ``max_distance``, beyond which all share the last bucket; split by sign when ``bidirectional``, and
    only the past (distances <= 0) told apart when not."""
    offset = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        offset = (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (buckets - exact)).long()).clamp(max=buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativeBias(nn.Module):
    """The learned (bucket, head) table of one stack, as additive attention biases (1, heads, queries, keys)."""

    def __init__(self, cfg: T5Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.table = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, queries: int, keys: int, first_query: int = 0) -> torch.Tensor:
        device = self.table.weight.device
        query_positions = torch.arange(first_query, first_query + queries, device=device)[:, None]
        relative = torch.arange(keys, device=device)[None, :] - query_positions
        bucket = relative_buckets(relative, self.bidirectional, self.buckets, self.max_distance)
        return self.table(bucket).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head attention without biases or score scaling; self-attention when ``memory`` is None, else
    cross-attention to it."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        memory: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``bias`` (1 or B, heads, T, keys) holds the positions' biases and the mask (-inf where masked).
        A cache holds the self-attention's past keys and values; for cross-attention, the keys and values of
        ``memory``, computed on the first call only."""
        B, T, _ = x.shape
        q = self.heads(self.q_proj(x))
        if memory is not None and cache is not None and cache.length(layer):
            k, v = cache.keys[layer], cache.values[layer]
        else:
            source = x if memory is None else memory
            k, v = self.heads(self.k_proj(source)), self.heads(self.v_proj(source))
            if cache is not None:
                k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0, scale=1.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GatedGeluMLP(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)))


class Block(nn.Module):
    """An encoder layer, or with ``cross`` a decoder layer (self-attention, cross-attention, feed-forward)."""

    def __init__(self, cfg: T5Config, cross: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = T5Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cross else None
        self.cross = T5Attention(cfg) if cross else None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GatedGeluMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_bias: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        self_cache, cross_cache = (cache.self_attention, cache.cross_attention) if cache is not None else (None, None)
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), bias, cache=self_cache, layer=layer))
        if self.cross is not None and self.cross_norm is not None:
            assert memory is not None and memory_bias is not None
            x = x + self.resid_dropout(self.cross(self.cross_norm(x), memory_bias, memory, cross_cache, layer))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class DecoderCache:
    """What the decoder carries between generation steps: its self-attention's keys and values (``capacity``
    positions), and the cross-attention's of the inputs, computed on the first step."""

    def __init__(self, layers: int, capacity: int | None = None) -> None:
        self.self_attention = KVCache(layers, capacity=capacity)
        self.cross_attention = KVCache(layers)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the cached rows of the beams that continue, in their new order (the cross-attention's are the
        same for every beam)."""
        cache = self.self_attention
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
            if keys is not None and values is not None:
                cache.keys[layer], cache.values[layer] = keys[rows], values[rows]


def mask_bias(keep: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """(B, 1, 1, keys) additive bias, -inf where ``keep`` (B, keys) is False."""
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))[:, None, None]


class T5(EncoderDecoderLM):
    def __init__(self, cfg: T5Config, generator: torch.Generator | None = None) -> None:
        super().__init__()
        assert cfg.vocab_size is not None, "the run plan fills in vocab_size"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder_bias = RelativeBias(cfg, bidirectional=True)
        self.decoder_bias = RelativeBias(cfg, bidirectional=False)
        self.blocks = nn.ModuleList(
            [*(Block(cfg, cross=False) for _ in range(cfg.n_layers)),
             *(Block(cfg, cross=True) for _ in range(cfg.decoder_layers))]
        )  # fmt: skip
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        initialise(self, generator)

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.blocks[: self.cfg.n_layers])

    @property
    def decoder_blocks(self) -> list[nn.Module]:
        return list(self.blocks[self.cfg.n_layers :])

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """T5's initialisation (``initializer_factor`` = init_std): each matrix with the std that keeps unit
        variance through it (1/sqrt(fan-in)), queries further by 1/sqrt(head size) in place of the score
        scaling, embeddings and the relative tables with std 1, gains at 1."""
        cfg, factor = self.cfg, self.cfg.init_std
        inner = cfg.n_heads * cfg.head_dim
        if "norm" in name:
            nn.init.ones_(p)
            return
        if name.startswith("tok_emb") or name.endswith("table.weight"):
            std = 1.0
        elif name.startswith("lm_head"):
            std = cfg.d_model**-0.5
        elif name.endswith("q_proj.weight"):
            std = (cfg.d_model * cfg.head_dim) ** -0.5
        elif name.endswith("o_proj.weight"):
            std = inner**-0.5
        elif name.endswith("down_proj.weight"):
            std = cfg.ff_dim**-0.5
        else:
            std = cfg.d_model**-0.5
        nn.init.normal_(p, 0.0, factor * std, generator=generator)

    def encode(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, d) for input ids ``idx`` (B, S); ``pad_mask`` True at real tokens."""
        x = self.dropout(self.tok_emb(idx))
        bias = self.encoder_bias(idx.shape[1], idx.shape[1])
        padding = mask_bias(pad_mask, bias.dtype)
        if padding is not None:
            bias = bias + padding
        for block in self.encoder_blocks:
            x = block(x, bias)
        return self.dropout(self.encoder_norm(x))

    def decode(
        self,
        decoder_idx: torch.Tensor,
        memory: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """The decoder's output (B, T, d) for its inputs ``decoder_idx`` (B, T) after ``memory``, the encoder's
        output of inputs with ``pad_mask``. With a ``cache`` ``decoder_idx`` holds the new positions only."""
        past = cache.self_attention.length() if cache is not None else 0
        T = decoder_idx.shape[1]
        x = self.dropout(self.tok_emb(decoder_idx))
        bias = self.decoder_bias(T, past + T, first_query=past)
        future = torch.ones(T, past + T, dtype=torch.bool, device=x.device).triu(past + 1)
        bias = bias.masked_fill(future, float("-inf"))
        memory_bias = mask_bias(pad_mask, bias.dtype)
        if memory_bias is None:
            memory_bias = torch.zeros(1, 1, 1, memory.shape[1], dtype=bias.dtype, device=x.device)
        for layer, block in enumerate(self.decoder_blocks):
            x = block(x, bias, memory, memory_bias, cache, layer)
        return self.dropout(self.decoder_norm(x))

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        # Tied to the embedding, whose rows have unit scale, the decoder's output is scaled down first (T5).
        return hidden * self.cfg.d_model**-0.5 if self.lm_head is None else hidden

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(self.head_input(hidden), self.tok_emb.weight)

    def new_decoder_cache(self, capacity: int) -> DecoderCache:
        """What generation carries between decoding steps, for outputs of ``capacity`` tokens."""
        return DecoderCache(self.cfg.decoder_layers, capacity)


def flops_per_token(cfg: T5Config, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per input token, over the matrix products (as
    :func:`lmscale.models.gpt.flops_per_token` counts them), for sequences of ``seq_len`` inputs and
    ``cfg.target_len`` targets (the dataset's lengths): the encoder's layers over the inputs, the decoder's
    self-attention, cross-attention and feed-forward over the targets (the cross-attention's keys and values
    over the inputs), and the head over the scored share of the targets. Per input token, since a step's
    tokens are counted as sequences times ``seq_len``."""
    assert cfg.vocab_size is not None and cfg.target_len is not None
    d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ff_dim
    S, T = seq_len, cfg.target_len
    layer = 4 * d * inner + 3 * d * ff
    cross = 2 * d * inner * (T + S)  # queries and output per target, keys and values per input
    head = d * cfg.vocab_size * T * predicted_fraction
    weights = cfg.n_layers * layer * S + cfg.decoder_layers * (layer * T + cross) + head
    # Scores and their weighted sums: 4 * queries * keys * inner in the forward pass, for each attention.
    scores = cfg.n_layers * 4 * S * S * inner + cfg.decoder_layers * 4 * (T * T + T * S) * inner
    return (6.0 * weights + 3.0 * scores) / S
