"""lmscale GPT <-> Hugging Face state dicts and configs: pure functions over literal key tables.

GPT-2 (``GPT2LMHeadModel``) stores its linear layers as ``Conv1D`` with weights (in, out), the transpose
of ``nn.Linear``, and fuses q, k, v into one ``c_attn``. Llama (``LlamaForCausalLM``) uses the same
layouts as lmscale (rotary in the rotate-half convention), so its table is a pure rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmscale.data.tokenizer import EOT
from lmscale.errors import LmscaleError
from lmscale.hf.adapter import HFAdapter
from lmscale.models.gpt import GPTConfig

# lmscale key -> Hugging Face key, outside the blocks.
GPT2_TOP = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
# Inside block i: lmscale "blocks.{i}.<key>" -> HF "transformer.h.{i}.<value>"; True marks a transpose.
GPT2_BLOCK = {
    "attn_norm.weight": ("ln_1.weight", False),
    "attn_norm.bias": ("ln_1.bias", False),
    "attn.o_proj.weight": ("attn.c_proj.weight", True),
    "attn.o_proj.bias": ("attn.c_proj.bias", False),
    "mlp_norm.weight": ("ln_2.weight", False),
    "mlp_norm.bias": ("ln_2.bias", False),
    "mlp.up_proj.weight": ("mlp.c_fc.weight", True),
    "mlp.up_proj.bias": ("mlp.c_fc.bias", False),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", True),
    "mlp.down_proj.bias": ("mlp.c_proj.bias", False),
}
GPT2_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # fused, in this order, into attn.c_attn

LLAMA_TOP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def hf_config_dict(cfg: GPTConfig, eot_id: int) -> dict[str, Any]:
    """The ``config.json`` of the exported model."""
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id,
              "tie_word_embeddings": cfg.tie_embeddings}  # fmt: skip
    if cfg.flavor == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_positions": cfg.seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ff_dim,
            "activation_function": "gelu_new",  # the tanh approximation lmscale trains with
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": cfg.init_std,
            **common,
        }
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        **common,
    }


def gpt_config_from_hf(config: dict[str, Any]) -> GPTConfig:
    """The lmscale architecture of an HF ``config.json`` (GPT-2 or Llama)."""
    kind = config.get("model_type")
    tie = bool(config.get("tie_word_embeddings", True))
    if kind == "gpt2":
        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LmscaleError(f"config.json: activation_function {config['activation_function']!r} is not supported")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(flag):
                raise LmscaleError(f"config.json: {flag} is not supported by lmscale's gpt2 flavor")
        n_embd = config["n_embd"]
        return GPTConfig(
            vocab_size=config["vocab_size"], seq_len=config["n_positions"], d_model=n_embd,
            n_layers=config["n_layer"], n_heads=config["n_head"], d_ff=config.get("n_inner") or 4 * n_embd,
            flavor="gpt2", tie_embeddings=tie, norm_eps=config.get("layer_norm_epsilon", 1e-5),
        )  # fmt: skip
    if kind == "llama":
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        unsupported = {
            "rope scaling": rope_type != "default",
            "attention_bias": bool(config.get("attention_bias")),
            "mlp_bias": bool(config.get("mlp_bias")),
            f"hidden_act {config.get('hidden_act')!r}": config.get("hidden_act", "silu") != "silu",
        }
        if any(unsupported.values()):
            found = ", ".join(name for name, present in unsupported.items() if present)
            raise LmscaleError(f"config.json: {found} is not supported by lmscale's llama flavor")
        return GPTConfig(
            vocab_size=config["vocab_size"], seq_len=config["max_position_embeddings"], d_model=config["hidden_size"],
            n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"), d_ff=config["intermediate_size"], flavor="llama",
            tie_embeddings=tie, rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            norm_eps=config.get("rms_norm_eps", 1e-5),
        )  # fmt: skip
    raise LmscaleError(f"config.json: model_type {kind!r} is not supported (gpt2 or llama)")


def to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """lmscale state dict -> Hugging Face state dict."""
    out: dict[str, torch.Tensor] = {}
    top = GPT2_TOP if cfg.flavor == "gpt2" else LLAMA_TOP
    for ours, theirs in top.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF ties lm_head to the input embedding itself
        out[theirs] = sd[ours]
    for i in range(cfg.n_layers):
        src = f"blocks.{i}."
        if cfg.flavor == "gpt2":
            dst = f"transformer.h.{i}."
            for ours, (theirs, transpose) in GPT2_BLOCK.items():
                out[dst + theirs] = sd[src + ours].t().contiguous() if transpose else sd[src + ours]
            # Conv1D c_attn: (d_model, 3 * d_model), columns [q | k | v].
            qkv = torch.cat([sd[f"{src}{p}.weight"] for p in GPT2_QKV], dim=0)  # (3 * d_model, d_model)
            out[dst + "attn.c_attn.weight"] = qkv.t().contiguous()
            out[dst + "attn.c_attn.bias"] = torch.cat([sd[f"{src}{p}.bias"] for p in GPT2_QKV], dim=0)
        else:
            dst = f"model.layers.{i}."
            for ours, theirs in LLAMA_BLOCK.items():
                out[dst + theirs] = sd[src + ours]
    return out


def from_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> lmscale state dict (the inverse of ``to_hf``)."""
    out: dict[str, torch.Tensor] = {}
    top = GPT2_TOP if cfg.flavor == "gpt2" else LLAMA_TOP
    for ours, theirs in top.items():
        if ours == "lm_head.weight" and (cfg.tie_embeddings or theirs not in sd):
            out[ours] = out["tok_emb.weight"]
            continue
        out[ours] = sd[theirs]
    d = cfg.d_model
    kv = cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        dst = f"blocks.{i}."
        if cfg.flavor == "gpt2":
            src = f"transformer.h.{i}."
            for ours, (theirs, transpose) in GPT2_BLOCK.items():
                out[dst + ours] = sd[src + theirs].t().contiguous() if transpose else sd[src + theirs]
            weight = sd[src + "attn.c_attn.weight"].t()  # (3 * d_model, d_model)
            bias = sd[src + "attn.c_attn.bias"]
            for part, w, b in zip(GPT2_QKV, weight.split([d, kv, kv]), bias.split([d, kv, kv]), strict=True):
                out[f"{dst}{part}.weight"], out[f"{dst}{part}.bias"] = w.contiguous(), b
        else:
            src = f"model.layers.{i}."
            for ours, theirs in LLAMA_BLOCK.items():
                out[dst + ours] = sd[src + theirs]
    return out


def config_dict(cfg: GPTConfig, special_tokens: dict[str, int]) -> dict[str, Any]:
    end = special_tokens.get(EOT, special_tokens.get("[SEP]"))
    assert end is not None
    return hf_config_dict(cfg, end)


def tied_keys(cfg: GPTConfig) -> set[str]:
    return {"lm_head.weight"} if cfg.tie_embeddings else set()


def tokenizer(tokenizer_file: Path, cfg: GPTConfig) -> tuple[Any, dict[str, str]]:
    """The run's tokenizer with end-of-text as every special token, as GPT-2's."""
    from transformers import PreTrainedTokenizerFast

    special = {name: EOT for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), model_max_length=cfg.seq_len, **special)
    return tok, special


ADAPTER = HFAdapter(
    model_types=("gpt2", "llama"),
    config_dict=config_dict,
    config_from_hf=gpt_config_from_hf,
    to_hf=to_hf,
    from_hf=from_hf,
    auto_class=lambda cfg: "AutoModelForCausalLM",
    tied_keys=tied_keys,
    tokenizer=tokenizer,
    parity_inputs=lambda idx: {"idx": idx},
)
