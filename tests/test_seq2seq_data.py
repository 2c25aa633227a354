"""Source/target pairs as a prepared dataset (``lmscale.data.seq2seq``), its collator, and decoding that waits
for the other ranks: no DeepSpeed here (the fine-tuning runs are in test_t5_finetune.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscale.data.collate import Seq2SeqBatch
from lmscale.data.manifest import read_manifest
from lmscale.data.seq2seq import encoded, read_pairs, read_references, write_pairs_dataset
from lmscale.data.stream import read_shard, split_shards
from lmscale.data.tokenizer import T5_EOS, T5_PAD, load_tokenizer
from lmscale.errors import UsageError
from lmscale.models.seq2seq_search import beam_search, greedy
from lmscale.models.t5 import T5, T5Config

PAIRS = [("Open the file", "Datei öffnen"), ("Cannot read the configuration", "Konfiguration kann nicht gelesen werden"),
         ("Done", "Fertig"), ("Write the list of modules", "Die Liste der Module schreiben")]  # fmt: skip


def write_pairs(path: Path, pairs: list[tuple[str, str]], source: str = "source", target: str = "target") -> Path:
    path.write_text("".join(json.dumps({source: s, target: t}, ensure_ascii=False) + "\n" for s, t in pairs))
    return path


def test_pairs_are_stored_whole_and_collated_to_the_longest_of_the_batch(t5_dataset: Path, tmp_path: Path) -> None:
    tokenizer = t5_dataset / "tokenizer.json"
    train = read_pairs(write_pairs(tmp_path / "train.jsonl", PAIRS), "source", "target", "finetune.train")
    validation = read_pairs(write_pairs(tmp_path / "val.jsonl", PAIRS[:3]), "source", "target", "finetune.validation")
    out = tmp_path / "data"
    write_pairs_dataset(out, tokenizer, train, validation, 24, 32)
    manifest = read_manifest(out)
    assert (manifest.format, manifest.seq_len, manifest.target_len, manifest.sample_len) == ("seq2seq", 24, 32, 59)
    assert read_references(out) == [t for _, t in PAIRS[:3]]
    rows, _ = read_shard(split_shards(str(out), manifest, "train")[0], manifest.sample_len, manifest.np_dtype)
    sources, targets = encoded(tokenizer, [s for s, _ in PAIRS]), encoded(tokenizer, [t for _, t in PAIRS])
    tok = load_tokenizer(tokenizer)
    eos, pad = tok.token_to_id(T5_EOS), tok.token_to_id(T5_PAD)
    assert all(ids[-1] == eos for ids in sources + targets)
    assert manifest.splits["train"].tokens == sum(map(len, sources + targets))

    batch = Seq2SeqBatch(24, 32, pad)(rows, range(4))
    assert set(batch) == {"idx", "pad_mask", "targets"}
    assert batch["idx"].shape == (4, max(map(len, sources))) and batch["targets"].shape == (4, max(map(len, targets)))
    for row, (source, target) in enumerate(zip(sources, targets, strict=True)):
        assert batch["idx"][row][batch["pad_mask"][row]].tolist() == source
        assert batch["targets"][row][batch["targets"][row] != -100].tolist() == target
        assert tok.decode(target, skip_special_tokens=True) == tok.decode(tok.encode(PAIRS[row][1]).ids)

    # Validation: each row names its pair; the repeats filling the last micro-batch score nothing.
    val_rows, _ = read_shard(split_shards(str(out), manifest, "validation")[0], manifest.sample_len,
                             manifest.np_dtype)  # fmt: skip
    filled = np.concatenate([val_rows, val_rows[:1]])
    scored = Seq2SeqBatch(24, 32, pad, examples=3)(filled, range(4))
    assert scored["example_ids"].tolist() == [0, 1, 2, -1]
    assert (scored["targets"][3] == -100).all() and (scored["targets"][:3] != -100).any(dim=1).all()


def test_every_bad_pair_is_one_line_naming_its_file_and_line(t5_dataset: Path, tmp_path: Path) -> None:
    tokenizer = t5_dataset / "tokenizer.json"

    def fault(name: str, text: str, seq_len: int = 64, target_len: int = 64) -> str:
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError) as raised:
            pairs = read_pairs(tmp_path / name, "source", "target", "finetune.train")
            write_pairs_dataset(tmp_path / "out", tokenizer, pairs, None, seq_len, target_len)
        return str(raised.value)

    path = tmp_path / "p.jsonl"
    assert fault("p.jsonl", '{"source": "a b", "target": "c"}\n{"source": "d"}\n') == f"{path}:2: no 'target'"
    assert fault("p.jsonl", '{"source": "a", "target": ""}\n') == f"{path}:1: 'target' is empty"
    assert fault("p.jsonl", '{"source": "a", "target": "b"}\n[1, 2]\n') == (
        f"{path}:2: expected an object with 'source' and 'target'"
    )
    long = "Return the list of all the modules in the path " * 3
    assert fault("p.jsonl", json.dumps({"source": "ok", "target": "ok"}) + "\n" +
                 json.dumps({"source": long, "target": "kurz"}) + "\n", seq_len=16).startswith(
        f"{path}:2: the source is "
    )  # fmt: skip
    assert fault("p.jsonl", json.dumps({"source": "kurz", "target": long}) + "\n", target_len=16).endswith(
        "more than finetune.max_target_length=16 (raise it, or leave the pair out)"
    )
    csv_path = tmp_path / "p.csv"
    assert (
        fault("p.csv", "source,translation\na,b\n")
        == f"{csv_path}: no column 'target' (its columns: source, translation)"
    )
    renamed = read_pairs(write_pairs(tmp_path / "r.jsonl", PAIRS, "en", "de"), "en", "de", "finetune.train")
    assert renamed.targets[0] == "Datei öffnen" and renamed.lines == [1, 2, 3, 4]


class CountingT5(T5):
    """A T5 that counts its decoder's forward passes (what ZeRO-3 gathers the parameters for)."""

    decodes = 0

    def decode(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.decodes += 1
        return super().decode(*args, **kwargs)  # type: ignore[arg-type]


def others_need(steps: int) -> object:
    """``agree`` as the other ranks would answer it if one of them needed ``steps`` decoder steps."""
    calls: list[bool] = []

    def agree(done: bool) -> bool:
        calls.append(done)
        return done and len(calls) >= steps

    return agree


@pytest.mark.parametrize("beams", [1, 3])
def test_a_rank_that_finished_steps_on_with_the_others_and_writes_the_same_outputs(beams: int) -> None:
    """Decoding with ``agree``: a rank done early keeps running decoder steps until every rank is done, and its
    outputs do not change."""
    torch.manual_seed(5)
    model = CountingT5(T5Config(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64, decoder_start_id=0)).eval()
    with torch.no_grad():
        assert model.lm_head is not None
        model.lm_head.weight[1] *= 8.0  # end of sequence (id 1) likely: this rank is done after a few steps
    inputs = [[5, 6, 7, 1], [8, 9, 1]]

    def run(**agree: object) -> tuple[object, int]:
        model.decodes = 0
        if beams == 1:
            return greedy(model, inputs, 20, 1, 0, **agree), model.decodes  # type: ignore[arg-type]
        return beam_search(model, inputs[0], beams, 20, 1, 0, **agree), model.decodes  # type: ignore[arg-type]

    alone, alone_steps = run()
    assert 0 < alone_steps < 12
    together, together_steps = run(agree=others_need(12))
    assert together == alone and together_steps == 12
    assert run(agree=others_need(30)) == (alone, 20)  # never past the budget
