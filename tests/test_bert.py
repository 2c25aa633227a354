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
from lmscale.families import build_model, flops_per_token
from lmscale.models.bert import Bert, BertConfig
from lmscale.models.gpt import GPTConfig

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
    with pytest.raises(
        ConfigError, match=r"^model\.family: expected one of 'gpt' \| 'bert' \| 't5' \| 'rnn', got 'lstm'$"
    ):
        model_section({"family": "lstm"})
    with pytest.raises(ConfigError, match=r"^model\.n_kv_heads: unknown key"):
        model_section({"family": "bert", "n_kv_heads": 2})
    with pytest.raises(ConfigError, match=r"^model\.labels: none \(masked LM\) or at least 2 distinct classes"):
        model_section({"family": "bert", "labels": ["a", "a"]})


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
    predictions, loss = model(idx, targets)
    full, _ = model(idx)
    torch.testing.assert_close(predictions, full[targets != -100].argmax(-1))
    expected = torch.nn.functional.cross_entropy(full[targets != -100], torch.tensor([11, 12, 13]))
    torch.testing.assert_close(loss, expected)
    assert model.mlm_bias.shape == (97,) and not hasattr(model, "lm_head")
    loss.backward()
    assert model.tok_emb.weight.grad is not None  # the decoder is the embedding matrix (tied)


def test_the_classifier_reads_the_cls_token() -> None:
    model = tiny(labels=["a", "b", "c"])
    idx = torch.randint(5, 97, (4, 16))
    predictions, loss = model(idx, torch.tensor([0, 1, 2, 1]))
    logits, _ = model(idx)
    assert logits.shape == (4, 3) and loss is not None and not hasattr(model, "mlm_bias")
    torch.testing.assert_close(predictions, logits.argmax(-1))


@pytest.mark.parametrize(
    "extra", [{}, {"flavor": "pre_ln"}, {"labels": list("abcd")}], ids=["mlm", "pre_ln", "classifier"]
)
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
    with pytest.raises(
        UsageError, match=r"^--format mlm: needs a wordpiece tokenizer \(add --tokenizer-kind wordpiece\)"
    ):
        prepare(PrepareOptions(inputs=[str(corpus_dir)], output=tmp_path / "x", format="mlm", in_process=True))


@pytest.mark.parametrize("labels", [[], ["fiction", "reference", "code"]], ids=["masked_lm", "classifier"])
def test_both_heads_export_to_transformers_and_load_back(labels: list[str], mlm_dataset: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, pipeline

    from lmscale.export.export import check_parity, write_hf_dir
    from lmscale.hf.directory import load_hf_model

    torch.manual_seed(0)
    model = build_model(BertConfig(vocab_size=600, seq_len=64, d_model=64, n_layers=2, n_heads=4, labels=labels))
    with torch.no_grad():
        for p in model.parameters():  # weights far from their initial values, so a wrong key or norm shows
            p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path / "export"
    architecture = write_hf_dir(model, mlm_dataset / "tokenizer.json", out, "fp32", "5GB")
    assert architecture == ("BertForSequenceClassification" if labels else "BertForMaskedLM")
    diff, tol = check_parity(model, out, "fp32")
    assert diff <= tol, (diff, tol)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "bert" and config.pad_token_id == PAD
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.cls_token, tok.sep_token, tok.pad_token, tok.mask_token, tok.unk_token) == (
        "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"
    )  # fmt: skip
    ids = tok("the first line", "and the second")
    assert ids["input_ids"][0] == CLS and ids["input_ids"].count(SEP) == 2 and ids["token_type_ids"][-1] == 1
    reloaded, _ = load_hf_model(out)
    batch = {"idx": torch.tensor([ids["input_ids"]]), "token_type_ids": torch.tensor([ids["token_type_ids"]])}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch)[0], model.eval()(**batch)[0])
    if labels:
        assert config.id2label == dict(enumerate(labels)) and config.label2id == {n: i for i, n in enumerate(labels)}
        (prediction,) = pipeline("text-classification", model=str(out))("a sentence to classify")
        assert prediction["label"] in labels and 0.0 < prediction["score"] <= 1.0
    else:
        filled = pipeline("fill-mask", model=str(out), top_k=3)("the [MASK] of the function")
        assert len(filled) == 3 and all(f["sequence"].endswith(" of the function") for f in filled)


