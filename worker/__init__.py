"""Data plane: the sharded model, the inference engine, and the worker gRPC service."""
