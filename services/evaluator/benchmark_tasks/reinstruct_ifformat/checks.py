"""The checking code of reinstruct_ifformat: each prompt of prompts.jsonl names its checks, and a response
passes a check or not by these rules alone (strict, as IFEval's strict mode; an empty response passes
none). lm-eval loads this file by path (the task YAML's `!function`); it imports nothing of reinstruct.

Checks (`kind` and its arguments):
- lowercase / uppercase: the response has letters, and none of the other case
- bullets (n): exactly n lines are markdown bullets ("* ", "- " or "• " at the line's start)
- numbered (n): exactly n lines are numbered items ("1. ", "2) ", ...)
- paragraphs (n): exactly n paragraphs, separated by blank lines
- include (word) / exclude (word): the word appears / does not appear as a whole word (any case)
- keyword_count (word, n): the word appears at least n times as a whole word (any case)
- starts_with (phrase) / ends_with (phrase): the response, stripped of spaces and quotes (and, at the
  start, of markdown markers), starts / ends with the phrase (any case; runs of white space count as
  one space), and a phrase that ends in a letter or digit ends a word there ("The" is not "There")
- no_commas: no comma anywhere
- max_words (n) / min_words (n): at most / at least n words (runs of letters, digits, underscores)
- json (keys): the response is a JSON object holding every key named (a ``` fence around it is
  allowed); without keys, any JSON object or array
- quoted: the response is wrapped in double quotation marks
- title: the response holds a title in double angular brackets, <<like this>>
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPTS = Path(__file__).with_name("prompts.jsonl")

# [ \t], not \s: a lone "-" line followed by text on the next line is not a bullet
_BULLET = re.compile(r"^[ \t]*(?:[*\-•])[ \t]+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^[ \t]*\d+[.)][ \t]+\S", re.MULTILINE)
_WORD = re.compile(r"\w+")
_TITLE = re.compile(r"<<[^\n<>]+>>")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _occurrences(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE))


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _is_json(text: str, keys: list[str] | None = None) -> bool:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if keys:
        return isinstance(value, dict) and all(key in value for key in keys)
    return isinstance(value, (dict, list))


def _quoted(text: str) -> bool:
    text = text.strip()
    return len(text) >= 2 and text[0] in '"“' and text[-1] in '"”'


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def _starts_with(text: str, phrase: str) -> bool:
    body, phrase = _flat(text.strip().lstrip("\"'“‘*#> \n\t")), _flat(phrase)
    if not body.startswith(phrase):
        return False
    # a phrase ending in a letter or digit must end a word of the response too
    rest = body[len(phrase) :]
    return not (phrase[-1:].isalnum() and rest[:1].isalnum())


def _ends_with(text: str, phrase: str) -> bool:
    return _flat(text.strip().rstrip("\"'”’ \n\t")).endswith(_flat(phrase))


def _paragraphs(text: str) -> int:
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()])


CHECKS: dict[str, Callable[..., bool]] = {
    "lowercase": lambda text: _has_letters(text) and text == text.lower(),
    "uppercase": lambda text: _has_letters(text) and text == text.upper(),
    "bullets": lambda text, n: len(_BULLET.findall(text)) == n,
    "numbered": lambda text, n: len(_NUMBERED.findall(text)) == n,
    "paragraphs": lambda text, n: _paragraphs(text) == n,
    "include": lambda text, word: _occurrences(text, word) > 0,
    "exclude": lambda text, word: _occurrences(text, word) == 0,
    "keyword_count": lambda text, word, n: _occurrences(text, word) >= n,
    "starts_with": _starts_with,
    "ends_with": _ends_with,
    "no_commas": lambda text: "," not in text,
    "max_words": lambda text, n: _words(text) <= n,
    "min_words": lambda text, n: _words(text) >= n,
    "json": _is_json,
    "quoted": _quoted,
    "title": lambda text: _TITLE.search(text) is not None,
}


def passes(check: dict[str, Any], response: str) -> bool:
    """Whether the response passes one check ({"kind": ..., its arguments})."""
    if not response.strip():
        return False
    arguments = {k: v for k, v in check.items() if k != "kind"}
    return bool(CHECKS[check["kind"]](response, **arguments))


def score(checks: list[dict[str, Any]], response: str) -> dict[str, float]:
    """prompt_acc: every check passed (1.0 or 0.0); check_acc: the share of checks passed."""
    passed = [passes(c, response) for c in checks]
    return {"prompt_acc": float(all(passed)), "check_acc": sum(passed) / len(passed)}


def load_prompts(path: Path = PROMPTS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- what the task YAML names ----------------------------------------------------------------------
def load_dataset(**_metadata) -> dict:
    """The task's data from prompts.jsonl (lm-eval passes its metadata; none is needed). The checks
    travel as a JSON string: one column type whatever arguments a check takes."""
    import datasets

    rows = [{"id": p["id"], "prompt": p["prompt"], "checks": json.dumps(p["checks"])} for p in load_prompts()]
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return score(json.loads(doc["checks"]), results[0])
