"""Exact ROUGE-L F-measure, the same float as rouge-score's, computed fast.

rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False) lower-cases, keeps runs of
[a-z0-9] as tokens, and scores F = 2*p*r/(p+r) with p = LCS/len(prediction), r = LCS/len(target).
We tokenize the same way, map each distinct token to one character, and let rapidfuzz's bit-parallel
LCS count the longest common subsequence; F is then computed with rouge-score's exact float
expression (not the algebraically equal 2*LCS/(la+lb), which differs in the last bit at ties and so
flips decisions at the 0.7 boundary).
"""

from __future__ import annotations

import re

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def tokenize(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming, step for step (lower() first: 'İ' becomes 'i̇')."""
    text = _NON_ALPHANUM.sub(" ", text.lower())
    return [t for t in _SPACES.split(text) if _VALID_TOKEN.match(t)]


def f_measure(lcs: int, len_prediction: int, len_target: int) -> float:
    """rouge-score's _score_lcs + scoring.fmeasure, the same operations in the same order."""
    if not len_prediction or not len_target:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def f_measure_array(lcs: np.ndarray, len_prediction: int, len_targets: np.ndarray) -> np.ndarray:
    """Vectorized f_measure; float64 division and multiplication round exactly like Python floats."""
    lcs = lcs.astype(np.float64)
    len_targets = len_targets.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / np.float64(len_prediction) if len_prediction else np.zeros_like(lcs)
        recall = np.where(len_targets > 0, lcs / np.where(len_targets > 0, len_targets, 1), 0.0)
        denominator = precision + recall
        f = np.where(denominator > 0, 2 * precision * recall / np.where(denominator > 0, denominator, 1), 0.0)
    return f


class _TokenAlphabet:
    """Maps each distinct token to one Unicode character so LCS over tokens is LCS over strings."""

    def __init__(self) -> None:
        self._codes: dict[str, str] = {}

    def encode(self, tokens: list[str]) -> str:
        chars = []
        for token in tokens:
            code = self._codes.get(token)
            if code is None:
                n = len(self._codes)
                # Skip the surrogate block, which Python strings may hold but rapidfuzz may not like.
                code = chr(n + 1 if n + 1 < 0xD800 else n + 1 + 0x800)
                self._codes[token] = code
            chars.append(code)
        return "".join(chars)


def rouge_l(prediction: str, target: str) -> float:
    alphabet = _TokenAlphabet()
    a, b = alphabet.encode(tokenize(prediction)), alphabet.encode(tokenize(target))
    return f_measure(LCSseq.similarity(a, b) if a and b else 0, len(a), len(b))


class NoveltyIndex:
    """A growing pool of instructions; answers 'how close is this text to anything pooled?'.

    The pool is tokenized once, as it grows. Candidates whose token length makes F >= threshold
    impossible against a pool entry skip that entry (F <= 2*min(la,lb)/(la+lb)).
    """

    def __init__(self, texts: list[str] | None = None) -> None:
        self._alphabet = _TokenAlphabet()
        self.texts: list[str] = []
        self._encoded: list[str] = []
        self._lengths: list[int] = []
        for text in texts or []:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        encoded = self._alphabet.encode(tokenize(text))
        self.texts.append(text)
        self._encoded.append(encoded)
        self._lengths.append(len(encoded))

    def nearest(self, text: str) -> tuple[float, int]:
        """(max ROUGE-L F against the pool, index of the nearest pool text or -1)."""
        encoded = self._alphabet.encode(tokenize(text))
        if not self._encoded or not encoded:
            return 0.0, -1
        lcs = process.cdist([encoded], self._encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
        scores = f_measure_array(lcs, len(encoded), np.asarray(self._lengths))
        best = int(np.argmax(scores))
        return float(scores[best]), best

    def filter_in_order(self, candidates: list[str], threshold: float, inclusive: bool = True) -> list[tuple[bool, float, int]]:
        """Self-Instruct's novelty rule, candidates in order: keep one only if its F with every pooled
        text (kept candidates included) is below threshold (inclusive=True: drop F >= threshold, the
        paper's '< 0.7'; False: drop only F > threshold, as the reference code does). Kept texts join
        the pool. Returns (kept, max F, nearest index) per candidate.
        """
        results = []
        for text in candidates:
            score, nearest = self.nearest(text)
            rejected = score >= threshold if inclusive else score > threshold
            if not rejected:
                self.add(text)
            results.append((not rejected, score, nearest))
        return results
