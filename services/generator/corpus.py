"""Unlabelled text for backtranslation: the user's files, or the Python standard library's docstrings,
which every machine with Python has offline (read with `ast`, never imported: importing some stdlib
modules has side effects)."""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq

STDLIB = "stdlib-docstrings"


def segment(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Paragraphs (blank-line separated) of a usable length, whitespace collapsed."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if min_chars <= len(p) <= max_chars]


def stdlib_docstrings(limit_files: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    texts = []
    for path in files[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [str(r["text"]) for r in rows if isinstance(r, dict) and r.get("text")]
    return [path.read_text(encoding="utf-8")]


def load_segments(source: str | list[str], min_chars: int, max_chars: int) -> list[str]:
    """source: 'stdlib-docstrings', or text / JSONL ('text' field) / Parquet ('text' column) files."""
    texts = (
        stdlib_docstrings()
        if source == STDLIB
        else [t for p in ([source] if isinstance(source, str) else source) for t in _file_texts(Path(p))]
    )
    seen, out = set(), []
    for text in texts:
        for piece in segment(text, min_chars, max_chars):
            if piece not in seen:
                seen.add(piece)
                out.append(piece)
    return out


def sample_segments(segments: list[str], n: int, seed: int) -> list[str]:
    return random.Random(seed).sample(segments, min(n, len(segments)))
