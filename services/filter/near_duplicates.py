"""Near-duplicate responses at scale: MinHash LSH (datasketch) over word 3-gram shingles."""

from __future__ import annotations

from datasketch import MinHash, MinHashLSH

from ..common.rouge import tokenize

NUM_PERM = 128


def _minhash(text: str) -> MinHash | None:
    tokens = tokenize(text)
    if len(tokens) < 3:
        shingles = {" ".join(tokens)} if tokens else set()
    else:
        shingles = {" ".join(tokens[i : i + 3]) for i in range(len(tokens) - 2)}
    if not shingles:
        return None
    signature = MinHash(num_perm=NUM_PERM, seed=1)
    signature.update_batch([s.encode() for s in shingles])
    return signature


class ResponseDeduper:
    """Remembers kept responses; flags a new one whose estimated Jaccard with one of them is high."""

    def __init__(self, threshold: float) -> None:  # filter.near_duplicate_threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._count = 0

    def find(self, text: str) -> str | None:
        """The key of a kept response this one nearly duplicates, or None."""
        signature = _minhash(text)
        if signature is None:
            return None
        matches = self._lsh.query(signature)
        return min(matches) if matches else None

    def add(self, key: str, text: str) -> None:
        signature = _minhash(text)
        if signature is not None:
            self._lsh.insert(f"{self._count:09d}:{key}", signature)
            self._count += 1
