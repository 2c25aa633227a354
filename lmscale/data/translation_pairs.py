"""A translation corpus from what a Debian machine already has: the gettext catalogs of its programs
(``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``), English messages with their human translations.

Each catalog is read with the standard library's ``gettext``. A pair is kept when both sides read as text:
one line, 2 to ``MAX_WORDS`` words, mostly letters once format directives (``%s``, ``%1$d``, ``%(name)s``,
``{0}``) are set aside, and not an option table's row. Catalogs, not messages, are dealt to train and
validation (by a hash of the catalog's name), so that no program's messages are on both sides, and a
validation pair whose English also occurs in a training catalog is dropped: nothing to translate is seen in
training.
"""

from __future__ import annotations

import gettext
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmscale.errors import UsageError, one_line

log = logging.getLogger(__name__)

LOCALE_DIR = Path("/usr/share/locale")
MAX_WORDS = 40
FORMAT_DIRECTIVE = re.compile(r"%(\d+\$)?(\([^)]*\))?[-+ #0']*\d*(\.\d+)?[hlLqjzt]*[a-zA-Z%]|\{[^{}]*\}")


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    catalog: str


def catalog_messages(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a compiled catalog (the singular of plural messages). ``GNUTranslations`` has no
    public listing of its messages: ``_catalog`` is the dictionary it keeps them in
    (tests/test_private_apis.py fails if the name disappears)."""
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
    messages = {}
    for key, value in catalog.items():
        msgid, form = key if isinstance(key, tuple) else (key, 0)
        if form == 0 and msgid and isinstance(value, str):
            messages[msgid] = value
    return messages


def reads_as_text(message: str) -> bool:
    if "\n" in message.strip() or message.lstrip().startswith("-"):
        return False
    words = message.split()
    if not 2 <= len(words) <= MAX_WORDS:
        return False
    plain = FORMAT_DIRECTIVE.sub("", message)
    letters = sum(ch.isalpha() for ch in plain)
    return letters >= 0.6 * len(plain.replace(" ", "")) and letters >= 4


def normalised(message: str) -> str:
    return " ".join(message.split())


def is_validation(catalog: str, validation_percent: int) -> bool:
    return int(hashlib.sha256(catalog.encode()).hexdigest(), 16) % 100 < validation_percent


def language_pairs(lang: str, locale_dir: Path = LOCALE_DIR, validation_percent: int = 10) -> dict[str, list[Pair]]:
    """The kept pairs of every catalog of ``lang``, split into ``train`` and ``validation`` by catalog."""
    folder = locale_dir / lang / "LC_MESSAGES"
    catalogs = sorted(folder.glob("*.mo"))
    if not catalogs:
        counts = Counter(p.parent.parent.name for p in locale_dir.glob("*/LC_MESSAGES/*.mo"))
        most = ", ".join(f"{name} ({n})" for name, n in counts.most_common(8)) or "none"
        raise UsageError(f"{folder}: no gettext catalogs (the most catalogs here: {most})")
    splits: dict[str, list[Pair]] = {"train": [], "validation": []}
    for path in catalogs:
        split = "validation" if is_validation(path.stem, validation_percent) else "train"
        try:
            messages = catalog_messages(path)
        except (OSError, UnicodeDecodeError, ValueError) as err:  # a catalog in a legacy charset, or damaged
            log.warning("skipped %s: %s", path, one_line(err))
            continue
        for source, target in messages.items():
            if reads_as_text(source) and reads_as_text(target) and normalised(source) != normalised(target):
                splits[split].append(Pair(normalised(source), normalised(target), path.stem))
    seen = {pair.source for pair in splits["train"]}
    splits["validation"] = [pair for pair in splits["validation"] if pair.source not in seen]
    for name, pairs in splits.items():
        unique = {(pair.source, pair.target): pair for pair in pairs}  # a message repeated within the split
        splits[name] = list(unique.values())
    return splits


def write_pairs(splits: dict[str, list[Pair]], output: Path) -> dict[str, int]:
    """``output/train.jsonl`` and ``output/validation.jsonl``, rows ``{"source", "target", "catalog"}``."""
    output.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        with open(output / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(vars(pair), ensure_ascii=False) + "\n" for pair in pairs)
    return {name: len(pairs) for name, pairs in splits.items()}
