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


class _Growable:
    """An int32 array that appends in amortized O(1) (postings grow with the pool)."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.resize(self.data, 2 * len(self.data))
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class NoveltyIndex:
    """A growing pool of instructions; answers 'what is the max ROUGE-L F of this text against the
    pool, and which pool text gives it?' exactly, without comparing against most of the pool.

    An inverted index (token -> pool entries, with counts) gives each pool entry's shared-token count
    with the candidate, an upper bound on their LCS; F <= 2*shared/(la+lb) then bounds F. Exact LCS
    (rapidfuzz, bit-parallel) is computed only for entries whose bound can still beat the best F found
    so far, best bounds first. Entries that share no token have F = 0 and are never looked at.
    """

    _SLACK = 1e-9  # bounds are compared with this margin so float rounding can never prune a winner

    def __init__(self, texts: list[str] | None = None) -> None:
        self._alphabet = _TokenAlphabet()
        self.texts: list[str] = []
        self._encoded: list[str] = []
        self._lengths = _Growable()
        self._postings: dict[str, tuple[_Growable, _Growable]] = {}
        for text in texts or []:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def token_count(self) -> int:
        """Tokens in the whole pool (a request's worst-case work is its tokens times these)."""
        return int(self._lengths.view().sum())

    def add(self, text: str) -> None:
        encoded = self._alphabet.encode(tokenize(text))
        index = len(self.texts)
        self.texts.append(text)
        self._encoded.append(encoded)
        self._lengths.append(len(encoded))
        for char, count in _char_counts(encoded).items():
            postings = self._postings.get(char)
            if postings is None:
                postings = self._postings[char] = (_Growable(), _Growable())
            postings[0].append(index)
            postings[1].append(count)

    def _shared_counts(self, encoded: str) -> np.ndarray:
        shared = np.zeros(len(self.texts), dtype=np.int32)
        for char, count in _char_counts(encoded).items():
            postings = self._postings.get(char)
            if postings is not None:
                ids = postings[0].view()
                shared[ids] += 1 if count == 1 else np.minimum(postings[1].view(), count)
        return shared

    def nearest(self, text: str, stop_at: float | None = None) -> tuple[float, int]:
        """(max ROUGE-L F against the pool, index of the nearest pool text or -1 if none shares a token).

        stop_at: return as soon as an F >= stop_at is found (enough for a reject decision); the
        score returned is then a lower bound of the max.
        """
        encoded = self._alphabet.encode(tokenize(text))
        if not self.texts or not encoded:
            return 0.0, -1
        shared = self._shared_counts(encoded)
        bounds = (2.0 * shared) / (len(encoded) + self._lengths.view())
        # Exact scores for the entries with the best bounds first, then only for those whose bound
        # can still beat the best exact score found.
        top_bound = float(bounds.max())
        if top_bound == 0.0:
            return 0.0, -1
        first = np.flatnonzero(bounds >= 0.85 * top_bound)
        best, best_index = self._exact_best(encoded, first, 0.0, -1)
        if stop_at is not None and best >= stop_at:
            return best, best_index
        mask = bounds + self._SLACK >= best
        mask[first] = False
        rest = np.flatnonzero(mask)
        if rest.size:
            rest = rest[np.argsort(-bounds[rest], kind="stable")]
            chunk, start = 64, 0
            while start < rest.size and bounds[rest[start]] + self._SLACK >= best:
                picked = rest[start : start + chunk]
                best, best_index = self._exact_best(encoded, picked, best, best_index)
                if stop_at is not None and best >= stop_at:
                    break
                start, chunk = start + chunk, min(chunk * 4, 4096)
        return best, best_index

    def _exact_best(self, encoded: str, picked: np.ndarray, best: float, best_index: int) -> tuple[float, int]:
        lcs = process.cdist(
            [encoded], [self._encoded[i] for i in picked.tolist()], scorer=LCSseq.similarity, dtype=np.int32, workers=1
        )[0]
        for pool_index, common in zip(picked.tolist(), lcs.tolist()):
            score = f_measure(common, len(encoded), len(self._encoded[pool_index]))
            # ties go to the earliest pool entry, whatever order the bounds visited them in
            if score > best or (score == best and score > 0 and pool_index < best_index):
                best, best_index = score, pool_index
        return best, best_index

    def filter_in_order(
        self, candidates: list[str], threshold: float, inclusive: bool = True
    ) -> list[tuple[bool, float, int]]:
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

    # ---- persistence --------------------------------------------------------------------------
    def save(self, store, uri: str) -> None:
        """Saves the pool texts to the run store (re-tokenizing on load costs ~10 us a text)."""
        store.write_json(uri, {"version": 1, "texts": self.texts})

    @classmethod
    def load(cls, store, uri: str) -> NoveltyIndex:
        return cls(store.read_json(uri)["texts"])


def _char_counts(encoded: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for char in encoded:
        counts[char] = counts.get(char, 0) + 1
    return counts
