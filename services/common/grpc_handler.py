"""Turns exceptions from service logic into gRPC statuses, so a bad request never crashes a replica."""

from __future__ import annotations

import contextvars
import functools
import hmac
import ipaddress
import logging
import os
import urllib.parse

import grpc

from . import deadline
from .models import ModelUnavailable
from .store import NotRunOwner, StoreBusy, StoreError, UriNotAllowed, output_claims, request_run
from .validation import Overloaded, RequestError, authorize_run

logger = logging.getLogger("reinstruct")

# When this variable is set in the replicas' environment (a Kubernetes Secret, or the shell that
# starts a local cluster), every call must carry metadata `authorization: Bearer <token>`.
API_TOKEN_ENV = "REINSTRUCT_API_TOKEN"
MAX_REQUEST_BYTES = int(os.environ.get("REINSTRUCT_MAX_REQUEST_BYTES", 64 * 1024 * 1024))


class Unauthenticated(PermissionError):
    pass


class RequestTooLarge(ValueError):
    pass


class Unimplemented(LookupError):
    pass


def token_matches(presented: str | None) -> bool:
    expected = os.environ.get(API_TOKEN_ENV, "")
    if not expected:
        return True
    return hmac.compare_digest((presented or "").encode(), f"Bearer {expected}".encode())


def is_loopback(host: str) -> bool:
    """A loopback address or 'localhost' (a host name otherwise: not loopback)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
        return (mapped or address).is_loopback
    except ValueError:
        return host == "localhost"


def _peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' -> '127.0.0.1', 'ipv6:[::1]:5000' -> '::1' (gRPC writes that one
    percent-encoded: 'ipv6:%5B::1%5D:5000'); '' for unix sockets and the like."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    return urllib.parse.unquote(address).rsplit(":", 1)[0].strip("[]")


def _admit(request, grpc_context, serve_host: str | None = None) -> None:
    """Who may call, and size, before anything else looks at the request. Serve's gRPC proxy listens
    on every interface (Ray has no option for it): without a token, a replica whose serve.host is a
    loopback address answers loopback clients only, as the HTTP side (bound to serve.host) does."""
    metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
    if not token_matches(metadata.get("authorization")):
        raise Unauthenticated("missing or wrong bearer token in metadata 'authorization'")
    if grpc_context is not None and serve_host and is_loopback(serve_host) and not os.environ.get(API_TOKEN_ENV):
        peer = _peer_host(grpc_context.peer() or "")
        if peer and not is_loopback(peer):
            raise Unauthenticated(
                f"this server answers loopback clients only (serve.host {serve_host}, no REINSTRUCT_API_TOKEN): "
                "set a token on the replicas to serve other hosts"
            )
    if request is None:  # services.api.servicers: the bytes were no valid message of this method's type
        raise RequestError("request", "not a valid protobuf message for this method")
    size = request.ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise RequestTooLarge(
            f"request is {size} bytes; the limit is {MAX_REQUEST_BYTES} (send large batches by dataset uri)"
        )


def _authorized_run(deployment, method, request) -> str | None:
    """The run this request may read and write: the one whose key its context carries (checked here,
    for every method, before the method touches anything), else None (store paths inside runs are
    then refused: RunStore.resolve). A method that refuses every request (refuse_other_services)
    checks nothing."""
    store = getattr(deployment, "store", None)
    if store is None or getattr(method, "refuses_all", False) or "context" not in request.DESCRIPTOR.fields_by_name:
        return None
    return authorize_run(request.context, store)


def _status_for(exc: BaseException, name: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, NotRunOwner):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, Unimplemented):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc)
    if isinstance(exc, (RequestTooLarge, Overloaded)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (RequestError, UriNotAllowed)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, StoreBusy):  # the other writer wins; this caller is told so, not told it succeeded
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, deadline.WorkAbandoned):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, f"run store error: {exc}"
    if isinstance(exc, ModelUnavailable):  # the operator's setup (a package, a file): say what to fix
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    logger.error("%s failed", name, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


# Every status a replica answers carries this trailing metadata: a client can tell an answer (an error
# the service chose, never retried) from a failure of Serve or Ray around it (a replica that died
# mid-call, answered INTERNAL by the proxy), which is worth a retry. (Serve forwards it for unary
# methods; a failed stream ends without it, and the client never retries a stream.)
ANSWERED_KEY = "reinstruct-status"


def _answer(grpc_context, code: grpc.StatusCode, details: str) -> None:
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    grpc_context.set_trailing_metadata([(ANSWERED_KEY, code.name)])


def grpc_stream_method(method):
    """Like grpc_method, for server-streaming methods (generators of response messages). The stream
    runs in a context of its own: the request's scope (its run, its output claims, its budget) never
    stays behind in the thread that iterates it between messages."""

    def wrapper(self, request, grpc_context=None):
        context = contextvars.copy_context()
        stream = scoped(self, request, grpc_context)
        try:
            while True:
                try:
                    message = context.run(next, stream)
                except StopIteration:
                    return
                yield message
        finally:
            context.run(stream.close)

    def scoped(self, request, grpc_context):
        try:
            _admit(request, grpc_context, getattr(self, "serve_host", None))
            run = _authorized_run(self, method, request)
            with deadline.budget(getattr(self, "request_budget_s", None)), output_claims(), request_run(run):
                yield from method(self, request)
        except Exception as exc:  # reported as the stream's status, the replica keeps serving
            code, details = _status_for(exc, method.__name__)
            if grpc_context is None:
                raise RuntimeError(f"{code.name}: {details}") from exc
            # A stream that ends normally is OK whatever the context says; raising with the code set
            # makes Serve end the stream with that status.
            _answer(grpc_context, code, details)
            raise RuntimeError(details) from None

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return wrapper


def grpc_method(response_type):
    """Wraps a deployment method `(self, request) -> response` for Serve's gRPC proxy."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, request, grpc_context=None):
            try:
                _admit(request, grpc_context, getattr(self, "serve_host", None))
                run = _authorized_run(self, method, request)
                with deadline.budget(getattr(self, "request_budget_s", None)), output_claims(), request_run(run):
                    return method(self, request)
            except Exception as exc:  # every failure becomes a status; the replica keeps serving
                code, details = _status_for(exc, method.__name__)
            if grpc_context is None:
                raise RuntimeError(f"{code.name}: {details}")
            _answer(grpc_context, code, details)
            return response_type()

        # Serve passes grpc_context only to methods whose signature names it; functools.wraps would
        # make inspect.signature report the wrapped (self, request) instead.
        del wrapper.__wrapped__
        return wrapper

    return decorate


