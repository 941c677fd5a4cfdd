"""Wire contract v1: generated protobuf and gRPC code for the `Inference` (public router
API), `Worker` (internal, one per GPU) and `Control` (router, internal) services.

The `.proto` files beside this module are the source; regenerate with
`python scripts/gen_proto.py` (a test fails when the committed code is stale).
"""
