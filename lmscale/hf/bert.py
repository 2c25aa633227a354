"""lmscale BERT <-> Hugging Face ``BertForMaskedLM`` / ``BertForSequenceClassification``: a literal key table.

Both use ``nn.Linear`` layouts, so the table is a pure rename. The MLM decoder is the word-embedding matrix in
both (tied), with its own bias; the pooler exists in the classifier only, as in ``transformers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmscale.data.tokenizer import load_tokenizer, with_bert_template
from lmscale.errors import LmscaleError
from lmscale.hf.adapter import HFAdapter
from lmscale.models.bert import BertConfig

EMBEDDINGS = {
    "tok_emb.weight": "bert.embeddings.word_embeddings.weight",
    "pos_emb.weight": "bert.embeddings.position_embeddings.weight",
    "type_emb.weight": "bert.embeddings.token_type_embeddings.weight",
    "emb_norm.weight": "bert.embeddings.LayerNorm.weight",
    "emb_norm.bias": "bert.embeddings.LayerNorm.bias",
}
# Inside block i: lmscale "blocks.{i}.<key>" -> HF "bert.encoder.layer.{i}.<value>", for weight and bias.
BLOCK = {
    "attn.q_proj": "attention.self.query",
    "attn.k_proj": "attention.self.key",
    "attn.v_proj": "attention.self.value",
    "attn.o_proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp.up_proj": "intermediate.dense",
    "mlp.down_proj": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
MLM_HEAD = {
    "mlm_transform.weight": "cls.predictions.transform.dense.weight",
    "mlm_transform.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
}
CLASSIFIER = {
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}


def key_table(cfg: BertConfig) -> dict[str, str]:
    """Every lmscale key of the model and its Hugging Face name."""
    table = dict(EMBEDDINGS)
    for i in range(cfg.n_layers):
        for ours, theirs in BLOCK.items():
            for kind in ("weight", "bias"):
                table[f"blocks.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
    table.update(CLASSIFIER if cfg.num_labels else MLM_HEAD)
    return table


def check_exportable(cfg: BertConfig) -> None:
    if cfg.flavor != "post_ln":
        raise LmscaleError(
            f"model.flavor {cfg.flavor}: transformers has no BERT class with LayerNorm before each sublayer; "
            "only post_ln BERT exports"
        )


def hf_config_dict(cfg: BertConfig, special_tokens: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of the exported model."""
    check_exportable(cfg)
    head: dict[str, Any] = {"architectures": ["BertForMaskedLM"]}
    if cfg.num_labels:
        head = {
            "architectures": ["BertForSequenceClassification"],
            "id2label": dict(enumerate(cfg.labels)),
            "label2id": {label: i for i, label in enumerate(cfg.labels)},
            "problem_type": "single_label_classification",
        }
    return {
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ff_dim,
        "hidden_act": "gelu",  # exact GELU, as lmscale trains
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": special_tokens["[PAD]"],
        "tie_word_embeddings": True,
        **head,
    }


def bert_config_from_hf(config: dict[str, Any]) -> BertConfig:
    """The lmscale architecture of an HF BERT ``config.json``."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise LmscaleError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (lmscale: gelu)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise LmscaleError("config.json: only absolute position embeddings are supported")
    classifier = "BertForSequenceClassification" in config.get("architectures", [])
    id2label = config.get("id2label") or {}
    labels = [id2label[key] for key in sorted(id2label, key=int)] if classifier else []
    return BertConfig(
        vocab_size=config["vocab_size"], seq_len=config["max_position_embeddings"], d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        d_ff=config["intermediate_size"], type_vocab_size=config.get("type_vocab_size", 2),
        dropout=config.get("hidden_dropout_prob", 0.1), norm_eps=config.get("layer_norm_eps", 1e-12),
        init_std=config.get("initializer_range", 0.02), labels=labels,
    )  # fmt: skip


def to_hf(sd: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """lmscale state dict -> Hugging Face state dict."""
    return {theirs: sd[ours] for ours, theirs in key_table(cfg).items()}


def from_hf(sd: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> lmscale state dict (the inverse of ``to_hf``)."""
    return {ours: sd[theirs] for ours, theirs in key_table(cfg).items()}


def auto_class(cfg: BertConfig) -> str:
    return "AutoModelForSequenceClassification" if cfg.num_labels else "AutoModelForMaskedLM"


def tied_keys(cfg: BertConfig) -> set[str]:
    return set() if cfg.num_labels else {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def tokenizer(tokenizer_file: Path, cfg: BertConfig) -> tuple[Any, dict[str, str]]:
    """The run's tokenizer with BERT's special tokens and its [CLS] ... [SEP] template."""
    from transformers import PreTrainedTokenizerFast

    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}  # fmt: skip
    backend = with_bert_template(load_tokenizer(tokenizer_file))
    # Token types tell the two texts of a pair apart: the model must be given them.
    inputs = ["input_ids", "token_type_ids", "attention_mask"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=cfg.seq_len, model_input_names=inputs, **special
    )
    return tok, special


def parity_inputs(idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The second row padded from its middle on, so the check covers the padding mask."""
    pad_mask = torch.ones_like(idx, dtype=torch.bool)
    pad_mask[1, idx.shape[1] // 2 :] = False
    return {"idx": idx, "pad_mask": pad_mask}


ADAPTER = HFAdapter(
    model_types=("bert",),
    config_dict=hf_config_dict,
    config_from_hf=bert_config_from_hf,
    to_hf=to_hf,
    from_hf=from_hf,
    auto_class=auto_class,
    tied_keys=tied_keys,
    tokenizer=tokenizer,
    parity_inputs=parity_inputs,
    check_exportable=check_exportable,
)
