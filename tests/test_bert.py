"""The BERT family below the training loop: the encoder and its heads, FLOPs, masked-LM shards and masking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmscale.config import ConfigError, from_dict
from lmscale.data.collate import MaskedLMBatch
from lmscale.data.manifest import read_manifest
from lmscale.data.shard import DocTable, PrepareOptions, mlm_pieces, prepare
from lmscale.data.stream import read_shard, split_shards
from lmscale.data.tokenizer import BERT_SPECIALS, load_tokenizer
from lmscale.errors import UsageError
from lmscale.models import Bert, BertConfig, GPTConfig, build_model, flops_per_token

SPECIALS = {token: i for i, token in enumerate(BERT_SPECIALS)}  # as WordPiece training assigns them
PAD, CLS, SEP, MASK = SPECIALS["[PAD]"], SPECIALS["[CLS]"], SPECIALS["[SEP]"], SPECIALS["[MASK]"]


def tiny(**kw: object) -> Bert:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, seq_len=32, d_model=64, n_layers=2, n_heads=4, dropout=0.0, **kw)
    return Bert(cfg).eval()


def model_section(model: dict) -> object:
    return from_dict({"data": {"path": "data"}, "model": model}).model


def test_the_config_section_selects_the_family_and_names_bad_fields() -> None:
    assert isinstance(model_section({}), GPTConfig)
    bert = model_section({"family": "bert", "flavor": "pre_ln", "d_model": 64, "n_heads": 4})
    assert isinstance(bert, BertConfig) and bert.flavor == "pre_ln" and bert.norm_eps == 1e-12
    with pytest.raises(ConfigError, match=r"^model\.family: expected one of 'gpt' \| 'bert', got 't5'$"):
        model_section({"family": "t5"})
    with pytest.raises(ConfigError, match=r"^model\.n_kv_heads: unknown key"):
        model_section({"family": "bert", "n_kv_heads": 2})
    with pytest.raises(ConfigError, match=r"^model\.num_labels: must be 0 \(masked LM\) or at least 2"):
        model_section({"family": "bert", "num_labels": 1})


@pytest.mark.parametrize("flavor", ["post_ln", "pre_ln"])
def test_a_padded_position_changes_no_output_of_a_real_token(flavor: str) -> None:
    model = tiny(flavor=flavor)
    idx = torch.randint(5, 97, (2, 20))
    pad_mask = torch.ones(2, 20, dtype=torch.bool)
    pad_mask[0, 12:] = False
    other = idx.clone()
    other[0, 12:] = torch.randint(5, 97, (8,))  # only padded positions differ
    a, _ = model(idx, pad_mask=pad_mask)
    b, _ = model(other, pad_mask=pad_mask)
    torch.testing.assert_close(a[0, :12], b[0, :12])
    torch.testing.assert_close(a[1], b[1])
    # Attention is bidirectional: a later real token changes the outputs of earlier ones.
    later = idx.clone()
    later[1, 15] = (later[1, 15] + 1 - 5) % 92 + 5
    assert not torch.allclose(model(later, pad_mask=pad_mask)[0][1, :10], a[1, :10])


def test_the_masked_lm_loss_covers_the_masked_positions_only() -> None:
    model = tiny()
    idx = torch.randint(5, 97, (3, 16))
    targets = torch.full_like(idx, -100)
    targets[0, 3], targets[2, 7], targets[2, 9] = 11, 12, 13
    logits, loss = model(idx, targets)
    full, _ = model(idx)
    assert logits.shape == (3, 97)
    torch.testing.assert_close(logits, full[targets != -100])
    expected = torch.nn.functional.cross_entropy(full[targets != -100], torch.tensor([11, 12, 13]))
    torch.testing.assert_close(loss, expected)
    assert model.mlm_bias.shape == (97,) and not hasattr(model, "lm_head")
    loss.backward()
    assert model.tok_emb.weight.grad is not None  # the decoder is the embedding matrix (tied)


def test_the_classifier_reads_the_cls_token() -> None:
    model = tiny(num_labels=3)
    idx = torch.randint(5, 97, (4, 16))
    logits, loss = model(idx, torch.tensor([0, 1, 2, 1]))
    assert logits.shape == (4, 3) and loss is not None and not hasattr(model, "mlm_bias")


@pytest.mark.parametrize("extra", [{}, {"flavor": "pre_ln"}, {"num_labels": 4}], ids=["mlm", "pre_ln", "classifier"])
def test_flops_per_token_equals_what_pytorch_counts_in_a_training_step(extra: dict) -> None:
    """As for GPT: PyTorch's FLOP counter over a real step equals the MFU formula, here with the MLM head run on
    the masked positions only (counted by their share) or the classifier once per sequence."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = BertConfig(vocab_size=512, seq_len=64, d_model=64, n_layers=2, n_heads=4, **extra)
    model = build_model(cfg)
    idx = torch.randint(5, 512, (2, 64))
    if cfg.num_labels:
        targets, fraction = torch.tensor([1, 3]), 1.0
    else:
        targets = torch.full_like(idx, -100)
        targets[:, ::4] = idx[:, ::4]
        fraction = 0.25
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets, pad_mask=torch.ones_like(idx, dtype=torch.bool))
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, 64, fraction) * idx.numel())


