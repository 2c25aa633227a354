"""A small real English corpus built from what every Python installation carries: the standard library's
docstrings. No download: the demo and the tests run on machines without network access.
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from pathlib import Path


def stdlib_docstrings(max_bytes: int, modules: tuple[str, ...] = ()) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed (sorted) file order; only of
    the top-level ``modules`` (packages or modules, e.g. ``("asyncio", "threading")``) when given."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    size = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:] or path.name.startswith("test"):
            continue
        if modules and path.relative_to(root).parts[0].removesuffix(".py") not in modules:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 60:
                    documents.append(doc)
                    size += len(doc.encode("utf-8"))
                    if size >= max_bytes:
                        return documents
    return documents


def prose_paragraphs(docstrings: list[str], min_chars: int = 60) -> list[str]:
    """The paragraphs of running text in ``docstrings``, each on one line: docstrings wrap their lines at ~72
    columns and hold indented code and doctests, which a small model spends its first steps learning (its
    samples are then mostly newlines and indentation)."""
    paragraphs = []
    for doc in docstrings:
        for paragraph in re.split(r"\n\s*\n", doc):
            lines = paragraph.splitlines()
            if lines and not any(line.startswith((" ", "\t", ">>>")) for line in lines):
                text = " ".join(line.strip() for line in lines)
                if len(text) >= min_chars:
                    paragraphs.append(text)
    return paragraphs


def write_demo_corpus(output_dir: Path, max_bytes: int = 4_000_000, files: int = 4, prose: bool = False) -> list[Path]:
    """Write the docstrings as ``files`` JSONL files (several, so Ray has parallel work); with ``prose``, their
    paragraphs of running text, one document each."""
    documents = stdlib_docstrings(max_bytes)
    if prose:
        documents = prose_paragraphs(documents)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = output_dir / f"stdlib-docs-{i}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for doc in documents[i::files]:
                f.write(json.dumps({"text": doc}) + "\n")
        paths.append(path)
    return paths
