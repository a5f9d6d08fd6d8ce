"""Near-duplicate responses at scale: MinHash LSH (datasketch) over word 3-gram shingles.

What is compared is a task's instances, inputs and outputs, without the instruction (ROUGE-L already
judges instructions): two tasks whose instances say the same thing teach the same thing. A text of a
few words has a few shingles, and those few make every short answer a duplicate of every other ("no"
and "No." are one shingle), so below a minimum length there is no verdict.
"""

from __future__ import annotations

from datasketch import MinHash, MinHashLSH

from ..common.records import Instance
from ..common.rouge import tokenize

NUM_PERM = 128
SHINGLE = 3  # words


def instances_text(instances: list[Instance]) -> str:
    """What the deduper compares for a task: every instance's input and output."""
    return "\n".join(f"{i.input}\n{i.output}" for i in instances)


class ResponseDeduper:
    """Remembers texts (the pool's, then each kept one's); flags a new one whose estimated Jaccard with
    one of them is high. Texts under min_tokens words are neither flagged nor remembered."""

    def __init__(self, threshold: float, min_tokens: int) -> None:  # filter.near_duplicate_threshold, _min_tokens
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._min_tokens = max(min_tokens, SHINGLE)
        self._count = 0

    def _minhash(self, text: str) -> MinHash | None:
        tokens = tokenize(text)
        if len(tokens) < self._min_tokens:
            return None
        signature = MinHash(num_perm=NUM_PERM, seed=1)
        signature.update_batch([" ".join(tokens[i : i + SHINGLE]).encode() for i in range(len(tokens) - SHINGLE + 1)])
        return signature

    def find(self, text: str) -> str | None:
        """The key of a remembered text this one nearly duplicates, or None."""
        signature = self._minhash(text)
        if signature is None:
            return None
        matches = self._lsh.query(signature)
        return min(matches) if matches else None

    def add(self, key: str, text: str) -> None:
        signature = self._minhash(text)
        if signature is not None:
            self._lsh.insert(f"{self._count:09d}:{key}", signature)
            self._count += 1
