"""lmscale T5 <-> Hugging Face ``T5ForConditionalGeneration`` (T5 v1.1: gated-GELU, untied head): a literal
key table.

Both keep ``nn.Linear`` layouts, so the table is a pure rename. lmscale's ``blocks`` are the encoder's layers
then the decoder's; transformers numbers each stack from 0 and keeps the relative position table in layer
0 of each. The encoder's and decoder's token embeddings are ``shared`` in transformers, which ties them
itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmscale.data.tokenizer import T5_EOS as EOS
from lmscale.data.tokenizer import T5_PAD as PAD
from lmscale.data.tokenizer import T5_UNK as UNK
from lmscale.data.tokenizer import load_tokenizer, sentinel
from lmscale.errors import LmscaleError
from lmscale.hf.adapter import HFAdapter
from lmscale.models import encoder_decoder_inputs
from lmscale.models.t5 import T5Config

ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
FEED_FORWARD = {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"}


def _block_table(ours: str, theirs: str, cross: bool) -> dict[str, str]:
    """One layer: lmscale ``ours`` (blocks.i) to transformers ``theirs`` (encoder.block.j or decoder.block.j)."""
    table = {f"{ours}.attn_norm.weight": f"{theirs}.layer.0.layer_norm.weight"}
    table |= {f"{ours}.attn.{a}.weight": f"{theirs}.layer.0.SelfAttention.{b}.weight" for a, b in ATTENTION.items()}
    mlp_layer = 2 if cross else 1
    if cross:
        table[f"{ours}.cross_norm.weight"] = f"{theirs}.layer.1.layer_norm.weight"
        table |= {f"{ours}.cross.{a}.weight": f"{theirs}.layer.1.EncDecAttention.{b}.weight"
                  for a, b in ATTENTION.items()}  # fmt: skip
    table[f"{ours}.mlp_norm.weight"] = f"{theirs}.layer.{mlp_layer}.layer_norm.weight"
    table |= {f"{ours}.mlp.{a}.weight": f"{theirs}.layer.{mlp_layer}.DenseReluDense.{b}.weight"
              for a, b in FEED_FORWARD.items()}  # fmt: skip
    return table


def key_table(cfg: T5Config) -> dict[str, str]:
    """Every lmscale key of the model and its Hugging Face name."""
    table = {
        "tok_emb.weight": "shared.weight",
        "encoder_bias.table.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder_bias.table.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder_norm.weight": "encoder.final_layer_norm.weight",
        "decoder_norm.weight": "decoder.final_layer_norm.weight",
    }
    for i in range(cfg.n_layers):
        table |= _block_table(f"blocks.{i}", f"encoder.block.{i}", cross=False)
    for j in range(cfg.decoder_layers):
        table |= _block_table(f"blocks.{cfg.n_layers + j}", f"decoder.block.{j}", cross=True)
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = "lm_head.weight"
    return table


def hf_config_dict(cfg: T5Config, special_tokens: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of the exported model."""
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.ff_dim,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": cfg.init_std,
        "feed_forward_proj": "gated-gelu",  # the tanh GELU lmscale trains with ("gelu_new")
        "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True,
        "n_positions": cfg.seq_len,  # the input length it was trained on (T5's configs carry it as this)
        "pad_token_id": special_tokens[PAD],
        "eos_token_id": special_tokens[EOS],
        "decoder_start_token_id": special_tokens[PAD],
    }


def t5_config_from_hf(config: dict[str, Any]) -> T5Config:
    """The lmscale architecture of an HF T5 ``config.json``."""
    projection = config.get("feed_forward_proj", "relu")
    if projection != "gated-gelu":
        raise LmscaleError(f"config.json: feed_forward_proj {projection!r} is not supported (lmscale: gated-gelu)")
    return T5Config(
        vocab_size=config["vocab_size"], d_model=config["d_model"], d_kv=config.get("d_kv"), d_ff=config["d_ff"],
        n_layers=config["num_layers"], n_decoder_layers=config.get("num_decoder_layers"),
        n_heads=config["num_heads"], relative_buckets=config.get("relative_attention_num_buckets", 32),
        relative_max_distance=config.get("relative_attention_max_distance", 128),
        dropout=config.get("dropout_rate", 0.0), norm_eps=config.get("layer_norm_epsilon", 1e-6),
        init_std=config.get("initializer_factor", 1.0), tie_embeddings=config.get("tie_word_embeddings", True),
        decoder_start_id=config.get("decoder_start_token_id", config.get("pad_token_id", 0)),
        seq_len=config.get("n_positions"),
    )  # fmt: skip


def to_hf(sd: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """lmscale state dict -> Hugging Face state dict."""
    return {theirs: sd[ours] for ours, theirs in key_table(cfg).items()}


def from_hf(sd: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> lmscale state dict (the inverse of ``to_hf``)."""
    return {ours: sd[theirs] for ours, theirs in key_table(cfg).items()}


def tied_keys(cfg: T5Config) -> set[str]:
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    return tied | {"lm_head.weight"} if cfg.tie_embeddings else tied


def tokenizer(tokenizer_file: Path, cfg: T5Config) -> tuple[Any, dict[str, Any]]:
    """The run's tokenizer with T5's special tokens: padding (also the decoder's start), end of sequence
    (appended to every text), unknown, and the span-corruption sentinels ``<extra_id_N>`` it holds."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = load_tokenizer(tokenizer_file)
    # Every input and target ends with end of sequence, as the model was trained: T5's tokenizers append it.
    eos = backend.token_to_id(EOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos)]
    )
    sentinels = []
    while backend.token_to_id(sentinel(len(sentinels))) is not None:
        sentinels.append(sentinel(len(sentinels)))
    special: dict[str, Any] = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    if sentinels:
        special["additional_special_tokens"] = sentinels
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=cfg.seq_len, **special)
    return tok, special


ADAPTER = HFAdapter(
    model_types=("t5",),
    config_dict=hf_config_dict,
    config_from_hf=t5_config_from_hf,
    to_hf=to_hf,
    from_hf=from_hf,
    auto_class=lambda cfg: "AutoModelForSeq2SeqLM",
    tied_keys=tied_keys,
    tokenizer=tokenizer,
    parity_inputs=encoder_decoder_inputs,
)
