"""The add_*Servicer_to_server functions Serve's gRPC proxy loads: the generated ones, with a request
deserializer that turns bytes that are no valid message into None instead of an exception (which
gRPC would report as UNKNOWN); the deployments then answer INVALID_ARGUMENT naming the message."""

from __future__ import annotations

from . import evaluator_pb2_grpc, filter_pb2_grpc, generator_pb2_grpc, trainer_pb2_grpc


def _tolerant(deserialize):
    def load(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # DecodeError and friends: not a message of this type
            return None

    return load


def _patched(handlers: dict) -> dict:
    return {
        name: handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        for name, handler in handlers.items()
    }


class _TolerantServer:
    """Passes everything to the real server, rewriting method handlers on the way."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for generic in generic_handlers:
            generic._method_handlers = _patched(generic._method_handlers)
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._server.add_registered_method_handlers(service_name, _patched(method_handlers))

    def __getattr__(self, name):
        return getattr(self._server, name)


def add_GeneratorServicer_to_server(servicer, server):
    generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, _TolerantServer(server))


def add_FilterServicer_to_server(servicer, server):
    filter_pb2_grpc.add_FilterServicer_to_server(servicer, _TolerantServer(server))


def add_TrainerServicer_to_server(servicer, server):
    trainer_pb2_grpc.add_TrainerServicer_to_server(servicer, _TolerantServer(server))


def add_EvaluatorServicer_to_server(servicer, server):
    evaluator_pb2_grpc.add_EvaluatorServicer_to_server(servicer, _TolerantServer(server))
