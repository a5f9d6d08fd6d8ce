"""One way to write a local file so that a reader never sees half of it: write a temporary beside it,
flush it to disk, rename it over the target (the run store does the same through fsspec)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """write(handle) fills a binary temporary; it replaces path only once complete."""
    path = str(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # unique: two writers never share a temporary
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))
