"""Generated gRPC stubs for the reinstruct.v1 contract (see protos/). Do not edit by hand.

Regenerate with `python -m services.api.codegen`.
"""

# Import paths of the add_*Servicer_to_server functions that Serve's gRPC proxy loads.
SERVICER_FUNCTIONS = [
    "services.api.servicers.add_GeneratorServicer_to_server",
    "services.api.servicers.add_FilterServicer_to_server",
    "services.api.servicers.add_TrainerServicer_to_server",
    "services.api.servicers.add_EvaluatorServicer_to_server",
]
