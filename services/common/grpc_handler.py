"""Turns exceptions from service logic into gRPC statuses, so a bad request never crashes a replica."""

from __future__ import annotations

import functools
import logging

import grpc

from .store import StoreError, UriNotAllowed
from .validation import RequestError

logger = logging.getLogger("reinstruct")


def _status_for(exc: BaseException, name: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, (RequestError, UriNotAllowed)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, f"run store error: {exc}"
    logger.error("%s failed", name, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def grpc_stream_method(method):
    """Like grpc_method, for server-streaming methods (generators of response messages)."""

    def wrapper(self, request, grpc_context=None):
        try:
            yield from method(self, request)
        except Exception as exc:  # reported as the stream's status, the replica keeps serving
            code, details = _status_for(exc, method.__name__)
            if grpc_context is None:
                raise RuntimeError(f"{code.name}: {details}") from exc
            # A stream that ends normally is OK whatever the context says; raising with the code set
            # makes Serve end the stream with that status.
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            raise RuntimeError(details) from None

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return wrapper


def grpc_method(response_type):
    """Wraps a deployment method `(self, request) -> response` for Serve's gRPC proxy."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, request, grpc_context=None):
            try:
                return method(self, request)
            except Exception as exc:  # every failure becomes a status; the replica keeps serving
                code, details = _status_for(exc, method.__name__)
            if grpc_context is None:
                raise RuntimeError(f"{code.name}: {details}")
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            return response_type()

        # Serve passes grpc_context only to methods whose signature names it; functools.wraps would
        # make inspect.signature report the wrapped (self, request) instead.
        del wrapper.__wrapped__
        return wrapper

    return decorate
