"""Work nobody waits for stops. Every request a replica serves gets a time budget (the longest any
client of this deployment waits: serve.request_timeout_s); engines and long loops call `check()`
between batches, and generation stops mid-batch (`DeadlineStop`), so a client that gave up cannot
keep a replica busy after the budget, and the replica is free for the next request."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)


class WorkAbandoned(TimeoutError):
    """The request ran past its budget; no client is waiting for its answer any more."""


@contextlib.contextmanager
def budget(seconds: float | None) -> Iterator[None]:
    """Work inside the block must end within `seconds` (None: no limit)."""
    token = _deadline.set(time.monotonic() + seconds if seconds else None)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left of the request's budget (None: no limit)."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def expired() -> bool:
    deadline = _deadline.get()
    return deadline is not None and time.monotonic() > deadline


def check() -> None:
    if expired():
        raise WorkAbandoned(
            "the request ran longer than serve.request_timeout_s, the longest a client of this deployment "
            "waits: stopped so the replica serves the next one (send smaller requests)"
        )
