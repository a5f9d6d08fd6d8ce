"""reinstruct: self-improving instruction tuning on Ray Serve, Ray Train and gRPC."""
