"""Turns exceptions from service logic into gRPC statuses, so a bad request never crashes a replica."""

from __future__ import annotations

import functools
import logging

import grpc

from .store import StoreError, UriNotAllowed
from .validation import RequestError

logger = logging.getLogger("reinstruct")


def grpc_method(response_type):
    """Wraps a deployment method `(self, request) -> response` for Serve's gRPC proxy."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, request, grpc_context=None):
            try:
                return method(self, request)
            except (RequestError, UriNotAllowed) as exc:
                code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except StoreError as exc:
                code, details = grpc.StatusCode.UNAVAILABLE, f"run store error: {exc}"
            except Exception as exc:  # last resort: report, keep serving
                logger.exception("%s failed", method.__name__)
                code, details = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
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
