"""Unlabelled text for backtranslation: the user's files, or text every machine with Python has
offline. Humpback's segments are web text that answers something; what fits here is prose an
instruction could have produced:
- `pydoc-topics` (the default): the help topics Python ships for `help()` (pydoc_data.topics: the
  Language and Library Reference's sections on statements, operators and built-in types), prose
  paragraphs only, each segment a section's opening paragraphs under the section's title, so that a
  paragraph says what it explains. Python's documentation is under the PSF License Version 2.
- `stdlib-docstrings`: the standard library's docstrings (read with `ast`, never imported: importing
  some stdlib modules has side effects). API text: a backward model asks for functions, and prose
  cannot answer that; kept as an option.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq

STDLIB = "stdlib-docstrings"
PYDOC_TOPICS = "pydoc-topics"
BUILTIN_CORPORA = {
    PYDOC_TOPICS: "the prose of the Python reference's help topics that ship with Python (PSF License)",
    STDLIB: "the Python standard library's docstrings (PSF License)",
}
_HEADING_RULE = re.compile(r"^[*=\-~^\"#]{3,}$")
# Paragraphs that are no answer to anything on their own: version notes, pointers, code and grammar,
# list items, the tail of a sentence a code block interrupted, text about a table or example not shown.
_NOT_PROSE = re.compile(
    r"^(Changed in version|New in version|Added in version|Deprecated since|See also|See |Note:|CPython "
    r"implementation detail|\d+\.|[a-z])|>>>|::=|\bdef |following (table|example|code)|[Tt]he table|^\W"
)
_EMPHASIS = re.compile(r"\*{1,2}(\w[^*\"]{0,60}?)\*{1,2}")  # reST *term* and **PEP 8**, as plain words


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


def _prose(block: str) -> str:
    """A paragraph as one line, or '' when it is not prose: indented (code, grammar, notes), a
    heading, a lead-in to a list or code (ends with ':'), or without a sentence's end."""
    lines = block.strip("\n").split("\n")
    if any(line.startswith((" ", "\t")) for line in lines) or _HEADING_RULE.match(lines[-1].strip()):
        return ""
    text = _EMPHASIS.sub(r"\1", re.sub(r"\s+", " ", re.sub(r"\s?\[\d+\]", "", block)).strip())  # no footnote marks
    if not text or _NOT_PROSE.search(text) or not text.endswith((".", "?", "!", ".)", '."')):
        return ""
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return text if letters >= 0.85 * len(text) else ""


def _sections(body: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of a help topic, split at its underlined titles."""
    lines = body.split("\n")
    sections, title, current = [], "", []
    for i, line in enumerate(lines):
        underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and _HEADING_RULE.match(underline) and len(underline) >= len(line.strip()) - 2:
            sections.append((title, current))
            title, current = line.strip(), []
        elif not _HEADING_RULE.match(line.strip()):
            current.append(line)
    sections.append((title, current))
    return [(t, re.split(r"\n\s*\n", "\n".join(c))) for t, c in sections]


def pydoc_topics(max_chars: int) -> list[str]:
    """Runs of consecutive prose paragraphs of each section of each help topic, as long as they fit in
    max_chars, each under its section's title (so that it says what it explains); code, a grammar or
    a list between two paragraphs ends a run. A run's paragraphs are joined by single newlines, so
    segment() keeps it whole."""
    from pydoc_data.topics import topics

    texts = []
    for _, body in sorted(topics.items()):
        for title, paragraphs in _sections(body):
            title = _EMPHASIS.sub(r"\1", title)
            head = title if not title or title.endswith((".", "?", "!")) else title + "."
            run = head
            for paragraph in [*map(_prose, paragraphs), ""]:
                if run != head and (not paragraph or len(run) + 1 + len(paragraph) > max_chars):
                    texts.append(run)
                    run = head
                if paragraph and len(run) + 1 + len(paragraph) <= max_chars:
                    run = f"{run}\n{paragraph}" if run else paragraph
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [str(r["text"]) for r in rows if isinstance(r, dict) and r.get("text")]
    return [path.read_text(encoding="utf-8")]


def load_segments(source: str | list[str], min_chars: int, max_chars: int) -> list[str]:
    """source: a name of BUILTIN_CORPORA, or text / JSONL ('text' field) / Parquet ('text' column) files."""
    if source == PYDOC_TOPICS:
        texts = pydoc_topics(max_chars)
    elif source == STDLIB:
        texts = stdlib_docstrings()
    else:
        texts = [t for p in ([source] if isinstance(source, str) else source) for t in _file_texts(Path(p))]
    seen, out = set(), []
    for text in texts:
        for piece in segment(text, min_chars, max_chars):
            if piece not in seen:
                seen.add(piece)
                out.append(piece)
    return out


def sample_segments(segments: list[str], n: int, seed: int) -> list[str]:
    return random.Random(seed).sample(segments, min(n, len(segments)))