def test_bert_base_has_bert_base_parameters() -> None:
    cfg = BertConfig(d_model=768, n_layers=12, n_heads=12, vocab_size=30522, seq_len=512)
    with torch.device("meta"):
        model = build_model(cfg)
    # BERT-base (Devlin et al.) with its MLM head: 110M in the encoder, plus the head's transform and bias.
    assert sum(p.numel() for p in model.parameters()) == 109_514_298


def test_masking_is_80_10_10_never_touches_special_tokens_and_repeats_per_position() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 1000, size=(64, 256))
    tokens[:, 0], tokens[:, -1], tokens[:, 100:110] = CLS, SEP, PAD
    collate = MaskedLMBatch(SPECIALS, 1000, 0.3, seed=7)
    batch = collate(tokens, range(5000, 5064))
    idx, targets = batch["idx"].numpy(), batch["targets"].numpy()
    chosen = targets != -100
    special = np.isin(tokens, list(SPECIALS.values()))
    assert not (chosen & special).any()
    assert (idx[special] == tokens[special]).all()
    assert (targets[chosen] == tokens[chosen]).all()
    assert chosen.sum() / (~special).sum() == pytest.approx(0.3, abs=0.01)
    masked = (idx == MASK) & chosen
    kept = (idx == tokens) & chosen
    replaced = chosen & ~masked & ~kept
    share = np.array([masked.sum(), replaced.sum(), kept.sum()]) / chosen.sum()
    # 80/10/10; a random replacement may draw the token itself (1 in 995), counted as kept.
    assert share == pytest.approx([0.8, 0.1, 0.1], abs=0.015)
    assert not np.isin(idx[replaced], list(SPECIALS.values())).any()
    assert (batch["pad_mask"].numpy() == (tokens != PAD)).all()
    # The masks are a function of the stream position: the same positions mask alike (a resume, another
    # world size), the next serving of the same sample (another position) differently.
    again = collate(tokens[10:20], range(5010, 5020))
    assert torch.equal(again["idx"], batch["idx"][10:20]) and torch.equal(again["targets"], batch["targets"][10:20])
    assert not torch.equal(collate(tokens[10:20], range(9010, 9020))["targets"], batch["targets"][10:20])


def test_mlm_shards_pack_documents_between_cls_and_sep(mlm_dataset: Path) -> None:
    manifest = read_manifest(mlm_dataset)
    assert manifest.format == "mlm" and manifest.sample_len == 64 and manifest.special_tokens == SPECIALS
    samples = np.concatenate(
        [read_shard(s, 64, manifest.np_dtype)[0] for s in split_shards(str(mlm_dataset), manifest, "train")]
    )
    assert (samples[:, 0] == CLS).all()
    lengths = (samples != PAD).sum(axis=1)
    assert (samples[np.arange(len(samples)), lengths - 1] == SEP).all()  # [SEP] closes each sample, then [PAD]
    assert all((row[n:] == PAD).all() and (row[:n] != PAD).all() for row, n in zip(samples, lengths, strict=True))
    assert (lengths == 64).mean() > 0.5  # packed, not one document per sample
    inner = [row[1 : n - 1] for row, n in zip(samples, lengths, strict=True)]
    assert any(SEP in piece for piece in inner)  # documents are separated inside a sample ...
    assert not any(((piece[:-1] == SEP) & (piece[1:] == SEP)).any() for piece in inner)  # ... by one [SEP]
    assert not any(piece[-1] == SEP for piece in inner if len(piece))
    assert manifest.splits["train"].tokens == (samples != PAD).sum()
    assert load_tokenizer(mlm_dataset / "tokenizer.json").token_to_id("[MASK]") == MASK


def test_mlm_samples_cover_every_token_of_the_document_stream() -> None:
    """Documents of 5, 2, 9 and 4 tokens, each ending in its [SEP] (stream positions 4, 6, 15, 19), cut into
    samples of up to 4 tokens: a [SEP] is dropped only where a sample ends on it, nothing else is lost."""
    ends = np.array([5, 7, 16, 20])
    table = DocTable(np.zeros(4, dtype=np.int64), ends - [5, 2, 9, 4], ends, np.concatenate([[0], ends]))
    starts, stops = mlm_pieces(table, 4)
    assert list(zip(starts.tolist(), stops.tolist(), strict=True)) == [(0, 4), (5, 9), (9, 13), (13, 17), (17, 19)]


def test_prepare_refuses_mlm_without_a_wordpiece_tokenizer(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^--format mlm: needs a WordPiece tokenizer"):
        prepare(PrepareOptions(inputs=[str(corpus_dir)], output=tmp_path / "x", format="mlm", in_process=True))
