"""Bidirectional encoder (BERT) with a masked-LM head for pretraining and a [CLS] classifier for fine-tuning.

- ``post_ln`` (the default): classic BERT (Devlin et al. 2018), LayerNorm after each residual sum, learned
  absolute positions, token-type embeddings, exact GELU; exports to ``BertForMaskedLM`` /
  ``BertForSequenceClassification``.
- ``pre_ln``: LayerNorm before attention and MLP and once after the last block, which trains stably at higher
  learning rates without warm-up tricks (Xiong et al. 2020).

Pretraining follows RoBERTa (Liu et al. 2019): packed sequences of whole documents, no next-sentence task;
the loss runs the MLM head on the masked positions only, as MosaicBERT does, which saves most of the head's
cost (the vocabulary projection is a quarter of a BERT-base step when run on every position).

Architecture only: no DeepSpeed, data, logging or checkpoint code lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmscale.models import initialise
from lmscale.models.layers import Attention, GeluMLP
from lmscale.models.loss import linear_cross_entropy


@dataclass(frozen=True)
class BertConfig:
    """The ``model`` section of a BERT run, and the architecture it describes."""

    family: Literal["bert"] = "bert"
    flavor: Literal["post_ln", "pre_ln"] = "post_ln"
    """post_ln (classic BERT, exports to transformers' Bert classes) or pre_ln."""
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None
    """MLP hidden size; default 4*d_model."""
    seq_len: int | None = None
    """Positions; default the dataset's seq_len."""
    vocab_size: int | None = None
    """Embedding rows; default the dataset tokenizer's vocabulary."""
    type_vocab_size: int = 2
    """Token types (segment A and B of a sentence pair)."""
    dropout: float = 0.1
    norm_eps: float = 1e-12
    init_std: float = 0.02
    labels: list[str] = field(default_factory=list)
    """Class names of the sequence-classification head in label-id order; empty for masked-LM pretraining
    (``lmscale finetune`` fills them in from the task's training data)."""
    init_from: str | None = None
    """A Hugging Face-format model directory (or an lmscale run directory, for fine-tuning) to start from."""

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def data_format(self) -> str:
        """Pretraining reads masked-LM shards, fine-tuning labelled examples."""
        return "classification" if self.labels else "mlm"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def position_limit(self) -> int | None:
        """The longest input it takes: its learned position embeddings."""
        return self.seq_len

    @property
    def block_count(self) -> int:
        return self.n_layers

    def block_activation_elements(self) -> int:
        """Elements one block keeps per token for its backward pass, as GPT's count them (``lmscale.models.gpt``):
        norms, q, k, v, the attention output, the residual sum and a GELU MLP's input and output."""
        return 8 * self.d_model + 2 * self.ff_dim

    def problems(self) -> list[str]:
        """What is wrong with the section, each as ``field: reason``."""
        found = []
        if self.type_vocab_size < 1:
            found.append(f"type_vocab_size: must be > 0, got {self.type_vocab_size}")
        if len(self.labels) == 1 or len(set(self.labels)) != len(self.labels):
            found.append(f"labels: none (masked LM) or at least 2 distinct classes, got {self.labels}")
        if self.seq_len is not None and self.seq_len < 3:
            found.append(f"seq_len: must hold [CLS], a token and [SEP], got {self.seq_len}")
        return found

    def architecture(self) -> dict[str, object]:
        """The fields that decide what the encoder's weights mean: two models agreeing on them can swap them
        (the task head aside)."""
        return {"flavor": self.flavor, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads, "ff_dim": self.ff_dim,
                "type_vocab_size": self.type_vocab_size, "norm_eps": self.norm_eps}  # fmt: skip


class Block(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.flavor == "pre_ln"
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, bias=True, dropout=cfg.dropout, causal=False)
        self.attn_norm = nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GeluMLP(cfg.d_model, cfg.ff_dim, bias=True, approximate="none")
        self.mlp_norm = nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.resid_dropout(self.attn(self.attn_norm(x), attn_mask=mask))
            return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.resid_dropout(self.attn(x, attn_mask=mask)))
        return self.mlp_norm(x + self.resid_dropout(self.mlp(x)))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig, generator: torch.Generator | None = None) -> None:
        """``generator`` draws the initial weights (default: torch's global RNG)."""
        super().__init__()
        assert cfg.vocab_size is not None and cfg.seq_len is not None, "the run plan fills in vocab_size and seq_len"
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.seq_len, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, cfg.norm_eps)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, cfg.norm_eps) if cfg.flavor == "pre_ln" else None
        if cfg.num_labels:
            self.pooler = nn.Linear(d, d)
            self.cls_dropout = nn.Dropout(cfg.dropout)
            self.classifier = nn.Linear(d, cfg.num_labels)
        else:
            # The MLM head: transform, GELU, LayerNorm, then the token embeddings (tied) plus a bias per token.
            self.mlm_transform = nn.Linear(d, d)
            self.mlm_norm = nn.LayerNorm(d, cfg.norm_eps)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        initialise(self, generator)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initial value of parameter ``name``, written into ``p`` (the parameter, or a full-size stand-in for
        one that is partitioned across ranks): BERT's truncated-free normal(0, init_std), zero biases, unit gains."""
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif self.cfg.flavor == "pre_ln" and name.endswith(("o_proj.weight", "down_proj.weight")):
            # Pre-LN residual streams grow with depth unless the residual projections start scaled down.
            nn.init.normal_(p, 0.0, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers), generator=generator)
        else:
            nn.init.normal_(p, 0.0, self.cfg.init_std, generator=generator)

    def encode(
        self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states (B, T, d) of token ids ``idx`` (B, T); ``pad_mask`` (B, T) is True for real tokens."""
        length, limit = idx.shape[1], self.cfg.seq_len
        if length > limit:
            raise ValueError(f"sequence of {length} tokens exceeds the model's {limit} positions")
        positions = torch.arange(length, device=idx.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.tok_emb(idx) + self.pos_emb(positions) + self.type_emb(types)
        x = self.emb_dropout(self.emb_norm(x))
        # No query attends to padding; padding queries still see the real tokens, so no row is empty.
        mask = pad_mask[:, None, None, :] if pad_mask is not None else None  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x) if self.final_norm is not None else x

    def mlm_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head's transform, before the vocabulary projection."""
        return self.mlm_norm(F.gelu(self.mlm_transform(hidden)))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.mlm_hidden(hidden), self.tok_emb.weight, self.mlm_bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Without ``targets``: the logits, (B, T, vocab) of the masked LM or (B, num_labels) of the classifier,
        and None. With ``targets`` ((B, T), -100 where not masked, or (B,) labels): the predicted ids of the
        scored positions in row-major order (N,), and their mean cross-entropy. The masked LM's vocabulary
        projection runs on the masked positions only, in chunks (``lmscale.models.loss``)."""
        x = self.encode(idx, pad_mask, token_type_ids)
        if self.cfg.num_labels:
            logits = self.classifier(self.cls_dropout(torch.tanh(self.pooler(x[:, 0]))))
            if targets is None:
                return logits, None
            return logits.argmax(-1)[targets != -100], F.cross_entropy(logits.float(), targets)
        if targets is None:
            return self.mlm_logits(x), None
        masked = targets != -100
        # Nothing masked in a micro-batch gives a zero loss and zero gradients everywhere.
        loss, predictions = linear_cross_entropy(
            self.mlm_hidden(x[masked]), self.tok_emb.weight, targets[masked], self.mlm_bias, predictions=True
        )
        assert predictions is not None
        return predictions, loss


def flops_per_token(cfg: BertConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token, counted exactly over the matrix products (see
    :func:`lmscale.models.gpt.flops_per_token`). The MLM head (transform and vocabulary projection) runs on
    ``predicted_fraction`` of the positions (the masked ones); the classifier once per sequence."""
    d, L = cfg.d_model, cfg.n_layers
    assert cfg.vocab_size is not None
    body = L * (4 * d * d + 2 * d * cfg.ff_dim)
    if cfg.num_labels:
        head = (d * d + d * cfg.num_labels) / seq_len
    else:
        head = (d * d + d * cfg.vocab_size) * predicted_fraction
    return 6.0 * (body + head) + 12.0 * L * seq_len * d