def run_with_progress(work):
    """Runs work(on_progress) in a thread; yields (done, total) as it reports, then ('result', value).
    Exceptions in work are re-raised in the caller's generator (and so become the stream's status)."""
    import contextvars
    import queue
    import threading

    updates: queue.Queue = queue.Queue()
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work(lambda done, total: updates.put((done, total)))
        except Exception as exc:  # re-raised below, in the streaming method
            outcome["error"] = exc
        updates.put(None)

    # the work runs in the request's context: its time budget (services.common.deadline) goes with it
    threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True).start()
    while (update := updates.get()) is not None:
        yield update
    if "error" in outcome:
        raise outcome["error"]
    yield ("result", outcome["value"])


def refuse_other_services(service_name: str):
    """Class decorator for a deployment: Serve routes gRPC by method name within the app the metadata
    names, so a method of another service sent here would fail inside Serve with a traceback (pid,
    node, paths). Each such method answers UNIMPLEMENTED, naming the right app, and nothing else."""

    def decorate(cls):
        from ..api import evaluator_pb2, filter_pb2, generator_pb2, trainer_pb2

        for module in (generator_pb2, filter_pb2, trainer_pb2, evaluator_pb2):
            for service in module.DESCRIPTOR.services_by_name.values():
                if service.name == service_name:
                    continue
                for method in service.methods:
                    if hasattr(cls, method.name):
                        continue
                    message = (
                        f"{service.full_name}/{method.name} is not served by the {service_name.lower()} app; "
                        f"send metadata application: {service.name.lower()}"
                    )
                    setattr(cls, method.name, _unimplemented(message, method.server_streaming))
        return cls

    return decorate


def _unimplemented(message: str, streaming: bool):
    def refuse(self, request):
        raise Unimplemented(message)

    refuse.refuses_all = True
    if streaming:

        def refuse_stream(self, request):
            raise Unimplemented(message)
            yield  # a generator, as streaming methods are

        refuse_stream.refuses_all = True
        return grpc_stream_method(refuse_stream)
    from ..api import common_pb2

    return grpc_method(common_pb2.RunContext)(refuse)  # any message type: only the status is read
