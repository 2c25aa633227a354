"""Decoder-only causal language model in two flavors.

- ``gpt2``: learned absolute positions, pre-LayerNorm with biases, GELU MLP, tied embeddings (GPT-2).
- ``llama``: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, optionally
  untied embeddings (Llama 2/3).

Architecture only: no DeepSpeed, data, logging or checkpoint code lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmscale.models import initialise
from lmscale.models.layers import Attention, GeluMLP, KVCache, RMSNorm, SwiGLUMLP, rotary_tables
from lmscale.models.loss import linear_cross_entropy


@dataclass(frozen=True)
class GPTConfig:
    """The ``model`` section of a GPT run, and the architecture it describes."""

    family: Literal["gpt"] = "gpt"
    flavor: Literal["gpt2", "llama"] = "gpt2"
    """gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU, GQA)."""
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama); default n_heads."""
    d_ff: int | None = None
    """MLP hidden size; default 4*d_model (gpt2) or the Llama 8/3*d_model rounded to 64."""
    seq_len: int | None = None
    """Context length (positions); default the dataset's seq_len."""
    vocab_size: int | None = None
    """Embedding rows; default the dataset tokenizer's vocabulary."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm (gpt2) or RMSNorm (llama)."""
    init_std: float = 0.02
    init_from: str | None = None
    """A Hugging Face-format model directory to start (continued pretraining) from."""

    @property
    def data_format(self) -> str:
        return "causal"

    def problems(self) -> list[str]:
        """What is wrong with the section, each as ``field: reason``."""
        found = []
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            found.append(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.flavor == "gpt2" and self.n_kv_heads not in (None, self.n_heads):
            found.append("n_kv_heads: grouped-query attention needs flavor: llama")
        if self.flavor == "llama" and (self.d_model // self.n_heads) % 2:
            found.append("d_model: the llama flavor needs an even head size for rotary embeddings")
        return found

    def architecture(self) -> dict[str, object]:
        """The fields that decide what the weights mean: two models agreeing on them can swap weights."""
        rotary = {"rope_theta": self.rope_theta} if self.flavor == "llama" else {}
        return {"flavor": self.flavor, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "kv_heads": self.kv_heads, "ff_dim": self.ff_dim, "tie_embeddings": self.tie_embeddings,
                "norm_eps": self.norm_eps, **rotary}  # fmt: skip

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.flavor == "gpt2":
            return 4 * self.d_model
        # Llama keeps the parameter count of a 4x GELU MLP with three matrices: 2/3 * 4d, rounded up to 64.
        return 64 * math.ceil(int(8 * self.d_model / 3) / 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def position_limit(self) -> int | None:
        """The longest input it takes: its learned positions (gpt2) or the rotary cache it was built for (llama)."""
        return self.seq_len

    @property
    def block_count(self) -> int:
        return self.n_layers

    def block_activation_elements(self) -> int:
        """Elements one block keeps per token for its backward pass (the memory estimate's unit): the two norms'
        inputs and outputs, q, k and v, the attention output (SDPA keeps its log-sum-exp, not the scores), the
        residual sum, and the MLP's hidden activations (GELU: its input and output; SwiGLU: gate, up, their
        activation and product)."""
        kv = self.kv_heads * self.head_dim
        return 6 * self.d_model + 2 * kv + (4 if self.flavor == "llama" else 2) * self.ff_dim


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        llama = cfg.flavor == "llama"
        norm = (
            (lambda: RMSNorm(cfg.d_model, cfg.norm_eps)) if llama else (lambda: nn.LayerNorm(cfg.d_model, cfg.norm_eps))
        )
        self.attn_norm = norm()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, bias=not llama, dropout=cfg.dropout, causal=True)
        self.mlp_norm = norm()
        self.mlp = SwiGLUMLP(cfg.d_model, cfg.ff_dim) if llama else GeluMLP(cfg.d_model, cfg.ff_dim, bias=True)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rotary, cache, layer, mask))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, generator: torch.Generator | None = None) -> None:
        """``generator`` draws the initial weights (default: torch's global RNG)."""
        super().__init__()
        assert cfg.vocab_size is not None and cfg.seq_len is not None, "the run plan fills in vocab_size and seq_len"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.flavor == "gpt2" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = (
            RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.flavor == "llama" else nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.flavor == "llama":
            cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
            # Not persistent: the tables are a function of the config, so checkpoints need not carry them.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        initialise(self, generator)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initial value of parameter ``name``, written into ``p`` (the parameter, or a full-size stand-in for
        one that is partitioned across ranks)."""
        std = self.cfg.init_std
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream keeps unit scale.
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers), generator=generator)
        else:
            nn.init.normal_(p, 0.0, std, generator=generator)

    def new_cache(self, capacity: int) -> KVCache:
        """What generation keeps between steps: every layer's keys and values, for ``capacity`` positions."""
        return KVCache(self.cfg.n_layers, capacity=capacity)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), and None; with ``targets`` (B, T) instead None and
        the mean cross-entropy, computed in chunks of tokens so that the whole fp32 logits never exist
        (``lmscale.models.loss``).

        Targets equal to -100 are ignored. With a ``cache``, ``idx`` continues the cached positions.
        ``pad_mask`` (B, past + T), True for real tokens, serves left-padded batches of prompts: each row's
        positions count its real tokens only, and no token attends to padding.
        """
        B, T = idx.shape
        past = cache.length() if cache is not None else 0
        if past + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's {self.cfg.seq_len} positions")
        mask = None
        if pad_mask is not None:
            positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            mask = self._causal_mask(T, past, idx.device) & pad_mask[:, None, None, :]  # (B, 1, T, past+T)
            # A padding query would see no key at all (NaN); letting it see itself keeps the row finite.
            keys = torch.arange(past + T, device=idx.device)
            mask = mask | (keys[None, :] == past + torch.arange(T, device=idx.device)[:, None])
        else:
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
            if past and T > 1:
                mask = self._causal_mask(T, past, idx.device)
        x = self.tok_emb(idx)  # (B, T, d)
        rotary = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            # The tables are fp32; the rotation runs in the activations' dtype, as transformers' Llama does.
            cos, sin = (table[positions].unsqueeze(1).to(x.dtype) for table in (self.rope_cos, self.rope_sin))
            rotary = (cos, sin)  # (B, 1, T, hs)
        x = self.emb_dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, cache, layer, mask)
        x = self.final_norm(x)
        if targets is None:
            return self.lm_head(x), None  # (B, T, vocab)
        loss, _ = linear_cross_entropy(x, self.lm_head.weight, targets)
        return None, loss

    @staticmethod
    def _causal_mask(T: int, past: int, device: torch.device) -> torch.Tensor:
        """(T, past + T): query i (at position past + i) sees keys up to and including itself."""
        return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def flops_per_token(cfg: GPTConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token, counted exactly over the matrix products;
    ``predicted_fraction`` of the positions run the output head (all of them for a causal LM).

    Each weight matrix costs 2 FLOPs per multiply-add in the forward pass and twice that in the backward:
    6 * (matmul weights). Attention adds Q @ K^T and A @ V: 2 * 2 * seq_len * d_model per layer forward,
    so 12 * n_layers * seq_len * d_model for training (the PaLM appendix B convention: the causal half
    is not subtracted, matching what the kernels compute).
    """
    d, L = cfg.d_model, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    attn_weights = d * d + 2 * d * kv + d * d  # q, k, v, o
    mlp_weights = (3 if cfg.flavor == "llama" else 2) * d * cfg.ff_dim
    assert cfg.vocab_size is not None
    matmul_weights = L * (attn_weights + mlp_weights) + d * cfg.vocab_size * predicted_fraction  # + lm_head
    return 6.0 * matmul_weights + 12.0 * L * seq_len * d