def test_a_pre_ln_bert_is_refused_by_export_in_one_line(mlm_dataset: Path, tmp_path: Path) -> None:
    from lmscale.errors import LmscaleError
    from lmscale.export.export import write_hf_dir

    model = build_model(BertConfig(vocab_size=600, seq_len=64, d_model=64, n_layers=2, n_heads=4, flavor="pre_ln"))
    with pytest.raises(LmscaleError, match=r"^model\.flavor pre_ln: transformers has no BERT class"):
        write_hf_dir(model, mlm_dataset / "tokenizer.json", tmp_path / "x", "fp32", "5GB")


def test_labelled_files_are_read_and_their_faults_named_in_one_line(tmp_path: Path) -> None:
    from lmscale.data.labelled import Fields, encode_examples, label_names, read_examples

    fields = Fields()
    good = tmp_path / "good.csv"
    good.write_text('text,label\n"a first, quoted\ntext",2\nsecond,10\nthird,2\n')
    examples = read_examples(good, fields, "finetune.train")
    assert examples.texts[0] == "a first, quoted\ntext" and examples.labels == ["2", "10", "2"]
    assert examples.lines == [3, 4, 5] and examples.pairs is None
    assert label_names(examples.labels) == ["2", "10"]  # numeric labels by value, not as strings
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "a", "text_pair": "b", "label": "yes"}\n\n{"text": "c", "text_pair": "d", "label": 1}\n')
    assert read_examples(pairs, fields, "finetune.train").pairs == ["b", "d"]
    cases = {
        "missing.csv": (None, r"^finetune\.train: .*missing\.csv: file not found$"),
        "empty.csv": ("text,label\n", r"^finetune\.train: .*empty\.csv: no examples$"),
        "blank.jsonl": ("\n\n", r"^finetune\.train: .*blank\.jsonl: no examples$"),
        "columns.csv": ("body,label\nx,1\n", r"^.*columns\.csv: no column 'text' \(its columns: body, label\)$"),
        "nolabel.jsonl": ('{"text": "x", "label": 1}\n{"text": "y"}\n', r"^.*nolabel\.jsonl:2: no 'label'$"),
        "broken.jsonl": ('{"text": "x", "label": 1}\n{"text": \n', r"^.*broken\.jsonl:2: not valid JSON$"),
        "data.txt": ("x\n", r"^.*data\.txt: expected a \.csv or \.jsonl file$"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(UsageError, match=message):
            read_examples(tmp_path / name, fields, "finetune.train")
    unknown = tmp_path / "validation.jsonl"
    unknown.write_text('{"text": "x", "label": 2}\n{"text": "y", "label": 3}\n')
    with pytest.raises(
        UsageError, match=r"validation\.jsonl:2: label '3' is not one of the training labels \(2, 10\)$"
    ):
        encode_examples(read_examples(unknown, fields, "finetune.validation"), Path("unused"), ["2", "10"], 16)


def test_classification_rows_hold_the_label_the_pair_and_its_token_types(mlm_dataset: Path, tmp_path: Path) -> None:
    from lmscale.data.collate import ClassificationBatch
    from lmscale.data.labelled import Fields, read_examples, write_task_dataset

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "return the value", "text_pair": "of the object", "label": "b"}\n'
                     '{"text": "a much longer first text than the others", "text_pair": "x", "label": "a"}\n')  # fmt: skip
    manifest = write_task_dataset(tmp_path / "task", mlm_dataset / "tokenizer.json",
                                  read_examples(train, Fields(), "finetune.train"), None, 8)  # fmt: skip
    assert manifest.format == "classification" and manifest.labels == ["a", "b"] and manifest.sample_len == 17
    rows = read_shard(split_shards(str(tmp_path / "task"), manifest, "train")[0], 17, manifest.np_dtype)[0]
    batch = ClassificationBatch(PAD, 8, examples=1)(rows, [0, 1])
    assert batch["targets"].tolist() == [1, -100]  # the second position is past the scored examples
    ids, types = batch["idx"][0].tolist(), batch["token_type_ids"][0].tolist()
    assert ids[0] == CLS and ids.count(SEP) == 2 and batch["pad_mask"][0].all()  # truncated to 8 tokens exactly
    assert types == [0] * (ids.index(SEP) + 1) + [1] * (7 - ids.index(SEP))
