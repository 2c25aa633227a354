from pathlib import Path

from lmscale.data.tokenizer import end_token_id, load_tokenizer, tokenizer_kind, train_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Packing keeps every token exactly once."] * 50


def test_bpe_round_trips_bytes_and_ends_documents_with_eot(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, 300, "bpe")
    text = "The lazy fox, café ☕"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: nothing is unknown
    assert tok.id_to_token(end_token_id(tok)) == "<|endoftext|>" and tokenizer_kind(tok) == "bpe"
    tok.save(str(tmp_path / "t.json"))
    assert load_tokenizer(tmp_path / "t.json").encode(text).ids == tok.encode(text).ids


def test_wordpiece_for_bert_uses_sep_as_document_end() -> None:
    tok = train_tokenizer(TEXTS, 200, "wordpiece")
    assert tokenizer_kind(tok) == "wordpiece"
    assert tok.id_to_token(end_token_id(tok)) == "[SEP]"
    assert tok.token_to_id("[MASK]") is not None
    assert tok.decode(tok.encode("the quick fox", add_special_tokens=False).ids) == "the quick fox"
