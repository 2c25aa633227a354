"""Translation pairs from this machine's gettext catalogs (``lmscale.data.translation_pairs``)."""

from __future__ import annotations

import json
from pathlib import Path

from lmscale.data.translation_pairs import LOCALE_DIR, language_pairs, reads_as_text

from .conftest import error_lines, run_cli


def test_german_pairs_are_many_held_out_by_catalog_and_read_as_text() -> None:
    splits = language_pairs("de")
    train, validation = splits["train"], splits["validation"]
    assert len(train) > 10_000 and len(validation) > 500
    # No program's messages on both sides, and no English of the validation split seen in training.
    assert not {p.catalog for p in train} & {p.catalog for p in validation}
    assert not {p.source for p in train} & {p.source for p in validation}
    for pair in [*train[::97], *validation[::17]]:
        assert "\n" not in pair.source and 2 <= len(pair.source.split()) <= 40 and pair.source != pair.target
        assert (LOCALE_DIR / "de" / "LC_MESSAGES" / f"{pair.catalog}.mo").is_file()
    # The same catalogs go to validation every time: the split is a function of their names.
    assert {p.catalog for p in language_pairs("de")["validation"]} == {p.catalog for p in validation}


def test_format_only_one_word_and_option_table_messages_are_dropped() -> None:
    kept = ["Cannot open the file %s for reading", "Vertical adjustment", "user %s has no home directory"]
    dropped = ["%s: %s", "Quit", "%d of %d", "  -a, --all    show everything", "line one\nline two", "{0} {1}"]
    assert all(reads_as_text(m) for m in kept) and not any(reads_as_text(m) for m in dropped)


def test_the_command_writes_jsonl_splits_and_names_a_missing_language(tmp_path: Path) -> None:
    result = run_cli("data", "pairs", "--lang", "fr", "--output", str(tmp_path / "fr"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "fr" / "validation.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]) == {"source", "target", "catalog"}
    assert f"wrote {tmp_path / 'fr' / 'train.jsonl'}: " in result.stdout
    missing = run_cli("data", "pairs", "--lang", "xx", "--output", str(tmp_path / "xx"))
    assert missing.returncode == 2
    assert error_lines(missing.stderr)[0].startswith(f"lmscale: error: {LOCALE_DIR}/xx/LC_MESSAGES: no gettext")
