"""Generated gRPC stubs for the reinstruct.v1 contract (see protos/). Do not edit by hand.

Regenerate with `python -m services.api.codegen`.
"""

# Import paths of the add_*Servicer_to_server functions that Serve's gRPC proxy loads.
SERVICER_FUNCTIONS = [
    "services.api.generator_pb2_grpc.add_GeneratorServicer_to_server",
    "services.api.filter_pb2_grpc.add_FilterServicer_to_server",
    "services.api.trainer_pb2_grpc.add_TrainerServicer_to_server",
    "services.api.evaluator_pb2_grpc.add_EvaluatorServicer_to_server",
]
