"""Transformer building blocks shared by the model families (GPT flavors, BERT).

References:
- GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
- Llama: Touvron et al. 2023; RoPE: Su et al. 2021; RMSNorm: Zhang & Sennrich 2019; SwiGLU: Shazeer 2020;
  grouped-query attention: Ainslie et al. 2023.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the small-variance rows.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) in the rotate-half layout that Hugging Face Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by position; cos/sin are (T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding.

    Allocated once per layer for ``capacity`` positions (when given) and filled in place, so a decoding
    step writes its new key and value instead of copying the whole cache; without a capacity it grows.
    """

    def __init__(self, n_layers: int, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    def length(self, layer: int = 0) -> int:
        """Positions cached for ``layer`` (layers fill in turn during a forward pass)."""
        return self.lengths[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, nkv, T, hs) keys and values; returns all cached ones, (B, nkv, length, hs)."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or end > keys.shape[2]:
            size = max(end, self.capacity or 0)
            grown_k, grown_v = k.new_empty(*k.shape[:2], size, k.shape[3]), v.new_empty(*v.shape[:2], size, v.shape[3])
            if keys is not None and values is not None:
                grown_k[:, :, :start], grown_v[:, :, :start] = keys[:, :, :start], values[:, :, :start]
            keys, values = self.keys[layer], self.values[layer] = grown_k, grown_v
        keys[:, :, start:end], values[:, :, start:end] = k, v
        self.lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, dropout: float, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.dropout = dropout
        self.causal = causal

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past = 0
        if cache is not None:
            past = cache.length(layer)
            k, v = cache.update(layer, k, v)  # (B, nkv, past+T, hs)
        dropout = self.dropout if self.training else 0.0
        # Without a mask: plain causal attention, or one new token that may see everything cached.
        is_causal = self.causal and attn_mask is None and past == 0 and T > 1
        # enable_gqa: each group of query heads shares one key/value head, without copying k and v per head.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, d)
        return self.o_proj(y)


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool, approximate: str = "tanh") -> None:
        """``approximate``: GPT-2 uses the tanh approximation of GELU, BERT the exact one ("none"); matching
        the original keeps exported logits identical."""
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class SwiGLUMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
